"""Training: linear probe on cached frozen features, or full fine-tuning; writes a self-describing run folder."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import __version__
from .backbones import build_model, bundled_weights_path, count_parameters, preprocessing
from .card import CARD_FILE, write_card
from .checkpoint import FITTED_IMAGES_FILE, CheckpointError, atomic_write, save_model, unwrap, write_json
from .config import DEFAULT_LABELS, TrainConfig, config_to_dict, load_config
from .data import (
    DataError,
    ImageDataset,
    build_transform,
    check_files,
    check_image,
    check_labels_agree,
    content_keys,
    manifest_labels,
    same_key,
)
from .distributed import (
    ShardedSampler,
    World,
    barrier,
    device_for,
    gather_rows,
    init_world,
    mean_over_ranks,
    share_buffers,
    shutdown,
)
from .engine import DIHEDRAL, make_loader, run_inference, train_one_epoch
from .guard import GuardError, fit_model_guard
from .metadata import MetadataModel, has_metadata
from .metadata import records as metadata_records
from .metrics import choose_threshold, roc_auc, validation_summary
from .predict import load_model
from .progress import progress
from .provenance import ENVIRONMENT_FILE, data_fingerprint, describe, environment
from .sources import fold_groups, grouped_folds, read_sources, source_table

log = logging.getLogger("skincancer")


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a model as `config` says; returns the run folder (with model/ inside).

    resume=True continues a fine-tuning run from its last complete epoch (see `resume_config`).
    overwrite=True replaces a finished or interrupted run in `config.out`; without it such a folder is an error."""
    if not config.train or not config.valid or not config.out:
        raise DataError("train, valid and out are all required")
    started = time.time()
    out = Path(config.out)
    world = init_world()
    if world.distributed and config.mode == "linear" and not world.is_main:
        return out  # the linear probe is one process's work (features are cached); rank 0 does it
    if resume and is_finished(out):
        log.info("%s: the run has finished already; nothing to resume", out)
        return out
    if resume and config.mode == "linear":
        log.info("%s: a linear run has no epochs to resume; fitting it again (features come from the cache)", out)
    replace = False
    # a folder this call makes is removed again if the inputs do not check out: a failed start leaves nothing
    created = world.is_main and not resume and not (out.is_dir() and any(out.iterdir()))
    made = _first_missing(out)  # the outermost folder `mkdir` is about to make (None: `out` exists)
    if world.is_main:
        if not resume:
            replace = _claim_out(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
    old_log = (out / "train.log").stat().st_size if world.is_main and (out / "train.log").is_file() else 0
    file_log = _log_to(out / "train.log") if world.is_main else logging.NullHandler()
    begun = False  # the inputs checked out: the run writes its files
    try:
        seed_everything(config.seed)
        train_df = read_sources(config.train_paths, config.labels)
        valid_df = read_sources([config.valid], config.labels)
        # every file decoded once up front (about 1 ms each): every process drops the same unreadable files, and a
        # split with none left stops here, not inside an epoch (or one process of a multi-process run)
        train_df = _readable(train_df, _train_name(config), "train")
        valid_df = _readable(valid_df, config.valid, "valid")
        keys = content_keys([*train_df["filepath"], *valid_df["filepath"]])  # each file hashed once
        device = device_for(world, config.device)
        env = {}  # only rank 0 saves the model: the others neither need it nor run git beside it
        if world.is_main:
            data = {split: {"images": len(df), "fingerprint": data_fingerprint(split_keys, df["diagnosis"]),
                            "diagnoses": {str(k): int(n) for k, n in sorted(df["diagnosis"].value_counts().items())}}
                    for split, df, split_keys in (("train", train_df, keys[:len(train_df)]),
                                                  ("valid", valid_df, keys[len(train_df):]))}
            env = _run_environment(out, {**environment(str(device)), "data": data}, resume)
            log.info("%s; command: %s", describe(env), " ".join(sys.argv))
        _warn_shared_images(train_df, valid_df, keys, config.valid)
        class_names = _class_names(config, train_df, valid_df)
        train_targets, valid_targets = _targets(config, class_names, train_df), _targets(config, class_names, valid_df)
        log.info("train: %d images (%s); valid: %d images (%s)", len(train_df), _counts(train_df),
                 len(valid_df), _counts(valid_df))
        if valid_df["label"].nunique() < 2:
            raise DataError(f"{config.valid}: validation data needs both malignant and benign images")
        _check_select_on(config, train_df, valid_df)
        metadata_model = fit_metadata(config, train_df, train_targets, len(class_names)) if config.metadata else None
        if replace:  # the inputs are readable: only now does the old run go, its log lines too
            _clear_run(out)
            _drop_log_head(file_log, out / "train.log", old_log)
        begun = True
        if world.is_main:  # written once the inputs check out, so a failed start leaves an old run's config alone
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(config_to_dict(config))))
            # from the start, so that a model saved by an interrupted run is covered too
            write_fitted_images(out / "model", keys[:len(train_df)], keys[len(train_df):],
                                fitted_on_valid=config.mode == "linear" and config.linear_fit == "train+valid")
            write_json(out / "model" / ENVIRONMENT_FILE, env)  # read back by --resume; model.json gets it too

        model = build_model(config.backbone, len(class_names), pretrained=config.pretrained, pooling=config.pooling)
        prep = preprocessing(model)
        model.to(device)
        meta = {
            "backbone": config.backbone, "mode": config.mode, "head": config.head, "class_names": class_names,
            "labels": config.labels, "positive_name": config.positive_name, "negative_name": config.negative_name,
            "image_size": config.inference_size, "train_image_size": config.image_size, **prep, "threshold": 0.5,
            "threshold_policy": config.threshold_policy, "tta": config.tta, "pooling": config.pooling,
            "class_balance": config.class_balance, "sources": source_table(train_df, valid_df),
            **({"select_on": config.select_on} if config.select_on else {}),
            "skincancer_version": __version__, "environment": env,
        }
        if world.is_main:
            _print_summary(model, config)
        writer = SummaryWriter(str(out / "tensorboard")) if world.is_main else _NoWriter()
        held_out = None
        if config.mode == "linear":
            held_out = fit_linear(model, config, prep, train_df, train_targets, valid_df, valid_targets, class_names,
                                  out, writer, keys)
            epoch = 0
        else:
            epoch = fit_finetune(model, config, prep, train_df, train_targets, valid_df, valid_targets, class_names,
                                 meta, out, writer, resume=resume, world=world)
            if not world.is_main:
                return out

        guard_valid = None  # the validation pass's features, for the guard of a fine-tuned model
        valid_split = valid_df  # a probe fitted on train+valid replaces valid_df by its out-of-fold rows below
        if held_out is not None:
            # A head fitted on train+valid: threshold and validation figures from its out-of-fold predictions.
            valid_probs, valid_df = held_out
            meta["validation_source"] = "out-of-fold (train+valid)"
        else:
            # Otherwise they always come from the saved model's own outputs on validation.
            valid_set = ImageDataset(valid_df["filepath"], None, _eval_transform(config, prep))
            outputs, errors = run_inference(model, valid_set, config.batch_size, config.num_workers,
                                            tta=config.tta, output="probs+features", desc="validating")
            valid_probs, guard_valid = outputs[:, :len(class_names)], outputs[:, len(class_names):]
            _report_bad(errors, valid_df["filepath"], "validation")
            meta["validation_source"] = "valid"
        meta.update(finish_validation(valid_probs, valid_df, class_names, meta, config, out))
        if metadata_model is not None:
            meta["metadata_model"] = metadata_model.to_dict()
            # the metadata model saw the training images: validate it on validation images only
            only_valid = np.ones(len(valid_df), bool)
            if "split" in valid_df:
                only_valid = (valid_df["split"] == "valid").to_numpy()
            meta["validation"].update(metadata_validation(metadata_model, valid_probs[only_valid],
                                                          valid_df[only_valid].reset_index(drop=True), class_names,
                                                          config))
        if config.guard:
            frozen = config.mode == "linear"
            fitted = _probe_guard_features(model, config, prep, train_df, valid_split, keys) if frozen else None
            try:
                meta["guard"] = fit_model_guard(
                    model, frozen, train_df["filepath"], valid_split["filepath"], _eval_transform(config, prep),
                    config.tta, out / "model", config.batch_size, config.num_workers, config.guard_false_rejection,
                    valid_features=guard_valid, fitted_features=fitted, seed=config.seed,
                    groups=fold_groups(pd.concat([train_df, valid_split], ignore_index=True), keys))
            except GuardError as err:  # a smoke-test-sized split: the model works, unguarded, and says so
                log.warning("no out-of-distribution guard: %s", err)
        meta["epoch"] = epoch
        meta["train_seconds"] = round(time.time() - started, 1)
        save_model(model, meta, out / "model")
        write_card(load_model(out / "model", engine="torch"), out / "model" / CARD_FILE)
        writer.add_scalar("valid/final_auc", meta["validation"]["auc"], epoch)
        writer.close()
        model.cpu()
        log.info("%s AUC %.4f; threshold %.4f (%s): sensitivity %.3f, specificity %.3f; %s in %.0f s",
                 meta["validation_source"], meta["validation"]["auc"], meta["threshold"], config.threshold_policy,
                 meta["validation"]["sensitivity"], meta["validation"]["specificity"], out / "model",
                 meta["train_seconds"])
        return out
    except BaseException as err:
        if not (created and not begun):  # a log that stays says why the run stopped (the console shows it too)
            file_log.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "training stopped: %s",
                                           (str(err) or type(err).__name__,), None))
        raise
    finally:
        log.removeHandler(file_log)
        file_log.close()
        shutdown(world)
        if created and not begun:
            _remove_start(out, made)


# ---------------------------------------------------------------- linear probe


def fit_linear(model: nn.Module, config: TrainConfig, prep: dict, train_df: pd.DataFrame, train_targets: np.ndarray,
               valid_df: pd.DataFrame, valid_targets: np.ndarray, class_names: list[str], out: Path,
               writer: SummaryWriter, keys: list[str | None]) -> tuple[np.ndarray, pd.DataFrame] | None:
    """Frozen backbone; logistic regression on cached features; its weights become the model's classifier.

    C is chosen by stratified k-fold cross-validation (more stable than 150 validation images). With
    linear_fit='train+valid' the folds span both splits, the head is fitted on both, and the out-of-fold
    probabilities (with the rows they belong to) come back for choosing the threshold; otherwise None.

    The head is trained on `feature_views` dihedral views of each image; held-out images are scored as the model
    will score them, by the mean of their first `tta` views' probabilities.

    keys: content_keys of the training then the validation files (hashed once a run, by `train`)."""
    pooled = config.linear_fit == "train+valid"
    fit_df = pd.concat([train_df, valid_df], ignore_index=True) if pooled else train_df
    targets = np.concatenate([train_targets, valid_targets]) if pooled else train_targets
    views, scored = config.feature_views, config.tta

    if len(keys) != len(train_df) + len(valid_df):
        raise ValueError(f"fit_linear: {len(keys)} content keys for {len(train_df)} + {len(valid_df)} files")
    train_keys, valid_keys = keys[:len(train_df)], keys[len(train_df):]

    def view_features(paths: pd.Series, split: str, n: int, file_keys: list) -> tuple[np.ndarray, np.ndarray]:
        """[n views, usable images, D] and the mask of usable images (readable in every view)."""
        per_view = [cached_features(model, paths, config, prep, view, split, file_keys) for view in range(n)]
        ok = np.logical_and.reduce([mask for _, mask in per_view])
        return np.stack([features[ok] for features, _ in per_view]), ok

    x, ok = view_features(fit_df["filepath"], "train+valid" if pooled else "train", max(views, scored),
                          keys if pooled else train_keys)
    y = targets[ok]
    groups = fold_groups(fit_df, keys if pooled else train_keys)[ok]  # a lesion's images stay in one fold
    judged = _judged(config, fit_df)[ok]  # the rows whose out-of-fold AUC chooses C (--select-on)
    if not pooled:
        valid_x, valid_ok = view_features(valid_df["filepath"], "valid", scored, valid_keys)
        valid_labels = valid_df["label"].to_numpy()[valid_ok]
        valid_judged = _judged(config, valid_df)[valid_ok]
    positive = _positive_indices(config, class_names)
    is_positive = np.isin(y, positive).astype(int)
    weight = None if config.class_balance == "none" else "balanced"

    def fit(rows: np.ndarray, c: float) -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
        mean, std = x[0, rows].mean(0), x[0, rows].std(0)
        # a near-constant feature (std 2e-4 against a median of 0.4 in the demo's) would be scaled up thousands of
        # times, and a new image that moves it a little would swing the logits to 0 or 1: floor the spread
        std = np.maximum(std, 0.1 * np.median(std) + 1e-6)
        clf = LogisticRegression(C=c, class_weight=weight, max_iter=3000)
        clf.fit(((x[:views, rows] - mean) / std).reshape(-1, x.shape[-1]), np.tile(y[rows], views))
        return clf, mean, std

    def proba(fitted: tuple, features: np.ndarray) -> np.ndarray:
        """features [views, N, D] -> probabilities [N, classes], the mean over the first `tta` views."""
        clf, mean, std = fitted
        return np.mean([clf.predict_proba((features[v] - mean) / std) for v in range(scored)], axis=0)

    folds = min(5, int(np.bincount(y[judged]).min())) if judged.any() else 0
    if pooled and folds < 2:
        raise DataError(f"{_train_name(config)} + {config.valid}: too few images of a class for cross-validation")
    splits = _source_folds(y, groups, judged, folds, config.seed) if folds >= 2 else []
    rows, best = [], None
    for c in progress(config.linear_c, desc="fitting linear head", unit="C", leave=False):
        cv_auc, oof = float("nan"), np.full((len(y), len(class_names)), np.nan)
        if folds >= 2:
            for kept, held in splits:
                oof[held] = proba(fit(kept, c), x[:, held])
            cv_auc = roc_auc(is_positive[judged], oof[judged][:, positive].sum(1))
        row = {"C": c, "cv_auc": cv_auc}
        fitted = fit(np.arange(len(y)), c)
        if not pooled:
            row["valid_auc"] = roc_auc(valid_labels[valid_judged],
                                       proba(fitted, valid_x[:, valid_judged])[:, positive].sum(1))
        score = cv_auc if folds >= 2 and not math.isnan(cv_auc) else row["valid_auc"]
        rows.append(row)
        for key, value in row.items():
            if key != "C":
                writer.add_scalar(f"linear/{key}", value, len(rows))
        log.info("linear head C=%g: %s", c, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "C"))
        if best is None or score > best[0]:
            best = (score, c, fitted, oof)
    atomic_write(out / "summary.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    _, c, (clf, mean, std), oof = best
    log.info("chose C=%g by %s AUC %.4f (%d images)", c, "cross-validated" if folds >= 2 else "validation", best[0],
             len(y))
    weight_matrix, bias = clf.coef_, clf.intercept_
    if weight_matrix.shape[0] == 1:  # sklearn's binary case: one logit for class 1; softmax over [0, w] is the same
        weight_matrix, bias = np.vstack([np.zeros_like(weight_matrix), weight_matrix]), np.concatenate([[0.0], bias])
    # Fold the standardisation into the layer: w.(x - m)/s + b = (w/s).x + (b - w.(m/s)).
    folded_w = weight_matrix / std
    folded_b = bias - (weight_matrix * (mean / std)).sum(1)
    classifier = unwrap(model).get_classifier()
    with torch.no_grad():
        classifier.weight.copy_(torch.as_tensor(folded_w, dtype=torch.float32))
        classifier.bias.copy_(torch.as_tensor(folded_b, dtype=torch.float32))
    if not pooled:
        return None
    held_out = fit_df.assign(split=["train"] * len(train_df) + ["valid"] * len(valid_df))
    return oof, held_out[ok].reset_index(drop=True)


def _source_folds(y: np.ndarray, groups: np.ndarray, judged: np.ndarray, folds: int, seed: int) -> list:
    """Grouped, stratified folds over the judged rows (--select-on's source, or all); the other sources' rows are
    training rows in every fold (except a copy of a held-out image), so the judged source's folds are the same with
    or without them."""
    rows, others = np.flatnonzero(judged), np.flatnonzero(~judged)
    splits = []
    for kept, held in grouped_folds(y[rows], groups[rows], folds, seed):
        extra = others[~np.isin(groups[others], groups[rows[held]])]
        splits.append((np.concatenate([rows[kept], extra]), rows[held]))
    return splits


def _probe_guard_features(model: nn.Module, config: TrainConfig, prep: dict, train_df: pd.DataFrame,
                          valid_df: pd.DataFrame, keys: list[str | None]) -> np.ndarray:
    """The probe's cached features of train + valid, the mean of its first `tta` views (as predictions see them);
    NaN rows for unreadable files."""
    paths = pd.concat([train_df["filepath"], valid_df["filepath"]], ignore_index=True)
    views = [cached_features(model, paths, config, prep, view, "guard", keys) for view in range(config.tta)]
    ok = np.logical_and.reduce([mask for _, mask in views])
    features = np.mean([values for values, _ in views], axis=0)
    features[~ok] = np.nan
    return features


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
        base = _eval_transform(config, prep)
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
    _report_bad(sorted(bad.items()), paths, split)
    ok = np.array([i not in bad for i in range(len(paths))])
    if not ok.any():
        raise DataError(f"{split}: no readable images")
    loaded = {i: np.load(files[i]) for i in np.flatnonzero(ok)}
    blank = np.full_like(next(iter(loaded.values())), np.nan)
    return np.stack([loaded.get(i, blank) for i in range(len(paths))]), ok


def _save_npy(path: Path, row: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append '.npy' to the temporary name
        np.save(f, row)


# ---------------------------------------------------------------- fine-tuning


def fit_finetune(model: nn.Module, config: TrainConfig, prep: dict, train_df: pd.DataFrame, train_targets: np.ndarray,
                 valid_df: pd.DataFrame, valid_targets: np.ndarray, class_names: list[str], meta: dict, out: Path,
                 writer: SummaryWriter, resume: bool = False, world: World = World()) -> int:
    """Whole network, AdamW + warmup/cosine, class balancing, early stopping on validation AUC; best kept.

    After every epoch the full training state goes to out/checkpoints (atomically), so `resume` replays from the
    last complete epoch exactly: weights, EMA, optimiser, schedule, shuffling order and random number generators."""
    train_set = ImageDataset(train_df["filepath"], train_targets, build_transform(
        config.image_size, prep["mean"], prep["std"], config.augment))
    valid_set = ImageDataset(valid_df["filepath"], valid_targets, _eval_transform(config, prep))
    counts = np.bincount(train_targets, minlength=len(class_names)).astype(float)
    if (counts == 0).any():
        missing = [n for n, c in zip(class_names, counts, strict=True) if c == 0]
        raise DataError(f"{_train_name(config)}: no training images of class(es) {', '.join(missing)}")
    class_weights = counts.sum() / (len(counts) * counts)
    # The order of epoch e depends on (seed, e) alone: resumes replay it, and DDP ranks split it without overlap.
    sampler = ShardedSampler(len(train_set), world, config.seed,
                             weights=class_weights[train_targets] if config.class_balance == "sampler" else None)
    shuffle = torch.Generator()  # seeds the loader workers' augmentation, re-seeded every epoch
    loss_weights = None
    if config.class_balance == "weighted_loss":
        loss_weights = torch.as_tensor(class_weights, dtype=torch.float32)
    device = next(model.parameters()).device
    if loss_weights is not None:
        loss_weights = loss_weights.to(device)
    loss_fn = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)
    loader = make_loader(train_set, config.batch_size, config.num_workers, shuffle=True, sampler=sampler,
                         generator=shuffle)
    steps_per_epoch = len(loader) if not config.max_steps_per_epoch else min(config.max_steps_per_epoch, len(loader))
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    trained = model
    if world.distributed:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    evaluated = ema.module if ema is not None else model  # the weights we validate and keep
    positive = _positive_indices(config, class_names)
    valid_labels = valid_df["label"].to_numpy()
    judged = _judged(config, valid_df)  # the validation images that choose the epoch (--select-on)
    best_auc, best_epoch, best_state, rows, start = -1.0, 0, None, [], 1
    data = _data_fingerprint(train_df, valid_df)
    if resume:
        state = load_training_state(out / "checkpoints", model, ema, optimizer, scheduler, data=data,
                                    processes=world.size)
        if state is not None:
            best_state, rows = state["best"], state["rows"]
            best_auc, best_epoch, start = state["best_auc"], state["best_epoch"], state["epoch"] + 1
            log.info("resuming after epoch %d (best %d, validation AUC %.4f)", state["epoch"], best_epoch, best_auc)
    for epoch in range(start, config.epochs + 1):
        if config.patience and epoch - 1 - best_epoch >= config.patience:
            break  # the interrupted run had already stopped early
        tic = time.time()
        shuffle.manual_seed(config.seed * 1_000_003 + epoch + 7919 * world.rank)
        sampler.set_epoch(epoch)
        on_step = (lambda step, loss, start=(epoch - 1) * steps_per_epoch: ema.update(model, step=start + step)
                   ) if ema is not None else None
        train_loss, errors = train_one_epoch(trained, loader, optimizer, scheduler, loss_fn, epoch,
                                             config.max_steps_per_epoch, on_step=on_step)
        _report_bad(errors, train_df["filepath"], "train")
        share_buffers(world, model, *([ema.module] if ema is not None else []))  # validate and keep rank 0's model
        train_loss = mean_over_ranks(world, train_loss, device)
        if math.isnan(train_loss):  # no batch had a readable image (a non-finite loss raises in train_one_epoch)
            raise DataError(f"{_train_name(config)}: no training image could be read in epoch {epoch} (listed above)")
        shard = np.arange(world.rank, len(valid_set), world.size)  # each rank validates a slice; gathered
        shard_set = ImageDataset(valid_df["filepath"].iloc[shard], valid_targets[shard], valid_set.transform)
        # keep=last validates each epoch for the record only (the kept model is re-validated with all its views
        # afterwards), so one view suffices there; keep=best selects on it, with the model's own views
        views = config.tta if config.keep == "best" else 1
        probs, errors = run_inference(evaluated, shard_set, config.batch_size, config.num_workers, tta=views,
                                      desc="validating")
        probs = gather_rows(world, probs, shard, len(valid_set))
        errors = [(int(shard[i]), reason) for i, reason in errors]
        ok = ~np.isnan(probs).any(1)
        if not ok.any():  # the files went bad during training; _readable decoded them at the start
            _report_bad(errors, valid_df["filepath"], "valid")
            raise DataError(f"{config.valid}: no validation image could be read in epoch {epoch} (listed above)")
        valid_loss = float(nn.functional.nll_loss(torch.log(torch.as_tensor(probs[ok]).clamp_min(1e-12)),
                                                  torch.as_tensor(valid_targets[ok])))
        auc = roc_auc(valid_labels[ok & judged], probs[ok & judged][:, positive].sum(1))
        row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_auc": auc,
               "valid_views": views, "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - tic, 1)}
        rows.append(row)
        if world.is_main:
            atomic_write(out / "summary.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
        for key in ("train_loss", "valid_loss", "valid_auc", "lr"):
            writer.add_scalar(key.replace("_", "/", 1), row[key], epoch)
        improved = auc > best_auc or config.keep == "last"
        if improved:
            best_auc, best_epoch = auc, epoch
            best_state = {k: v.detach().clone() for k, v in unwrap(evaluated).state_dict().items()}
            if world.is_main:
                save_model(evaluated, {**meta, "epoch": epoch, "validation": {"auc": auc}, "unfinished": True},
                           out / "model")
        if world.is_main:
            save_training_state(out / "checkpoints", epoch, model, ema, optimizer, scheduler, best_state,
                                {"best_auc": best_auc, "best_epoch": best_epoch, "rows": rows, "data": data,
                                 "processes": world.size})
        barrier(world)
        log.info("epoch %d/%d: train loss %.4f, valid loss %.4f, valid AUC %.4f%s (%.0f s)", epoch, config.epochs,
                 train_loss, valid_loss, auc, " *kept*" if improved else "", row["seconds"])
        if config.patience and epoch - best_epoch >= config.patience:
            log.info("early stop: no validation AUC gain for %d epochs", config.patience)
            break
    unwrap(model).load_state_dict(best_state)
    return best_epoch


# ---------------------------------------------------------------- resumable training state


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

    data: _data_fingerprint of the manifests now; a run whose training or validation images changed since it
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


def _data_fingerprint(train_df: pd.DataFrame, valid_df: pd.DataFrame) -> str:
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
    return dataclasses.replace(config, out=str(run))


# ---------------------------------------------------------------- metadata


def fit_metadata(config: TrainConfig, train_df: pd.DataFrame, train_targets: np.ndarray,
                 num_classes: int) -> MetadataModel:
    """p(class | age, sex) from the training manifest's metadata columns (see skincancer.metadata)."""
    if not has_metadata(train_df):
        raise DataError(f"{_train_name(config)}: metadata is on but the manifest has no age_approximate or sex column; "
                        "index it with --metadata META.csv")
    rows = metadata_records(train_df, _train_name(config))
    model = MetadataModel.fit(rows, train_targets, num_classes)
    log.info("metadata model fitted on %d of %d training images with age or sex",
             sum(r is not None for r in rows), len(rows))
    return model


def metadata_validation(model: MetadataModel, valid_probs: np.ndarray, valid_df: pd.DataFrame,
                        class_names: list[str], config: TrainConfig) -> dict:
    """Validation AUC with metadata fused (the threshold stays the image-only one, used when none is given)."""
    if not has_metadata(valid_df):
        log.info("validation has no metadata; the metadata model is stored but not validated")
        return {}
    rows = metadata_records(valid_df, str(config.valid))
    fused = model.fuse(valid_probs, rows)
    ok = ~np.isnan(fused).any(1)
    labels = valid_df["label"].to_numpy()
    positive = _positive_indices(config, class_names)
    figures = {"n_with_metadata": int(sum(model.covers(r) for r, good in zip(rows, ok, strict=True) if good)),
               "auc_with_metadata": roc_auc(labels[ok], fused[ok][:, positive].sum(1)),
               # the same images without their metadata: the like-for-like comparison
               "auc_same_images_without_metadata": roc_auc(labels[ok], valid_probs[ok][:, positive].sum(1))}
    if config.head == "diagnosis":
        for c, name in enumerate(class_names):
            is_class = (valid_df["diagnosis"].to_numpy() == name)[ok]
            figures[f"auc_{name}_with_metadata"] = roc_auc(is_class.astype(int), fused[ok, c])
    log.info("validation AUC with metadata fused: %.4f, without: %.4f (the same %d images; %d with metadata)",
             figures["auc_with_metadata"], figures["auc_same_images_without_metadata"], int(ok.sum()),
             figures["n_with_metadata"])
    return figures


# ---------------------------------------------------------------- helpers


def finish_validation(valid_probs: np.ndarray, valid_df: pd.DataFrame, class_names: list[str], meta: dict,
                      config: TrainConfig, out: Path) -> dict:
    """Choose the threshold on validation and record validation figures (and predictions) for the model card."""
    ok = ~np.isnan(valid_probs).any(1) & _judged(config, valid_df)  # --select-on: that source's images choose
    positive = _positive_indices(config, class_names)
    malignant = valid_probs[:, positive].sum(1)
    labels = valid_df["label"].to_numpy()
    threshold = choose_threshold(labels[ok], malignant[ok], config.threshold_policy)
    validation = validation_summary(labels[ok], malignant[ok], threshold)
    if config.head == "diagnosis" and "diagnosis" in valid_df:
        for c, name in enumerate(class_names):
            is_class = (valid_df["diagnosis"].to_numpy() == name)[ok]
            validation[f"auc_{name}"] = roc_auc(is_class.astype(int), valid_probs[ok, c])
    table = pd.DataFrame({"image_id": valid_df["image_id"], "label": labels,
                          **{name: valid_probs[:, c] for c, name in enumerate(class_names)},
                          config.positive_name: malignant})
    if "split" in valid_df:  # out-of-fold predictions over train+valid: which split each row came from
        table["split"] = valid_df["split"].to_numpy()
    if "source" in valid_df:
        table["source"] = valid_df["source"].to_numpy()
    atomic_write(out / "valid_predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_json(out / "valid_metrics.json", validation)
    return {"threshold": threshold, "validation": validation}


def _class_names(config: TrainConfig, train_df: pd.DataFrame, valid_df: pd.DataFrame) -> list[str]:
    for source, frame in ((_train_name(config), train_df), (config.valid, valid_df)):
        check_labels_agree(frame, config.labels, source)
    if config.head == "binary":
        return [config.negative_name, config.positive_name]
    label_map = ", ".join(f"{k}={v}" for k, v in config.labels.items())
    for source, frame in ((_train_name(config), train_df), (config.valid, valid_df)):
        unmapped = sorted(set(frame["diagnosis"]) - set(config.labels))
        if unmapped:
            own = manifest_labels(frame)
            hint = (f" (this manifest's own: --labels {','.join(f'{k}={v}' for k, v in own.items())})"
                    if own else "")
            raise DataError(f"{source}: diagnosis {', '.join(map(str, unmapped))} is not in the label map "
                            f"({label_map}); add it to --labels (or labels: in the config){hint}")
    present = set(train_df["diagnosis"])
    names = [name for name in config.labels if name in present]
    # the default vocabulary's other diagnoses are simply not this model's; entries a user added are named
    absent = [name for name in config.labels if name not in present and DEFAULT_LABELS.get(name) != config.labels[name]]
    if absent:
        log.warning("label map entries with no training images, left out of the model's classes: %s",
                    ", ".join(absent))
    unknown = sorted(set(valid_df["diagnosis"]) - set(names))
    if unknown:
        raise DataError(f"{config.valid}: diagnosis {', '.join(unknown)} not among the training classes {names}")
    if len(names) < 2:
        raise DataError(f"{_train_name(config)}: need at least two diagnoses to train, found {names}")
    return names


def _targets(config: TrainConfig, class_names: list[str], frame: pd.DataFrame) -> np.ndarray:
    if config.head == "binary":
        return frame["label"].to_numpy().astype(int)
    index = {name: i for i, name in enumerate(class_names)}
    return frame["diagnosis"].map(index).to_numpy().astype(int)


def _positive_indices(config: TrainConfig, class_names: list[str]) -> list[int]:
    if config.head == "binary":
        return [1]
    return [i for i, name in enumerate(class_names) if config.labels[name] == 1]


def _train_name(config: TrainConfig) -> str:
    return " + ".join(config.train_paths)


def _judged(config: TrainConfig, frame: pd.DataFrame) -> np.ndarray:
    """The rows whose held-out predictions choose the model and its threshold: those of `select_on`, or all."""
    if not config.select_on:
        return np.ones(len(frame), bool)
    return (frame["source"] == config.select_on).to_numpy()


def _check_select_on(config: TrainConfig, train_df: pd.DataFrame, valid_df: pd.DataFrame) -> None:
    """--select-on names a source with held-out images of both labels (validation; for a probe fitted on
    train+valid, either split)."""
    if not config.select_on:
        return
    held = pd.concat([train_df, valid_df]) if config.mode == "linear" and config.linear_fit == "train+valid" \
        else valid_df
    chosen = held[held["source"] == config.select_on]
    if chosen.empty:
        raise DataError(f"select_on: no held-out images of source {config.select_on!r}; the sources are "
                        f"{', '.join(sorted(set(held['source'])))}")
    if chosen["label"].nunique() < 2:
        raise DataError(f"select_on: source {config.select_on!r} needs held-out images of both labels to choose on")


def _eval_transform(config: TrainConfig, prep: dict):
    return build_transform(config.inference_size, prep["mean"], prep["std"], "none")


def _counts(frame: pd.DataFrame) -> str:
    return ", ".join(f"{k} {v}" for k, v in frame["diagnosis"].value_counts().sort_index().items())


RUN_RESULTS = ("model", "checkpoints", "tensorboard", "summary.csv", "valid_predictions.csv", "valid_metrics.json")


def is_finished(out: Path) -> bool:
    """A saved, complete model (not the placeholder an interrupted run keeps)."""
    try:
        meta = json.loads((out / "model" / "model.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and not meta.get("unfinished") and "train_seconds" in meta


def check_start(config: TrainConfig, overwrite: bool = False, resume: bool = False) -> None:
    """What `train` refuses at once, checked without writing anything: the CLI runs it before torchrun starts N
    processes that would each fail on it."""
    if not config.train or not config.valid or not config.out:
        raise DataError("train, valid and out are all required")
    for path in (*config.train_paths, config.valid):
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or folder")
    if not resume:
        _claim_out(Path(config.out), overwrite)


def _claim_out(out: Path, overwrite: bool) -> bool:
    """Refuse to train into a folder that holds a run (unless `overwrite`) or anything that is not a run: a finished
    model or an interrupted one's checkpoints are never replaced silently. True: a run there is to be replaced
    (by _clear_run, once the new run's inputs have been checked)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not (out / "train.log").is_file():  # every run keeps its train.log (a refused start leaves no folder)
        raise DataError(f"{out}: not empty and not a run folder; train into a new or empty folder")
    finished = is_finished(out)
    interrupted = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if (interrupted or (out / "model" / "model.json").is_file()) and not overwrite:  # finished: model.json too
        what = ("a trained run (model/)" if finished else
                "an interrupted run (checkpoints/; `--resume` continues it)" if interrupted else
                "an unfinished run's model (model/)")
        raise DataError(f"{out}: already holds {what}; pass --overwrite to replace it, or choose another --out")
    return True


def _first_missing(path: Path) -> Path | None:
    made = None
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path, made = path.parent, path
    return made


def _remove_start(out: Path, made: Path | None) -> None:
    """Undo a start refused on its inputs: its train.log, and the folders it made if they are empty; never hide the
    refusal behind an error of this clean-up."""
    with contextlib.suppress(OSError):
        (out / "train.log").unlink(missing_ok=True)
        if made is None:
            return
        for folder in [out, *out.parents]:
            if any(folder.iterdir()):
                return
            folder.rmdir()
            if folder == made:
                return


def _clear_run(out: Path) -> None:
    """Delete a previous run's results (config.yaml and train.log are being rewritten by the new run). Evaluations
    saved inside the run folder are the user's: they stay, with a warning that they describe the old model."""
    for name in RUN_RESULTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in sorted(out.iterdir()):
        if path.is_dir() and (path / "metrics.json").is_file():
            log.warning("%s: an evaluation of the replaced run; its figures do not describe the new one", path)


def _drop_log_head(handler: logging.Handler, path: Path, start: int) -> None:
    """Keep only the bytes of train.log from `start` on (this run's lines): a replaced run's log goes with it.
    The handler appends, so its next lines follow what is kept."""
    if not start or path.is_symlink():  # a linked log may be shared with other runs: leave it whole
        return
    handler.flush()
    with open(path, "r+b") as f:
        f.seek(start)
        kept = f.read()
        f.seek(0)
        f.write(kept)
        f.truncate()


def _run_environment(out: Path, env: dict, resume: bool) -> dict:
    """model.json's `environment`: this call's, or for a resumed run the first call's (model/environment.json,
    written when the run began) with this one appended to `resumed` (the code or libraries may have changed)."""
    if not resume:
        return env
    try:
        first = json.loads((out / "model" / ENVIRONMENT_FILE).read_text())
    except (OSError, ValueError):
        first = None  # a run started before runs recorded it
    if not isinstance(first, dict):
        return env
    later = {k: env[k] for k in ("at", "skincancer", "git", "packages", "device") if k in env}
    if env.get("data") != first.get("data"):
        later["data"] = env.get("data")
    return {**first, "resumed": [*first.get("resumed", []), later]}


def write_fitted_images(model_dir: Path, train_keys: list, valid_keys: list, fitted_on_valid: bool = False) -> None:
    """model/fitted_images.json: the SHA-1 of every training and validation image's bytes, so that `evaluate` can
    say when it is scoring images this model was fitted or tuned on (whatever their names or folders).

    "train": the images the weights were fitted on (validation images too for a probe fitted on train+valid);
    "valid": the images only used to choose the threshold, epoch or regularisation."""
    fitted, tuned = (train_keys + valid_keys, []) if fitted_on_valid else (train_keys, valid_keys)
    keys = {split: sorted({k for k in chosen if k is not None}) for split, chosen in (("train", fitted),
                                                                                      ("valid", tuned))}
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json(model_dir / FITTED_IMAGES_FILE, {"hash": "sha1", **keys})


def _warn_shared_images(train_df: pd.DataFrame, valid_df: pd.DataFrame, keys: list | None = None,
                        valid_source: str = "valid") -> None:
    """Images in both splits (identical bytes, whatever their names) make validation optimistic: name them (the
    first ten). Validation made only of training images would choose nothing honestly: an error.
    keys: content_keys of the training then the validation files (computed when not given)."""
    paths = [*train_df["filepath"], *valid_df["filepath"]]
    keys = content_keys(paths) if keys is None else keys
    n = len(train_df)
    shared = [g for g in same_key(keys) if min(g) < n <= max(g)]
    in_train = {i for group in shared for i in group if i >= n}  # validation images with a training twin
    if len(in_train) == len(valid_df):
        raise DataError(f"{valid_source}: every validation image is also a training image (identical bytes); "
                        "validation needs images the model is not trained on")
    for group in shared[:10]:
        log.warning("valid: %s is also in train as %s (identical bytes)", ", ".join(paths[i] for i in group if i >= n),
                    ", ".join(paths[i] for i in group if i < n))
    if shared:
        more = f" (those of {len(shared) - 10} more groups not listed)" if len(shared) > 10 else ""
        log.warning("%d validation image(s) are also training images%s: validation figures are optimistic",
                    len(in_train), more)


def _readable(frame: pd.DataFrame, source: str, split: str) -> pd.DataFrame:
    """The manifest's rows whose files decode; unreadable ones are named and left out. None left is an error, and
    a manifest none of whose files exists says so (moved or deleted since indexing)."""
    if not any(os.path.isfile(path) for path in frame["filepath"]):
        shown = "\n  ".join(frame["filepath"][:5]) + ("\n  ..." if len(frame) > 5 else "")
        raise DataError(f"{source}: none of the {split} manifest's {len(frame)} files exists (moved or deleted "
                        f"since indexing? re-run `skincancer index`):\n  {shown}")
    bad = check_files(list(frame["filepath"]), desc=f"checking {split} images")
    if not bad:
        return frame
    _report_bad([(i, item.reason) for i, item in enumerate(bad)], pd.Series([item.path for item in bad]), split)
    if len(bad) == len(frame):
        raise DataError(f"{source}: none of the {len(frame)} {split} images can be read (listed above)")
    log.warning("%s: %d of %d images cannot be read and are left out", source, len(bad), len(frame))
    return frame[~frame["filepath"].isin({item.path for item in bad})].reset_index(drop=True)


def _report_bad(errors: list, paths: pd.Series, split: str) -> None:
    for index, reason in errors:
        log.warning("%s: skipped %s: %s", split, paths.iloc[index], reason)


def _print_summary(model: nn.Module, config: TrainConfig) -> None:
    total, trainable = count_parameters(model)
    if config.mode == "linear":
        trainable = sum(p.numel() for p in unwrap(model).get_classifier().parameters())
    size = config.inference_size
    sized = f" (validated and saved for {size} px)" if size != config.image_size else ""
    tqdm.write(
        f"Model: {config.backbone} ({'ImageNet weights' if config.pretrained else 'random init'}), "
        f"mode {config.mode}, head {config.head}\n"
        f"Input: 3 x {config.image_size} x {config.image_size}{sized}\n"
        f"Total params: {total:,}\nTrainable params: {trainable:,}\nNon-trainable params: {total - trainable:,}"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _NoWriter:
    """Stands in for SummaryWriter on ranks other than 0: only rank 0 writes the run folder."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
