"""Training checkpoints and exact resume: the full training state after every epoch, and the one reader of last.json."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import CheckpointError, atomic_write, unwrap, write_json
from .config import TrainConfig, load_config
from .data import (
    DataError,
)

log = logging.getLogger("skincancer")


def save_training_state(directory: Path, epoch: int, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
                        scheduler, best_state: dict, progress: dict) -> None:
    """Write checkpoints/epoch-N/ completely, then point checkpoints/last.json at it (an atomic rename).

    A kill at any moment leaves last.json naming a complete epoch. Tensors go to safetensors, the optimiser's
    state to a .pt read back with weights_only=True, everything else to JSON: nothing is ever unpickled."""
    target = directory / f"epoch-{epoch}"
    tensors = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    numpy_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(target / "state.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(target / "optimizer.pt", lambda tmp: torch.save(optimizer.state_dict(), tmp))
    python_state = random.getstate()
    write_json(target / "state.json", {
        "epoch": epoch, **progress, "scheduler": scheduler.state_dict(),
        "rng_numpy": [numpy_state[0], *numpy_state[2:]], "rng_python": [python_state[0], list(python_state[1])],
    })
    write_json(directory / "last.json", {"epoch": epoch, "path": target.name})
    for old in directory.glob("epoch-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(directory: Path, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
                        scheduler, data: str | None = None, processes: int | None = None) -> dict | None:
    """Restore what save_training_state wrote; None when no epoch has completed yet.

    data: training_data_fingerprint of the manifests now; a run whose training or validation images changed since it
    started cannot be continued (the replay would not be the run it claims to be). processes: the number of
    training processes now, which must be the run's (another changes the global batch and the schedule)."""
    check_resume_processes(directory.parent, processes)
    pointer = directory / "last.json"
    if not pointer.is_file():
        if any(directory.glob("epoch-*")):
            raise CheckpointError(f"{pointer}: missing, though {directory} holds epochs: the checkpoint is damaged; "
                                  "start a new run (or train --overwrite into this folder)")
        log.info("no complete epoch in %s: starting from the beginning", directory)
        return None
    try:
        return _restore(directory, pointer, model, ema, optimizer, scheduler, data)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"{directory}: damaged checkpoint, cannot resume ({type(err).__name__}: {err}); "
                              "start a new run (or train --overwrite into this folder)") from None


def resume_processes(run: Path) -> int | None:
    """How many training processes the interrupted run in `run` used (None: no complete epoch, or not recorded)."""
    try:
        pointer = json.loads((run / "checkpoints" / "last.json").read_text())
        value = json.loads((run / "checkpoints" / pointer["path"] / "state.json").read_text()).get("processes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no checkpoint yet, or a damaged one: load_training_state says which
    return value if isinstance(value, int) else None


def check_resume_processes(run: Path, processes: int | None) -> None:
    recorded = resume_processes(run)
    if processes is None or recorded is None or recorded == processes:
        return
    how = f"with --nproc {recorded}" if recorded > 1 else "without --nproc"
    raise DataError(f"{run}: this run trained with {recorded} process{'es' if recorded > 1 else ''}, not "
                    f"{processes}; resume it {how} (`skincancer train --resume {run}"
                    f"{' --nproc ' + str(recorded) if recorded > 1 else ''}`): another number would change the "
                    "global batch and the learning-rate schedule midway")


def _restore(directory: Path, pointer: Path, model: nn.Module, ema, optimizer, scheduler, data: str | None) -> dict:
    source = directory / json.loads(pointer.read_text())["path"]
    state = json.loads((source / "state.json").read_text())
    if data is not None and state.get("data") not in (None, data):
        raise DataError(f"{directory.parent}: the training or validation manifest changed since this run started "
                        "(other images, labels or classes); resume needs the same data: start a new run instead")
    tensors = load_file(str(source / "state.safetensors"))

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    unwrap(model).load_state_dict(part("model."))
    if ema is not None:
        ema.module.load_state_dict(part("ema."))
    optimizer.load_state_dict(torch.load(source / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    name, *rest = state["rng_numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), *rest))
    random.setstate((state["rng_python"][0], tuple(state["rng_python"][1]), None))
    return {**state, "best": part("best.")}


def training_data_fingerprint(train_df: pd.DataFrame, valid_df: pd.DataFrame) -> str:
    """Which images, with which labels, a run trains and validates on (ids, not paths: a moved data folder is the
    same data)."""
    digest = hashlib.sha1()
    for name, frame in (("train", train_df), ("valid", valid_df)):
        digest.update(name.encode())
        for row in frame[["image_id", "diagnosis", "label"]].astype(str).itertuples(index=False):
            digest.update("\t".join(row).encode() + b"\n")
    return digest.hexdigest()


def resume_config(run: str | Path, quiet: bool = False) -> TrainConfig:
    """The configuration an interrupted run was started with (its config.yaml); quiet: no word on a moved run."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise DataError(f"{run}: not a run folder to resume (no config.yaml)")
    config = load_config(path)
    if Path(config.out).absolute() != Path(run).absolute() and not quiet:  # a copied or moved run: resumed here
        log.info("%s: resuming in %s (config.yaml says out: %s)", path, run, config.out)
    return config.replace(out=str(run))

