"""The torch side of the data: the Dataset that DataLoader and the samplers read, its collate, and the transforms
(evaluation, and the training augmentations)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from .images import ImageList, centre_square


def build_transform(image_size: int, mean: Sequence[float], std: Sequence[float], augment: str = "none",
                    resize: str = "squash") -> T.Compose:
    """Eval: squash to a square (as the ISIC copies are). Train: random crops, dihedral flips, rotation, colour.
    resize 'crop': every one of them starts from the image's centre square instead of the whole image."""
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    square = [T.Lambda(centre_square)] if resize == "crop" else []
    if augment == "none":
        return T.Compose([*square, T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
                          *normalize])
    if augment == "perez":  # Perez et al. 2018 (arXiv:1809.01442): their best set on ISIC 2017
        return T.Compose([
            *square,
            T.RandomResizedCrop(image_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomAffine(90, scale=(0.8, 1.2), shear=20, interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.1),
            *normalize,
        ])
    strong = augment == "strong"
    return T.Compose([
        *square,
        T.RandomRotation(180 if strong else 45, interpolation=T.InterpolationMode.BILINEAR),
        T.RandomResizedCrop(image_size, scale=(0.35 if strong else 0.5, 1.0), ratio=(0.75, 1.33),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        T.ColorJitter(*((0.3, 0.3, 0.3, 0.05) if strong else (0.2, 0.2, 0.15, 0.02))),
        *normalize,
    ])


class ImageDataset(ImageList, Dataset):
    """images.ImageList as a torch Dataset (for DataLoader and the samplers): yields {'image', 'target', 'index'}; an
    unreadable file yields {'error', 'index'} instead of raising."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None, transform: T.Compose):
        ImageList.__init__(self, paths, targets, transform)


def collate(samples: list[dict]) -> dict:
    """Stack the good samples; carry the bad ones as (index, reason) pairs."""
    good = [s for s in samples if "error" not in s]
    errors = [(s["index"], s["error"]) for s in samples if "error" in s]
    if not good:
        return {"image": None, "target": None, "index": torch.empty(0, dtype=torch.long), "errors": errors}
    targets = [s["target"] for s in good]
    return {
        "image": torch.stack([s["image"] for s in good]),
        # a class index each, or (distillation) a row of target probabilities each
        "target": (torch.as_tensor(np.stack(targets), dtype=torch.float32) if np.ndim(targets[0]) else
                   torch.tensor(targets, dtype=torch.long)),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "errors": errors,
    }
