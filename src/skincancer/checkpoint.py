"""Checkpoints: a run's model folder (safetensors weights + model.json) written atomically and read without pickle."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import VIEWS
from .errors import CheckpointError
from .provenance import file_sha256

if TYPE_CHECKING:  # torch is imported by the functions that need it: reading model.json must not pay for it
    import torch
    from torch import nn

FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"
FITTED_IMAGES_FILE = "fitted_images.json"  # content hashes of the images a run trained and validated on
META_REQUIRED = ("backbone", "class_names", "labels", "image_size", "mean", "std", "threshold")


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once (os.umask can only be read by setting it)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: a kill mid-save leaves the old file, never half a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON: NaN and infinity (an AUC with one class absent) are written as null."""
    text = json.dumps(_strict(data), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def _strict(value: Any) -> Any:
    """Plain JSON values: numpy/torch scalars and arrays as Python numbers and lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist"):
        return _strict(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    from torch import nn

    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(model: nn.Module, meta: dict, directory: str | Path) -> Path:
    """Write weights (safetensors) then metadata (JSON) into `directory`; model.json last marks it complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"model metadata lacks {', '.join(missing)}")
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    digest = file_sha256(directory / WEIGHTS_FILE)
    write_json(directory / META_FILE, {"format_version": FORMAT_VERSION, **meta, "weights_sha256": digest})
    return directory


def find_model_dir(path: str | Path) -> Path:
    """Accept a run folder, its model/ folder, or model.json itself."""
    path = Path(path)
    for candidate in (path / "model", path, path.parent):
        if (candidate / META_FILE).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or model folder")
    raise CheckpointError(f"{path}: not a trained run (no model/{META_FILE} found)")


def read_meta(model_dir: Path) -> dict:
    path = model_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable model metadata ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return meta


def _meta_problem(meta: dict) -> str | None:
    """What makes a model.json unusable (a hand edit, another tool's file, a newer format), or None."""
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return f"format_version {version!r}: written by a newer skincancer (this one reads {FORMAT_VERSION}); upgrade"
    if not isinstance(meta["backbone"], str) or not meta["backbone"]:
        return f"backbone: expected a timm model name, got {meta['backbone']!r}"
    if ":" in meta["backbone"] or "/" in meta["backbone"]:  # hf-hub:..., a URL: timm would go to the network
        return f"backbone: expected a timm model name (no hub or path), got {meta['backbone']!r}"
    names, labels = meta["class_names"], meta["labels"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        return f"class_names: expected a non-empty list of names, got {names!r}"
    if len(set(names)) != len(names):
        return f"class_names: a name is listed twice in {names}"
    if not isinstance(labels, dict) or any(v not in (0, 1) or isinstance(v, bool) for v in labels.values()):
        return f"labels: expected a map of diagnosis to 0 or 1, got {labels!r}"
    head = meta.get("head", "diagnosis")
    if head not in ("diagnosis", "binary"):
        return f"head: must be 'diagnosis' or 'binary', got {head!r}"
    if head == "diagnosis":
        unlabelled = [n for n in names if n not in labels]
        if unlabelled:
            return f"labels: no label for class {unlabelled[0]!r} of class_names"
        if not any(labels[n] == 1 for n in names) or all(labels[n] == 1 for n in names):
            return f"labels: the classes {names} must include both malignant (1) and benign (0) ones"
    elif len(names) != 2:
        return f"class_names: a binary head has 2 outputs, got {len(names)} names"
    size = meta["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= 4096:
        return f"image_size: expected a whole number of pixels (16-4096), got {size!r}"
    for key in ("mean", "std"):
        values = meta[key]
        if (not isinstance(values, list) or len(values) != 3
                or not all(_finite(v) and (-10 <= v <= 10 if key == "mean" else 1e-3 <= v <= 10) for v in values)):
            kind = "numbers from 0.001 to 10" if key == "std" else "numbers from -10 to 10"
            return f"{key}: expected 3 {kind} (one per RGB channel), got {values!r}"
    threshold = meta["threshold"]
    if not _finite(threshold) or not 0 <= threshold <= 1:
        return f"threshold: expected a probability between 0 and 1, got {threshold!r}"
    if type(meta.get("tta", 1)) is not int or meta.get("tta", 1) not in VIEWS:
        return f"tta: must be 1, 2, 4 or 8, got {meta.get('tta')!r}"
    if meta.get("mode", "linear") not in ("linear", "finetune"):
        return f"mode: must be 'linear' or 'finetune', got {meta.get('mode')!r}"
    positive, negative = meta.get("positive_name", "malignant"), meta.get("negative_name", "benign")
    if not (isinstance(positive, str) and isinstance(negative, str) and positive.strip() and negative.strip()
            and positive != negative):
        return f"positive_name / negative_name: expected two different names, got {positive!r} / {negative!r}"
    # read by cards, pages, fusion and the guard
    for key in ("validation", "environment", "metadata_model", "validation_summary", "guard"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return f"{key}: expected an object of fields, got {type(meta[key]).__name__} {meta[key]!r:.60}"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_weights(model_dir: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Weights from safetensors only: never unpickle a file a user hands us.

    expected_sha256: model.json's `weights_sha256` (older models lack it and are not checked): a
    file that changed since it was saved is refused; so is any weight that is NaN or infinite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = model_dir / WEIGHTS_FILE
    if not path.is_file():
        others = sorted(p.name for p in model_dir.glob("*.pt*")) + sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(others)}: pickle files are not loaded, for safety)" if others else ""
        raise CheckpointError(f"{path}: weights file missing{hint}")
    if expected_sha256 and file_sha256(path) != expected_sha256:
        raise CheckpointError(f"{path}: the file changed since it was saved (its SHA-256 differs from model.json's "
                              "weights_sha256): corrupted or replaced; retrain or restore it")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    broken = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise CheckpointError(f"{path}: weights {broken[0]}{more} contain NaN or infinity: the file is corrupted")
    return weights


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not fit the model described in model.json ({err})") from None
