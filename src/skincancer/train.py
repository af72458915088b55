"""Training: linear probe on cached frozen features, or full fine-tuning; writes a self-describing run folder."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import __version__
from .backbones import build_model, count_parameters, preprocessing
from .card import CARD_FILE, write_card
from .checkpoint import StartingWeights, atomic_write, save_model, unwrap, write_json
from .config import DEFAULT_LABELS, TrainConfig, config_to_dict
from .data import DataError, check_labels_agree, content_keys, manifest_labels
from .datasets import ImageDataset
from .distill import check_teacher, distil
from .distributed import (
    World,
    device_for,
    init_world,
    shutdown,
)
from .engine import run_inference
from .features import eval_transform, probe_guard_features
from .finetune import check_source_weights, fit_finetune
from .guard import GuardError, fit_model_guard
from .linear import fit_linear
from .metadata import MetadataModel, has_metadata
from .metadata import records as metadata_records
from .metrics import choose_threshold, roc_auc, validation_summary
from .predict import load_model
from .provenance import ENVIRONMENT_FILE, data_fingerprint, describe, environment
from .runfolder import (
    NoWriter,
    claim_out,
    clear_run,
    drop_log_head,
    first_missing,
    is_finished,
    log_to,
    readable,
    remove_start,
    report_bad,
    run_environment,
    warn_shared_images,
    write_fitted_images,
)
from .sources import fold_groups, read_sources, source_table, starting_sources

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
    # the teacher is checked before the run folder is touched: a refused teacher leaves it as it was
    teacher = check_teacher(config) if config.teacher else None
    start_weights, started_from = _starting_weights(config, out, resume)
    start = _RunStart(out, world, resume, overwrite)
    try:
        seed_everything(config.seed)
        inputs = _read_inputs(config, out, world, resume)
        start.begin(config, inputs, inherited=start_weights.fitted if start_weights is not None else None)
        model = build_model(config.backbone, len(inputs.class_names),
                            pretrained=config.pretrained and start_weights is None, pooling=config.pooling)
        prep = preprocessing(model, config.resize)
        model.to(inputs.device)
        meta = {
            "backbone": config.backbone, "mode": config.mode, "head": config.head, "class_names": inputs.class_names,
            "labels": config.labels, "positive_name": config.positive_name, "negative_name": config.negative_name,
            "image_size": config.inference_size, "train_image_size": config.image_size, **prep, "threshold": 0.5,
            "threshold_policy": config.threshold_policy, "tta": config.tta, "pooling": config.pooling,
            "class_balance": config.class_balance, "sources": source_table(inputs.train_df, inputs.valid_df),
            **({"select_on": config.select_on} if config.select_on else {}),
            **({"source_weights": config.source_weights} if config.source_weights else {}),
            "skincancer_version": __version__, "environment": inputs.env,
        }
        if start_weights is not None:
            started_from = start_weights.load_into(model, inputs.class_names)
            start_weights = None
        if started_from is not None:
            meta["initialised_from"] = started_from
            meta["sources"] += starting_sources(meta)
        if world.is_main:
            _print_summary(model, config)
        writer = SummaryWriter(str(out / "tensorboard")) if world.is_main else NoWriter()
        splits = (inputs.train_df, inputs.train_targets, inputs.valid_df, inputs.valid_targets, inputs.class_names)
        if config.mode == "linear":
            held_out, epoch = fit_linear(model, config, prep, *splits, out, writer, inputs.keys), 0
        else:
            # a student learns its teacher's targets (on extra images too): distil gives its splits and targets
            splits, soft = distil(config, splits, meta, out, world, teacher) if teacher is not None else (splits, None)
            teacher = None  # its targets are computed: free its networks before training
            held_out, epoch = None, fit_finetune(model, config, prep, *splits, meta, out, writer, resume=resume,
                                                 world=world, soft_targets=soft)
            if not world.is_main:
                return out
        _finish(model, config, prep, inputs, meta, held_out, epoch, out, writer, started)
        return out
    except BaseException as err:
        start.stopped(err)
        raise
    finally:
        start.close_log()
        shutdown(world)
        start.undo_if_refused()


class _RunStart:
    """The run folder's life cycle: claimed (made if need be) and logged to before the inputs are read; a folder
    this call made is removed again if they are refused, so a failed start leaves nothing. Once they check out, an
    old run being replaced goes and the new run's config.yaml is written (`begin`)."""

    def __init__(self, out: Path, world: World, resume: bool, overwrite: bool):
        self.out, self.is_main = out, world.is_main
        self.created = world.is_main and not resume and not (out.is_dir() and any(out.iterdir()))
        self.made = first_missing(out)  # the outermost folder `mkdir` is about to make (None: `out` exists)
        self.replace = world.is_main and not resume and claim_out(out, overwrite)  # True: a run there is replaced
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
        self.old_log = (out / "train.log").stat().st_size if world.is_main and (out / "train.log").is_file() else 0
        self.file_log = log_to(out / "train.log") if world.is_main else logging.NullHandler()
        self.begun = False  # the inputs checked out: the run writes its files

    def begin(self, config: TrainConfig, inputs: _Inputs, inherited: dict | None = None) -> None:
        if self.replace:  # the inputs are readable: only now does the old run go, its log lines too
            clear_run(self.out)
            drop_log_head(self.file_log, self.out / "train.log", self.old_log)
        self.begun = True
        if self.is_main:  # written once the inputs check out, so a failed start leaves an old run's config alone
            out, keys, n_train = self.out, inputs.keys, len(inputs.train_df)
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(config_to_dict(config))))
            # from the start, so that a model saved by an interrupted run is covered too
            write_fitted_images(out / "model", keys[:n_train], keys[n_train:],
                                fitted_on_valid=config.mode == "linear" and config.linear_fit == "train+valid",
                                inherited=inherited)
            write_json(out / "model" / ENVIRONMENT_FILE, inputs.env)  # read back by --resume; model.json gets it too

    def stopped(self, err: BaseException) -> None:
        if not (self.created and not self.begun):  # a log that stays says why the run stopped (the console too)
            self.file_log.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "training stopped: %s",
                                                (str(err) or type(err).__name__,), None))

    def close_log(self) -> None:
        log.removeHandler(self.file_log)
        self.file_log.close()

    def undo_if_refused(self) -> None:
        if self.created and not self.begun:
            remove_start(self.out, self.made)


@dataclass
class _Inputs:
    """A run's checked inputs: both splits, their files' content keys (train's, then valid's) and what follows."""

    train_df: pd.DataFrame
    valid_df: pd.DataFrame
    keys: list[str | None]
    device: torch.device
    env: dict
    class_names: list[str]
    train_targets: np.ndarray
    valid_targets: np.ndarray
    metadata_model: MetadataModel | None


def _starting_weights(config: TrainConfig, out: Path, resume: bool) -> tuple[StartingWeights | None, dict | None]:
    """The weights a run starts from (`init_from`), or, for a resumed run that has saved an epoch, the record of
    those it started from (the checkpoint holds its weights now; the starting run need not exist any more)."""
    if not config.init_from:
        return None, None
    if resume:
        try:
            recorded = json.loads((out / "model" / "model.json").read_text()).get("initialised_from")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded and (out / "checkpoints" / "last.json").is_file():
            return None, recorded
    return StartingWeights(config.init_from, config), None


def _read_inputs(config: TrainConfig, out: Path, world: World, resume: bool) -> _Inputs:
    train_df = read_sources(config.train_paths, config.labels)
    valid_df = read_sources([config.valid], config.labels)
    # every file decoded once up front (about 1 ms each): every process drops the same unreadable files, and a
    # split with none left stops here, not inside an epoch (or one process of a multi-process run)
    train_df = readable(train_df, config.train_name, "train")
    valid_df = readable(valid_df, config.valid, "valid")
    keys = content_keys([*train_df["filepath"], *valid_df["filepath"]])  # each file hashed once
    device = device_for(world, config.device)
    env = {}  # only rank 0 saves the model: the others neither need it nor run git beside it
    if world.is_main:
        data = {split: {"images": len(df), "fingerprint": data_fingerprint(split_keys, df["diagnosis"]),
                        "diagnoses": {str(k): int(n) for k, n in sorted(df["diagnosis"].value_counts().items())}}
                for split, df, split_keys in (("train", train_df, keys[:len(train_df)]),
                                              ("valid", valid_df, keys[len(train_df):]))}
        env = run_environment(out, {**environment(str(device)), "data": data}, resume)
        log.info("%s; command: %s", describe(env), " ".join(sys.argv))
    warn_shared_images(train_df, valid_df, keys, config.valid)
    class_names = _class_names(config, train_df, valid_df)
    train_targets, valid_targets = _targets(config, class_names, train_df), _targets(config, class_names, valid_df)
    log.info("train: %d images (%s); valid: %d images (%s)", len(train_df), _counts(train_df),
             len(valid_df), _counts(valid_df))
    if valid_df["label"].nunique() < 2:
        raise DataError(f"{config.valid}: validation data needs both malignant and benign images")
    _check_select_on(config, train_df, valid_df)
    if not config.extra:  # distillation's extra images (their own sources) join later: fit_finetune checks them all
        check_source_weights(config, train_df)
    metadata_model = fit_metadata(config, train_df, train_targets, len(class_names)) if config.metadata else None
    return _Inputs(train_df, valid_df, keys, device, env, class_names, train_targets, valid_targets, metadata_model)


def _finish(model: nn.Module, config: TrainConfig, prep: dict, inputs: _Inputs, meta: dict,
            held_out: tuple[np.ndarray, pd.DataFrame] | None, epoch: int, out: Path, writer: SummaryWriter,
            started: float) -> None:
    """Rank 0, after fitting: threshold and validation figures, the metadata model's, the guard; the model saved."""
    class_names = inputs.class_names
    guard_valid = None  # the validation pass's features, for the guard of a fine-tuned model
    if held_out is not None:
        # A head fitted on train+valid: threshold and validation figures from its out-of-fold predictions.
        valid_probs, valid_df = held_out
        meta["validation_source"] = "out-of-fold (train+valid)"
    else:
        # Otherwise they always come from the saved model's own outputs on validation.
        valid_df = inputs.valid_df
        valid_set = ImageDataset(valid_df["filepath"], None, eval_transform(config, prep))
        outputs, errors = run_inference(model, valid_set, config.batch_size, config.num_workers,
                                        tta=config.tta, output="probs+features", desc="validating")
        valid_probs, guard_valid = outputs[:, :len(class_names)], outputs[:, len(class_names):]
        report_bad(errors, valid_df["filepath"], "validation")
        meta["validation_source"] = "valid"
    meta.update(finish_validation(valid_probs, valid_df, class_names, meta, config, out))
    if inputs.metadata_model is not None:
        meta["metadata_model"] = inputs.metadata_model.to_dict()
        # the metadata model saw the training images: validate it on validation images only
        only_valid = np.ones(len(valid_df), bool)
        if "split" in valid_df:
            only_valid = (valid_df["split"] == "valid").to_numpy()
        meta["validation"].update(metadata_validation(inputs.metadata_model, valid_probs[only_valid],
                                                      valid_df[only_valid].reset_index(drop=True), class_names,
                                                      config))
    if config.guard:
        _fit_guard(model, config, prep, inputs, meta, guard_valid, out)
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


def _fit_guard(model: nn.Module, config: TrainConfig, prep: dict, inputs: _Inputs, meta: dict,
               guard_valid: np.ndarray | None, out: Path) -> None:
    """meta['guard']: the out-of-distribution guard, fitted on the training and (all) validation images."""
    train_df, valid_split = inputs.train_df, inputs.valid_df  # the validation rows, not a probe's out-of-fold ones
    frozen = config.mode == "linear"
    fitted = probe_guard_features(model, config, prep, train_df, valid_split, inputs.keys) if frozen else None
    try:
        meta["guard"] = fit_model_guard(
            model, frozen, train_df["filepath"], valid_split["filepath"], eval_transform(config, prep),
            config.tta, out / "model", config.batch_size, config.num_workers, config.guard_false_rejection,
            valid_features=guard_valid, fitted_features=fitted, seed=config.seed,
            groups=fold_groups(pd.concat([train_df, valid_split], ignore_index=True), inputs.keys))
    except GuardError as err:  # a smoke-test-sized split: the model works, unguarded, and says so
        log.warning("no out-of-distribution guard: %s", err)


# ---------------------------------------------------------------- metadata


def fit_metadata(config: TrainConfig, train_df: pd.DataFrame, train_targets: np.ndarray,
                 num_classes: int) -> MetadataModel:
    """p(class | age, sex) from the training manifest's metadata columns (see skincancer.metadata)."""
    if not has_metadata(train_df):
        raise DataError(f"{config.train_name}: metadata is on but the manifest has no age_approximate or sex column; "
                        "index it with --metadata META.csv")
    rows = metadata_records(train_df, config.train_name)
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
    positive = config.positive_indices(class_names)
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
    ok = ~np.isnan(valid_probs).any(1) & config.judged(valid_df)  # --select-on: that source's images choose
    positive = config.positive_indices(class_names)
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
    for source, frame in ((config.train_name, train_df), (config.valid, valid_df)):
        check_labels_agree(frame, config.labels, source)
    if config.head == "binary":
        return [config.negative_name, config.positive_name]
    label_map = ", ".join(f"{k}={v}" for k, v in config.labels.items())
    for source, frame in ((config.train_name, train_df), (config.valid, valid_df)):
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
        raise DataError(f"{config.train_name}: need at least two diagnoses to train, found {names}")
    return names


def _targets(config: TrainConfig, class_names: list[str], frame: pd.DataFrame) -> np.ndarray:
    if config.head == "binary":
        return frame["label"].to_numpy().astype(int)
    index = {name: i for i, name in enumerate(class_names)}
    return frame["diagnosis"].map(index).to_numpy().astype(int)


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


def _counts(frame: pd.DataFrame) -> str:
    return ", ".join(f"{k} {v}" for k, v in frame["diagnosis"].value_counts().sort_index().items())


def _print_summary(model: nn.Module, config: TrainConfig) -> None:
    total, trainable = count_parameters(model)
    if config.mode == "linear":
        trainable = sum(p.numel() for p in unwrap(model).get_classifier().parameters())
    size = config.inference_size
    sized = f" (validated and saved for {size} px)" if size != config.image_size else ""
    weights = (f"weights of {config.init_from}" if config.init_from
               else "ImageNet weights" if config.pretrained else "random init")
    tqdm.write(
        f"Model: {config.backbone} ({weights}), "
        f"mode {config.mode}, head {config.head}\n"
        f"Input: 3 x {config.image_size} x {config.image_size}{sized}\n"
        f"Total params: {total:,}\nTrainable params: {trainable:,}\nNon-trainable params: {total - trainable:,}"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
