"""The image sets of benchmarks/ood.py: far out-of-distribution pictures (library samples and synthetic frames) and
the HAM10000 images of the model's own diagnoses and of others."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

HAM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ham10000"
NEAR_OOD_DX = ("bcc", "akiec", "vasc", "df")  # diagnoses outside ISIC 2017's melanoma / nevus / SK
OWN_DX = ("mel", "nv", "bkl")
NOT_PICTURES = {"download_all", "data_dir", "file_hash", "lbp_frontal_face_cascade_filename"}


def library_samples() -> list[tuple[str, Image.Image]]:
    """Every sample picture that ships inside scikit-image (those it would download are skipped) and
    scikit-learn, as RGB images; stacks (lfw_subset, stereo_motorcycle) give their first frames."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    pictures = []
    for name in sorted(set(skimage.data.__all__) - NOT_PICTURES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = getattr(skimage.data, name)()
        except (ModuleNotFoundError, OSError, ValueError):  # pooch-downloaded data: not shipped
            continue
        for i, array in enumerate(value if isinstance(value, tuple) else [value]):
            array = np.asarray(array)
            if name == "lfw_subset":  # 200 faces of 25 x 25 px: a few, scaled up (the model refuses < 32 px)
                for j in range(0, 200, 40):
                    pictures.append((f"skimage.lfw_subset[{j}]", _to_rgb(array[j]).resize((100, 100))))
                continue
            if array.ndim == 3 and array.shape[2] not in (3, 4):
                continue  # volumes
            pictures.append((f"skimage.{name}" + (f"[{i}]" if isinstance(value, tuple) else ""), _to_rgb(array)))
    bunch = load_sample_images()
    pictures += [(f"sklearn.{Path(f).stem}", Image.fromarray(img)) for f, img in zip(bunch.filenames, bunch.images,
                                                                                     strict=True)]
    return pictures


def synthetic_frames(seed: int = 0) -> list[tuple[str, Image.Image]]:
    """Frames a camera or a careless upload gives: uniform colours, noise, gradients, rendered text and a page-like
    screenshot."""
    rng = np.random.default_rng(seed)
    frames = []
    for rgb in [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 150, 130), (180, 90, 60), (30, 60, 200),
                (20, 160, 40), (240, 220, 200)]:
        frames.append((f"uniform{rgb}", Image.new("RGB", (256, 256), rgb)))
    for i in range(4):
        frames.append((f"noise-gaussian-{i}", _to_rgb(np.clip(rng.normal(128, 40 + 20 * i, (256, 256, 3)), 0, 255))))
        frames.append((f"noise-uniform-{i}", _to_rgb(rng.integers(0, 256, (256, 256, 3)))))
    ramp = np.linspace(0, 255, 256)
    for i, (a, b) in enumerate([((0, 0, 0), (255, 255, 255)), ((230, 180, 160), (120, 60, 40)),
                                ((255, 0, 0), (0, 0, 255)), ((250, 240, 230), (200, 170, 150))]):
        line = np.stack([a[c] + (b[c] - a[c]) * ramp / 255 for c in range(3)], -1)
        frames.append((f"gradient-horizontal-{i}", _to_rgb(np.broadcast_to(line, (256, 256, 3)))))
        yy, xx = np.mgrid[-1:1:256j, -1:1:256j]
        radius = np.clip(np.hypot(yy, xx) / np.sqrt(2), 0, 1)[..., None]
        frames.append((f"gradient-radial-{i}", _to_rgb(np.array(a) * (1 - radius) + np.array(b) * radius)))
    font = ImageFont.load_default(size=18)
    words = "skin lesion dermoscopy upload results patient report page settings help login".split()
    for i in range(6):
        page = Image.new("RGB", (320, 240), (255, 255, 255) if i % 2 == 0 else (30, 30, 36))
        draw = ImageDraw.Draw(page)
        ink = (20, 20, 20) if i % 2 == 0 else (220, 220, 220)
        for row in range(10):
            draw.text((10, 8 + 23 * row), " ".join(rng.choice(words, 4)), fill=ink, font=font)
        frames.append((f"text-{i}", page))
    for i in range(4):  # a web page: title bar, menu, buttons, a picture box
        shot = Image.new("RGB", (400, 300), (245, 245, 245))
        draw = ImageDraw.Draw(shot)
        draw.rectangle((0, 0, 400, 36), fill=tuple(int(v) for v in rng.integers(0, 200, 3)))
        draw.text((12, 8), "skincancer - upload", fill=(255, 255, 255), font=font)
        for b in range(3):
            draw.rectangle((12 + 120 * b, 50, 112 + 120 * b, 80), outline=(90, 90, 90), fill=(225, 225, 240))
            draw.text((22 + 120 * b, 55), ["Open", "Predict", "Help"][b], fill=(0, 0, 0), font=font)
        draw.rectangle((12, 100, 190, 280), fill=tuple(int(v) for v in rng.integers(100, 255, 3)))
        for row in range(7):
            draw.text((205, 100 + 24 * row), " ".join(rng.choice(words, 2)), fill=(40, 40, 40), font=font)
        frames.append((f"screenshot-{i}", shot))
    return frames


def far_ood() -> list[tuple[str, Image.Image]]:
    return library_samples() + synthetic_frames()


def ham_images(diagnoses: tuple[str, ...], limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    """HAM10000 images of these diagnoses (filepath, dx), or a random `limit` of them."""
    table = pd.read_csv(HAM / "HAM10000_metadata.csv")
    table = table[table["dx"].isin(diagnoses)].sort_values("image_id")
    if limit is not None and len(table) > limit:
        table = table.sample(limit, random_state=seed).sort_values("image_id")
    table["filepath"] = [str(HAM / "images" / f"{i}.jpg") for i in table["image_id"]]
    return table.reset_index(drop=True)


def _to_rgb(array) -> Image.Image:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        array = np.clip(array * 255 if array.max() <= 1 else array, 0, 255)
    image = Image.fromarray(np.ascontiguousarray(array).astype(np.uint8))
    return image.convert("RGB")
