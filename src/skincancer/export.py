"""Export: a trained run to ONNX (dynamic batch, softmax included), checked against PyTorch; engines.OnnxEngine
runs it."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write, find_model_dir, write_json
from .engine import ProbabilitiesAndFeatures
from .engines import FEATURES_NAME, INPUT_NAME, ONNX_FILE, OUTPUT_NAME, ExportError, OnnxEngine, weights_digest
from .predict import load_model
from .provenance import file_sha256

log = logging.getLogger("skincancer")

OPSET = 17  # well inside what onnxruntime 1.32 runs; the TorchScript exporter writes it without onnxscript


def onnx_path(run: str | Path) -> Path:
    """Where a run's ONNX export lives: RUN/model/model.onnx."""
    return find_model_dir(run) / ONNX_FILE


def export_onnx(run: str | Path, out: str | Path | None = None, opset: int = OPSET, check: bool = True) -> Path:
    """Write the run's model as ONNX (input 'image' [batch, 3, S, S] normalised, outputs 'probabilities'
    [batch, classes] and 'features' [batch, D], the pooled features the guard scores) with the preprocessing
    metadata beside it in `<out>.json`; check it against PyTorch."""
    classifier = load_model(run, engine="torch")
    out = Path(out) if out is not None else classifier.source / ONNX_FILE
    diff = write_onnx(classifier.model, int(classifier.meta["image_size"]), out, opset=opset, check=check)
    write_json(out.with_name(out.name + ".json"), {
        **classifier.meta, "onnx": {"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME,
                                    "features": FEATURES_NAME,
                                    "input_layout": "NCHW float32, resized and normalised with mean/std",
                                    "same_padding": "constant",
                                    "max_difference_to_torch": diff,
                                    "weights_sha256": weights_digest(classifier.source),
                                    "onnx_sha256": file_sha256(out)}})
    log.info("exported %s (opset %d); max difference to PyTorch %s", out, opset, diff)
    return out


def write_onnx(model: nn.Module, image_size: int, out: str | Path, opset: int = OPSET,
               check: bool = True) -> float | None:
    """Export any image classifier (logits out) as ONNX with its softmax, its pooled features and a dynamic batch
    axis (atomically); returns the largest probability difference to PyTorch on random input (checked to be
    < 1e-4; the features to 1e-3 of their scale)."""
    out = Path(out)
    wrapped = ProbabilitiesAndFeatures(static_padding(model, image_size)).eval()
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME],
                              do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"},
                                            FEATURES_NAME: {0: "batch"}})

    atomic_write(out, write)
    if not check:
        return None
    with torch.no_grad():  # against the model as trained, not the copy with constant padding that was exported
        expected, expected_features = (t.numpy() for t in ProbabilitiesAndFeatures(model).eval()(example))
    engine = OnnxEngine(out)
    got = engine.probabilities(example.numpy())
    diff = float(np.abs(got - expected).max())
    if diff > 1e-4:
        raise ExportError(f"{out}: ONNX output differs from PyTorch by {diff:.2e} (> 1e-4)")
    features = engine.outputs(example.numpy())[:, got.shape[1]:]
    feature_diff = float(np.abs(features - expected_features).max() / (np.abs(expected_features).max() + 1e-12))
    if feature_diff > 1e-3:
        raise ExportError(f"{out}: ONNX features differ from PyTorch by {feature_diff:.2e} of their scale (> 1e-3)")
    return diff


def static_padding(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of `model` whose TensorFlow-style 'same' convolutions (timm's Conv2dSame, in the tf_ EfficientNets:
    padding worked out from the input's size at every call) pad by constants for `image_size`. Exported, those are
    constant Pads that ONNX Runtime folds into their convolutions, where dynamic ones cost Shape arithmetic, the
    Pads and a layout change around each (a third of a Lite0's time on this CPU; BENCHMARKS.md, "The fast model")."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg

    model = copy.deepcopy(model).eval()
    sizes: dict[nn.Module, list[int]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        sizes[module] = list(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Conv2dSame)]
    if not hooks:
        return model
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for name, module in list(model.named_modules()):
        if module in sizes:
            conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                             module.dilation, module.groups, module.bias is not None)
            conv.load_state_dict(module.state_dict())
            pad = pad_same_arg(sizes[module], list(module.kernel_size), list(module.stride), list(module.dilation))
            model.set_submodule(name, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return model
