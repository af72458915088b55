"""Images: decode files safely to 8-bit RGB (the one rule for turning pixel arrays into 8 bits), and the evaluation
preprocessing in numpy, so that prediction with ONNX Runtime needs no torch."""

from __future__ import annotations

import errno
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageInput = str | Path | Image.Image | np.ndarray  # what predict takes: a file, or an image in memory

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MIN_SIDE = 8  # smaller images carry no lesion detail; a 1x1 "image" is a broken export, not a photo
MAX_PIXELS = 100_000_000  # about 10,000 x 10,000; larger headers are treated as decompression bombs
FLOAT_SLACK = 1e-3  # rounding in a float image computed in 0..1 (or 0..255)
ROWS_AT_ONCE = 64  # rows converted at a time: a whole float copy of a 9400 x 9400 upload would cost 0.7 GB

ImageFile.LOAD_TRUNCATED_IMAGES = False


class PixelRangeError(ValueError):
    """Pixel values that are no picture's: NaN or infinity (`finite` False), or outside 0..255 (and 0..1)."""

    def __init__(self, low: float, high: float, finite: bool = True):
        super().__init__(f"values {low:g} to {high:g}" if finite else "NaN or infinity")
        self.low, self.high, self.finite = low, high, finite


def to_uint8(array: np.ndarray) -> np.ndarray:
    """An integer or float pixel array as 8 bits, rounded: uint8 as is, uint16 from 0..65535, other integers
    0..255, floats 0..1 (0..255 where a value is above 1). Anything else raises PixelRangeError: guessing would give
    a confident probability for a washed-out or black image. Converted a block of rows at a time, so no float64
    copy of the whole image is ever made."""
    if array.dtype.kind == "u" and array.dtype.itemsize == 1:
        return array.astype(np.uint8, copy=False)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # either byte order
        return scale_to_8_bits(array, 65535)
    if array.size and not np.isfinite(array).all():
        raise PixelRangeError(np.nan, np.nan, finite=False)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    scale = 1.0
    if array.dtype.kind == "f" and low >= -FLOAT_SLACK and high <= 1 + FLOAT_SLACK:
        scale = 255.0
    elif low < -FLOAT_SLACK or high > 255 + FLOAT_SLACK:
        raise PixelRangeError(low, high)
    out = np.empty(array.shape, np.uint8)
    for start in range(0, len(array), ROWS_AT_ONCE):
        out[start:start + ROWS_AT_ONCE] = np.clip(array[start:start + ROWS_AT_ONCE] * scale + 0.5, 0, 255)
    return out


def scale_to_8_bits(array: np.ndarray, top: int) -> np.ndarray:
    """Integers 0..top -> uint8, rounded, in integer arithmetic a block of rows at a time."""
    out = np.empty(array.shape, np.uint8)
    for start in range(0, array.shape[0], ROWS_AT_ONCE):
        block = array[start:start + ROWS_AT_ONCE].astype(np.int64)
        out[start:start + ROWS_AT_ONCE] = np.clip((block * 255 + top // 2) // top, 0, 255)
    return out


_OPENING = threading.Lock()


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and normalise one image to 8-bit RGB, honouring EXIF rotation.

    Raises ImageError with a human-readable reason for anything that is not a usable photograph.
    """
    path = Path(path)
    try:
        if not path.exists():  # also False for a symlink loop or a dangling link: say which
            if path.is_symlink():
                raise ImageError(path, "symlink loop" if _is_link_loop(path) else "broken symlink (target not found)")
            raise ImageError(path, "file not found")
        if not path.is_file():
            raise ImageError(path, "not a regular file")
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with _OPENING, warnings.catch_warnings():  # process-wide filters: decoding threads open one at a time
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)  # the header only; decoding (load) runs in parallel
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(path, f"image too large ({img.width}x{img.height}): possible decompression bomb")
            img.load()
            return to_rgb(img)
    except ImageError:
        raise
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (cannot identify the file format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, "image too large: possible decompression bomb") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageError(path, "symlink loop") from None
        raise ImageError(path, f"corrupt or truncated image ({err})") from None
    except (ValueError, SyntaxError, EOFError) as err:
        raise ImageError(path, f"corrupt image ({err})") from None


def _is_link_loop(path: Path) -> bool:
    try:
        path.stat()
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


def _grey_to_8_bits(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or floating-point grey image as an 8-bit one (mode L)."""
    array = np.asarray(img)
    if img.mode != "F":  # 32-bit integer grey holding 8-bit values stays as it is; 16-bit is scaled from 0..65535
        sixteen = img.mode.startswith("I;16") or array.max() > 255
        return Image.fromarray(scale_to_8_bits(array, 65535 if sixteen else 255), mode="L")
    name = getattr(img, "filename", "") or "image"
    try:
        if array.size == 0:
            raise PixelRangeError(np.nan, np.nan, finite=False)
        return Image.fromarray(to_uint8(array), mode="L")  # 0..1 or 0..255, as for arrays
    except PixelRangeError as err:
        if not err.finite:
            raise ImageError(name, "floating-point image holding NaN or infinity") from None
        raise ImageError(name, f"floating-point image with values {err.low:g} to {err.high:g}; expected 0..1 or "
                               "0..255") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; alpha, grayscale, 16-bit and CMYK converted to 8-bit RGB; tiny images refused."""
    img = ImageOps.exif_transpose(img)
    if img.width < MIN_SIDE or img.height < MIN_SIDE:
        name = getattr(img, "filename", "") or "image"
        raise ImageError(name, f"image too small ({img.width}x{img.height}, need at least {MIN_SIDE} px a side)")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _grey_to_8_bits(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def check_image(path: str | Path) -> str | None:
    """The reason a file is unusable, or None when it decodes as an image."""
    try:
        load_image(path)
    except ImageError as err:
        return err.reason
    return None


def centre_box(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the largest centred square of a width x height picture."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of an image (the `crop` resize policy; a square image is returned as it is)."""
    if image.width == image.height:
        return image
    left, top, side = centre_box(*image.size)
    return image.crop((left, top, left + side, top + side))


class EvalTransform:
    """Evaluation preprocessing in numpy: made square (resize policy `squash`: the whole image resized, bicubic as PIL
    resizes for torchvision's Resize; `crop`: its centre square first), scaled to 0..1 and normalised with mean/std:
    a float32 [3, S, S] array equal to datasets.build_transform's tensor (tests/test_data.py checks it)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], resize: str = "squash"):
        self.size, self.crop = int(image_size), resize == "crop"
        std = np.asarray(std, dtype=np.float64)  # (x / 255 - mean) / std as x * scale + shift, one pass per channel
        self.scale = (1 / (255 * std)).astype(np.float32)
        self.shift = (-np.asarray(mean, dtype=np.float64) / std).astype(np.float32)

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self.crop:
            image = centre_square(image)
        image = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(image.resize((self.size, self.size), Image.Resampling.BICUBIC), dtype=np.uint8)
        out = np.empty((3, self.size, self.size), dtype=np.float32)
        for channel in range(3):  # written in place: half the time of whole-array arithmetic (BENCHMARKS.md)
            np.multiply(pixels[:, :, channel], self.scale[channel], out=out[channel], dtype=np.float32)
            out[channel] += self.shift[channel]
        return out


TTA_SEED = 2017  # the fixed augmentations of test-time views beyond the 8 dihedral ones


class AugmentedView:
    """The image of test-time draw `draw` >= 1 (each averaged over its 8 dihedral views, as the plain image is):
    one fixed rotation, crop and colour change, drawn once from the ranges of the `standard` training augmentation
    (rotation within 45 degrees, 50-100% of the area at an aspect of 3:4 to 4:3, brightness and contrast within 20%,
    saturation within 15%) and the same for every image, so a prediction does not depend on chance or on the
    batch. Then `preprocess` (the squash to the model's square; under the `crop` resize policy the centre square is
    taken first, as in training)."""

    def __init__(self, preprocess: Callable, draw: int, resize: str = "squash"):
        rng = np.random.default_rng([TTA_SEED, draw])
        self.angle = float(rng.uniform(-45, 45))
        self.area, self.ratio = float(rng.uniform(0.5, 1.0)), float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        self.where = rng.uniform(0, 1, 2)
        self.colour = rng.uniform((0.8, 0.8, 0.85), (1.2, 1.2, 1.15))
        self.preprocess, self.crop = preprocess, resize == "crop"

    def __call__(self, image: Image.Image):
        if self.crop:
            image = centre_square(image)
        image = image.rotate(self.angle, resample=Image.Resampling.BILINEAR)  # black corners, as in training
        width, height = image.size
        area = self.area * width * height
        w, h = min(width, round((area * self.ratio) ** 0.5)), min(height, round((area / self.ratio) ** 0.5))
        left, top = round((width - w) * self.where[0]), round((height - h) * self.where[1])
        image = image.crop((left, top, left + w, top + h))
        for enhance, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color),
                                   self.colour, strict=True):
            image = enhance(image).enhance(float(factor))
        return self.preprocess(image)


class ImageList:
    """Images (paths, PIL images, or an ImageError found before) -> {'image', 'target', 'index'} through a
    transform; an unreadable file yields {'error', 'index'} instead of raising, so a file that turns bad after
    indexing is reported and skipped rather than ending a long run. datasets.ImageDataset is this, as a torch
    Dataset."""

    def __init__(self, paths: Sequence, targets: Sequence[int] | None, transform: Callable):
        self.paths, self.transform = list(paths), transform
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        source = self.paths[index]
        if isinstance(source, ImageError):  # an in-memory image found unusable before (too small)
            return {"error": source.reason, "index": index}
        try:
            image = source if isinstance(source, Image.Image) else load_image(source)
        except ImageError as err:
            return {"error": err.reason, "index": index}
        return {"image": self.transform(image), "target": self.targets[index], "index": index}


def collate_arrays(samples: list[dict]) -> dict:
    """datasets.collate in numpy: the good samples stacked, the bad ones carried as (index, reason) pairs."""
    good = [s for s in samples if "error" not in s]
    errors = [(s["index"], s["error"]) for s in samples if "error" in s]
    return {"image": np.stack([s["image"] for s in good]) if good else None,
            "index": np.array([s["index"] for s in good], dtype=np.int64), "errors": errors}


def expand_inputs(paths: Sequence[str | Path], passed_over: list[str] | None = None) -> list[str]:
    """Files as given; folders expanded (recursively) to the image files inside them, sorted.

    passed_over: if given, collects the files inside the folders that were left out for not being images."""
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
                    files.append(str(p))
                elif passed_over is not None and p.is_file() and not p.name.startswith("."):
                    passed_over.append(str(p))
        else:
            files.append(str(path))
    return files


def image_ids(images: Sequence) -> list[str | None]:
    """Each image's id for matching metadata: a file's name without extension (None for in-memory images)."""
    return [Path(image).stem if isinstance(image, (str, Path)) else None for image in images]


def is_batch_array(images) -> bool:
    return isinstance(images, np.ndarray) and images.ndim == 4


def as_source(image: ImageInput, index: int = 0):
    """A PIL image (RGB, checked) or a path for the dataset; an ImageError for an image too small to use."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return to_rgb(Image.fromarray(array_to_uint8(image, index)))
    if "torch" in sys.modules and isinstance(image, sys.modules["torch"].Tensor):  # none without torch loaded
        raise TypeError("pass images as paths, PIL images or HxWxC uint8 arrays, not tensors")
    if isinstance(image, (bytes, bytearray)):
        raise TypeError(f"image {index}: bytes; pass a path, a PIL image (PIL.Image.open(io.BytesIO(data))) or an "
                        "array")
    if not isinstance(image, (str, Path)):
        raise TypeError(f"image {index}: expected a path, a PIL image or an array, got {type(image).__name__}")
    return str(image)


def array_to_uint8(image: np.ndarray, index: int) -> np.ndarray:
    """An H x W (grey) or H x W x 1/3/4 array as 8-bit (images.to_uint8: uint8 as is, uint16 from 0..65535, other
    integers 0..255, floats 0..1 or 0..255); other shapes and types are refused."""
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {index}: array of shape {image.shape} looks channels-first; pass H x W x C")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"image {index}: array of shape {image.shape}; expected H x W (grey) or H x W x 1, 3 or 4")
    if image.dtype.kind not in "iuf":
        raise ValueError(f"image {index}: array of {image.dtype}; expected uint8, uint16, integers or floats")
    try:
        return np.ascontiguousarray(to_uint8(image))
    except PixelRangeError as err:
        if not err.finite:
            raise ValueError(f"image {index}: array holds NaN or infinity") from None
        raise ValueError(f"image {index}: {image.dtype} array with values {err.low:g} to {err.high:g}; expected "
                         "0..255 (or floats in 0..1, or uint16 0..65535); a normalised tensor is not a photograph"
                         ) from None


def describe(image, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"<image {index}>"
