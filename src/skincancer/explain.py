"""Explanations: Grad-CAM heat maps of the malignant output(s), drawn over the photograph as PNG overlays."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backbones import MultiScaleClassifier
from .checkpoint import atomic_write
from .data import ImageError, load_image
from .images import centre_box
from .predict import Classifier

OVERLAY_MAX_SIDE = 512
_HOOK_LOCK = threading.Lock()  # Grad-CAM hooks the shared model; one explanation at a time


class MalignantTarget:
    """Grad-CAM target: the malignant score, logsumexp of the logits the label map sends to 1 (the logit itself
    when one class is malignant)."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits[..., self.indices], dim=-1)


def target_layer(model: nn.Module) -> nn.Module:
    """The last spatial feature map before pooling: timm EfficientNet's bn2 (conv_head + BN + activation),
    Inception's Mixed_7c, else the last convolution."""
    for name in ("bn2", "Mixed_7c", "final_conv", "norm_pre"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
            return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__}: no convolution to take Grad-CAM from")
    return convs[-1]


def malignant_heatmap(classifier: Classifier, image: Image.Image) -> np.ndarray:
    """Grad-CAM of one model's malignant score for one RGB image: [S, S] float32 in [0, 1] on its input grid (an
    ensemble's members have grids of their own: photo_heatmap)."""
    if classifier.members:
        raise TypeError("malignant_heatmap: one model's map; for an ensemble use photo_heatmap")
    from pytorch_grad_cam import GradCAM

    x = classifier.transform()(image).unsqueeze(0)
    if isinstance(classifier.model, MultiScaleClassifier):
        return multiscale_heatmap(classifier.model, x, MalignantTarget(classifier.positive_indices))
    with _HOOK_LOCK, GradCAM(model=classifier.model, target_layers=[target_layer(classifier.model)]) as cam:
        heatmap = cam(input_tensor=x, targets=[MalignantTarget(classifier.positive_indices)])[0]
    return np.nan_to_num(heatmap.astype(np.float32))


def multiscale_heatmap(model: MultiScaleClassifier, x: torch.Tensor, target: MalignantTarget) -> np.ndarray:
    """Grad-CAM over every map a multiscale model pools (later stages and head), not the head's alone.

    The score depends on the maps only through their averages: with g_s the gradient of the score with respect to
    map s's averaged features, sum_c g_sc * A_sc(h, w) is that map's share at (h, w) (Grad-CAM's weighting; for a
    linear head and one malignant class the shares add up to the logit, less its bias). Each is brought to the
    input grid (bilinear), the shares are summed, and the positive part is scaled to [0, 1]."""
    device = next(model.parameters()).device
    with torch.inference_mode(False), torch.no_grad():  # callable from inside inference_mode or no_grad
        maps = model.feature_maps(x.clone().to(device))
    with torch.inference_mode(False), torch.enable_grad():
        pooled = [m.mean((2, 3)).requires_grad_() for m in maps]  # the graph is the head's only
        score = target(model.classifier(torch.cat(pooled, dim=1)))[0]
        grads = torch.autograd.grad(score, pooled)
    side = x.shape[-1]
    total = sum(nn.functional.interpolate((g[:, :, None, None] * m).sum(1, keepdim=True), size=(side, side),
                                          mode="bilinear", align_corners=False)
                for g, m in zip(grads, maps, strict=True))[0, 0]
    heatmap = total.clamp(min=0).float().cpu().numpy()
    peak = heatmap.max()
    return np.nan_to_num(heatmap / peak if peak > 0 else heatmap).astype(np.float32)


def photo_heatmap(classifier: Classifier, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The malignant heat map on the photograph's grid at size = (width, height): a model that squashes the photo
    has its map stretched back over the whole of it; one that crops (`resize: crop`) over the centre square it saw,
    zero outside. An ensemble's map is the mean of its members' (as its probability is the mean of theirs)."""
    if classifier.members:
        return np.mean([photo_heatmap(m, image, size) for m in classifier.members], axis=0).astype(np.float32)
    heatmap = malignant_heatmap(classifier, image)
    if classifier.resize != "crop":
        return _resized(heatmap, size)
    left, top, side = centre_box(*size)
    placed = np.zeros(size[::-1], dtype=np.float32)
    placed[top:top + side, left:left + side] = _resized(heatmap, (side, side))
    return placed


def _resized(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map stretched (bilinear) to size = (width, height)."""
    if heatmap.shape == size[::-1]:
        return heatmap
    return np.asarray(Image.fromarray(heatmap, mode="F").resize(size, Image.BILINEAR)).clip(0, 1)


def overlay_size(image: Image.Image, max_side: int = OVERLAY_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of an overlay: the photograph's aspect ratio, at most `max_side` pixels a side."""
    scale = min(1.0, max_side / max(image.size))
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def overlay(image: Image.Image, heatmap: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The heat map (jet colours) blended over the photograph at overlay_size (a square map is stretched over the
    whole photo, undoing the squash; photo_heatmap places a cropping model's map)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    size = overlay_size(image, max_side)
    photo = image.convert("RGB").resize(size, Image.BICUBIC)
    heat = _resized(heatmap, size)
    blended = show_cam_on_image(np.asarray(photo, dtype=np.float32) / 255.0, heat, use_rgb=True, image_weight=0.6)
    return Image.fromarray(blended)


def explain(classifier: Classifier, image: Image.Image) -> Image.Image:
    """One RGB image -> its Grad-CAM overlay."""
    return overlay(image, photo_heatmap(classifier, image, overlay_size(image)))


def write_overlays(classifier: Classifier, paths: Sequence[str | Path], out_dir: str | Path) -> dict[str, str]:
    """Write <out_dir>/<name>_cam.png for each readable image; returns {source: png path or 'error: reason'}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [Path(p).stem for p in paths]
    uses = Counter(stems)
    taken = {stem for stem, n in uses.items() if n == 1}
    written: dict[str, str] = {}
    for i, path in enumerate(paths):
        try:
            image = load_image(path)
        except ImageError as err:
            written[str(path)] = f"error: {err.reason}"
            continue
        name = stems[i]
        if uses[name] > 1:  # the same name in two folders: number them, never onto another image's name
            number = i
            while f"{stems[i]}_{number}" in taken:
                number += 1
            name = f"{stems[i]}_{number}"
            taken.add(name)
        target = out_dir / f"{name}_cam.png"
        picture = explain(classifier, image)
        atomic_write(target, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        written[str(path)] = str(target)
    return written
