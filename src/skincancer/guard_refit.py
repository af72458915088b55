"""`skincancer guard`: fit (or refit) the out-of-distribution guard of a trained run. Apart from guard.py, which
predict and card import: this loads the run through predict and rewrites its card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .card import CARD_FILE, write_card
from .checkpoint import META_FILE, find_model_dir, read_meta, write_json
from .config import load_config
from .data import content_keys
from .guard import FALSE_REJECTION, GuardError, fit_model_guard
from .predict import load_model
from .sources import fold_groups, read_sources


def held_in_images(run: str | Path, train: str | Path | list | None = None, valid: str | Path | None = None
                   ) -> tuple[Path, list[pd.DataFrame], np.ndarray]:
    """The images a finished run's guard is fitted on: its model folder, the training and validation manifests'
    rows (those of its config.yaml unless others are given) and the lesion group of each row, training then
    validation rows (held-out folds keep a lesion's images together)."""
    model_dir = find_model_dir(run)
    meta = read_meta(model_dir)
    if meta.get("unfinished"):
        raise GuardError(f"{model_dir}: saved by a run that has not finished; finish it (`skincancer train --resume`) "
                         "first: training fits the guard at its end")
    if train is None or valid is None:
        path = model_dir.parent / "config.yaml"
        if not path.is_file():
            raise GuardError(f"{run}: no config.yaml naming the run's training data; give --train and --valid")
        config = load_config(path)
        train, valid = train or config.train_paths, valid or config.valid
    frames = [read_sources(paths if isinstance(paths, list) else [paths], meta["labels"]) for paths in (train, valid)]
    both = pd.concat(frames, ignore_index=True)
    return model_dir, frames, np.asarray(fold_groups(both, content_keys(both["filepath"])))


def guard_run(run: str | Path, train: str | Path | None = None, valid: str | Path | None = None,
              false_rejection: float = FALSE_REJECTION, batch_size: int = 32, num_workers: int = 0) -> dict:
    """`skincancer guard`: fit (or refit) the guard of a trained run, on the manifests it trained on (its
    config.yaml) unless others are given; model.json and the model card are updated. Returns the guard's record."""
    model_dir, frames, groups = held_in_images(run, train, valid)
    classifier = load_model(model_dir, engine="torch", guard=False)  # the guard being replaced may be damaged
    meta = classifier.meta
    record = fit_model_guard(classifier.model, meta.get("mode") == "linear", frames[0]["filepath"],
                             frames[1]["filepath"], classifier.transform(), int(meta.get("tta", 1)), model_dir,
                             batch_size, num_workers, false_rejection, groups=groups)
    saved = read_meta(model_dir)
    saved["guard"] = record
    write_json(model_dir / META_FILE, saved)
    write_card(load_model(model_dir, engine="torch"), model_dir / CARD_FILE)
    return record
