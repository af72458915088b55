"""The frozen-feature cache: pooled backbone features of each image and view, on disk, keyed by file content."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from .backbones import bundled_weights_path
from .checkpoint import atomic_write
from .config import TrainConfig
from .data import (
    DataError,
    check_image,
    content_keys,
)
from .datasets import ImageDataset, build_transform
from .engine import run_inference
from .engines import DIHEDRAL
from .runfolder import report_bad

log = logging.getLogger("skincancer")


def feature_cache_dir(config: TrainConfig, prep: dict, view: int) -> Path:
    """One folder per (backbone, weights, preprocessing, view); files inside are keyed by image content."""
    root = Path(config.cache_dir or os.environ.get("SKINCANCER_CACHE") or Path.home() / ".cache" / "skincancer")
    weights = bundled_weights_path(config.backbone) if config.pretrained else None
    key = {
        "backbone": config.backbone, "pretrained": config.pretrained, "image_size": config.image_size,
        "weights": f"{weights.name}:{weights.stat().st_size}" if weights else str(config.pretrained),
        "view": view, **prep, "version": 2, "pooling": config.pooling,
    }
    if not config.pretrained:
        key["seed"] = config.seed  # random weights differ by seed
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / "features" / f"{config.backbone}-{config.image_size}-v{view}-{digest}"


def cached_features(model: nn.Module, paths: pd.Series, config: TrainConfig, prep: dict, view: int,
                    split: str, keys: list[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features for each file (computed once, then read from the cache); second value: mask of usable rows.

    keys: content_keys(paths), when the caller already has them (one hash per file for all views)."""
    directory = feature_cache_dir(config, prep, view)
    keys = content_keys(paths) if keys is None else keys
    files = [directory / k[:2] / f"{k}.npy" if k else None for k in keys]
    todo = [i for i, f in enumerate(files) if f is not None and not f.is_file()]
    log.info("%s features (view %d): %d cached, %d to compute", split, view, len(paths) - len(todo), len(todo))
    bad = {i: check_image(paths.iloc[i]) or "cannot read file" for i, k in enumerate(keys) if k is None}
    if todo:
        base = eval_transform(config, prep)
        transform = (lambda img: DIHEDRAL[view](base(img))) if view else base
        dataset = ImageDataset([paths.iloc[i] for i in todo], None, transform)
        features, errors = run_inference(model, dataset, config.batch_size, config.num_workers, output="features",
                                         desc=f"{split} features")
        for j, reason in errors:
            bad[todo[j]] = reason
        for j, i in enumerate(todo):
            if i not in bad:
                files[i].parent.mkdir(parents=True, exist_ok=True)
                atomic_write(files[i], lambda tmp, row=features[j]: _save_npy(tmp, row))
    report_bad(sorted(bad.items()), paths, split)
    ok = np.array([i not in bad for i in range(len(paths))])
    if not ok.any():
        raise DataError(f"{split}: no readable images")
    loaded = {i: np.load(files[i]) for i in np.flatnonzero(ok)}
    blank = np.full_like(next(iter(loaded.values())), np.nan)
    return np.stack([loaded.get(i, blank) for i in range(len(paths))]), ok


def _save_npy(path: Path, row: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append '.npy' to the temporary name
        np.save(f, row)


def probe_guard_features(model: nn.Module, config: TrainConfig, prep: dict, train_df: pd.DataFrame,
                          valid_df: pd.DataFrame, keys: list[str | None]) -> np.ndarray:
    """The probe's cached features of train + valid, the mean of its first `tta` views (as predictions see them);
    NaN rows for unreadable files."""
    paths = pd.concat([train_df["filepath"], valid_df["filepath"]], ignore_index=True)
    views = [cached_features(model, paths, config, prep, view, "guard", keys) for view in range(config.tta)]
    ok = np.logical_and.reduce([mask for _, mask in views])
    features = np.mean([values for values, _ in views], axis=0)
    features[~ok] = np.nan
    return features


def eval_transform(config: TrainConfig, prep: dict):
    return build_transform(config.inference_size, prep["mean"], prep["std"], "none", prep.get("resize", "squash"))

