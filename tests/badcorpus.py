"""Test helper: build a folder-per-class tree that mixes real ISIC images with every kind of bad or odd file."""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("melanoma", "nevus", "seborrheic_keratosis")

# name -> words the reason given by `skincancer index` / load_image must contain
BAD = {
    "zero_byte": "empty file",
    "truncated_jpeg": "truncated",
    "text_as_jpeg": "not an image",
    "one_pixel": "too small",
    "decompression_bomb": "decompression bomb",
    "symlink_loop": "symlink loop",
    "unreadable": "permission denied",
}
# valid but unusual: converted to 8-bit RGB and used
ODD = ("png_alpha", "gray16_png", "cmyk_jpeg", "exif_rotated")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that claims width x height RGB pixels, with a few bytes of data: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def real_images(data_dir: Path, diagnosis: str, count: int, skip: int = 0) -> list[Path]:
    return sorted((data_dir / "train" / diagnosis).glob("*.jpg"))[skip:skip + count]


def make_bad_corpus(root: str | Path, data_dir: str | Path, per_class: int = 2) -> dict[str, Path]:
    """root/<diagnosis>/... with `per_class` real ISIC images per class (keys real_<diagnosis>_<i>), the bad files
    of BAD and the odd-but-valid images of ODD (made from real lesions). Returns name -> path."""
    root, data_dir = Path(root), Path(data_dir)
    files: dict[str, Path] = {}
    for diagnosis in CLASSES:
        (root / diagnosis).mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(real_images(data_dir, diagnosis, per_class)):
            files[f"real_{diagnosis}_{i}"] = Path(shutil.copy(src, root / diagnosis / src.name))
    lesion_path = real_images(data_dir, "melanoma", 1, skip=per_class)[0]
    lesion = Image.open(lesion_path).convert("RGB")
    nevus, keratosis = root / "nevus", root / "seborrheic_keratosis"

    files["zero_byte"] = nevus / "zero_byte.jpg"
    files["zero_byte"].write_bytes(b"")
    files["truncated_jpeg"] = nevus / "truncated_jpeg.jpg"
    files["truncated_jpeg"].write_bytes(lesion_path.read_bytes()[: lesion_path.stat().st_size // 2])
    files["text_as_jpeg"] = nevus / "text_as_jpeg.jpg"
    files["text_as_jpeg"].write_text("Patient notes: lesion on the left forearm, 6 mm, irregular border.\n")
    files["one_pixel"] = keratosis / "one_pixel.png"
    Image.new("RGB", (1, 1), (120, 80, 60)).save(files["one_pixel"])
    files["decompression_bomb"] = keratosis / "decompression_bomb.png"
    files["decompression_bomb"].write_bytes(bomb_png())
    files["symlink_loop"] = keratosis / "symlink_loop.jpg"
    partner = keratosis / "symlink_loop_partner.jpg"
    os.symlink(partner.name, files["symlink_loop"])
    os.symlink(files["symlink_loop"].name, partner)
    files["symlink_loop_partner"] = partner
    files["unreadable"] = nevus / "unreadable.jpg"
    shutil.copy(lesion_path, files["unreadable"])
    os.chmod(files["unreadable"], 0)

    files["png_alpha"] = root / "melanoma" / "png_alpha.png"
    rgba = lesion.convert("RGBA")
    alpha = np.full(lesion.size[::-1], 255, np.uint8)
    alpha[:, : lesion.width // 4] = 0  # a transparent margin
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(files["png_alpha"])
    files["gray16_png"] = root / "melanoma" / "gray16_png.png"
    gray = np.asarray(lesion.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(files["gray16_png"])
    files["cmyk_jpeg"] = nevus / "cmyk_jpeg.jpg"
    lesion.convert("CMYK").save(files["cmyk_jpeg"], quality=90)
    files["exif_rotated"] = keratosis / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    lesion.crop((0, 0, lesion.width, lesion.height // 2)).save(files["exif_rotated"], exif=exif, quality=90)
    return files


def bad_names() -> list[str]:
    """Every file `index` must refuse; the loop's partner link is a symlink loop too."""
    return [*BAD, "symlink_loop_partner"]


def expected_reason(name: str) -> str:
    return BAD["symlink_loop" if name == "symlink_loop_partner" else name]


def without_dac_override() -> None:
    """preexec_fn for subprocesses run as root: drop the capabilities that let root read a chmod 000 file, so the
    child sees file permissions as an ordinary user would (uid stays 0, so root-owned 0700 folders stay open)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for capability in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def unprivileged_preexec():
    """The preexec_fn that makes permission bits bite in a child process, or None when they already do."""
    return without_dac_override if os.geteuid() == 0 else None
