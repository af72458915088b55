"""Checkpoints: a run's model folder (safetensors weights + model.json) written atomically and read without pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"
META_REQUIRED = ("backbone", "class_names", "labels", "image_size", "mean", "std", "threshold")


class CheckpointError(RuntimeError):
    pass


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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n"))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(model: nn.Module, meta: dict, directory: str | Path) -> Path:
    """Write weights (safetensors) then metadata (JSON) into `directory`; model.json last marks it complete."""
    directory = Path(directory)
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"model metadata lacks {', '.join(missing)}")
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    write_json(directory / META_FILE, {"format_version": FORMAT_VERSION, **meta})
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
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
    return meta


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors only: never unpickle a file a user hands us."""
    path = model_dir / WEIGHTS_FILE
    if not path.is_file():
        others = sorted(p.name for p in model_dir.glob("*.pt*")) + sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(others)}: pickle files are not loaded, for safety)" if others else ""
        raise CheckpointError(f"{path}: weights file missing{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not fit the model described in model.json ({err})") from None
