"""Fine-tuning the whole network: AdamW with warmup and cosine decay, EMA, early stopping, DDP, resumable."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import atomic_write, save_model, unwrap
from .config import TrainConfig
from .data import (
    DataError,
)
from .datasets import ImageDataset, build_transform
from .distributed import (
    ShardedSampler,
    World,
    barrier,
    gather_rows,
    mean_over_ranks,
    share_buffers,
)
from .engine import make_loader, run_inference, train_one_epoch
from .features import eval_transform
from .metrics import roc_auc
from .resume import load_training_state, save_training_state, training_data_fingerprint
from .runfolder import report_bad

log = logging.getLogger("skincancer")


def fit_finetune(model: nn.Module, config: TrainConfig, prep: dict, train_df: pd.DataFrame, train_targets: np.ndarray,
                 valid_df: pd.DataFrame, valid_targets: np.ndarray, class_names: list[str], meta: dict, out: Path,
                 writer: SummaryWriter, resume: bool = False, world: World = World(),
                 soft_targets: np.ndarray | None = None) -> int:
    """Whole network, AdamW + warmup/cosine, class balancing, early stopping on validation AUC; best kept.

    After every epoch the full training state goes to out/checkpoints (atomically), so `resume` replays from the
    last complete epoch exactly: weights, EMA, optimiser, schedule, shuffling order and random number generators.
    soft_targets [N, classes]: what the loss aims at (distillation); train_targets then only balance the classes."""
    aims = train_targets if soft_targets is None else soft_targets
    train_set = ImageDataset(train_df["filepath"], aims, build_transform(
        config.image_size, prep["mean"], prep["std"], config.augment, config.resize))
    valid_set = ImageDataset(valid_df["filepath"], valid_targets, eval_transform(config, prep))
    draws = source_draws(config, train_df)
    class_weights = _class_weights(config, train_targets, class_names, draws)
    # The order of epoch e depends on (seed, e) alone: resumes replay it, and DDP ranks split it without overlap.
    sampler = ShardedSampler(len(train_set), world, config.seed, draws=draws,
                             weights=class_weights[train_targets] if config.class_balance == "sampler" else None)
    shuffle = torch.Generator()  # seeds the loader workers' augmentation, re-seeded every epoch
    device = next(model.parameters()).device
    loss_fn = _loss_function(config, class_weights, device)
    loader = make_loader(train_set, config.batch_size, config.num_workers, shuffle=True, sampler=sampler,
                         generator=shuffle)
    steps_per_epoch = len(loader) if not config.max_steps_per_epoch else min(config.max_steps_per_epoch, len(loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _warmup_cosine(optimizer, steps_per_epoch * config.epochs, int(config.warmup_epochs * steps_per_epoch))
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    trained = model
    if world.distributed:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    evaluated = ema.module if ema is not None else model  # the weights we validate and keep
    record = _Record(out, world, training_data_fingerprint(train_df, valid_df))
    if resume:
        record.resume(model, ema, optimizer, scheduler)
    for epoch in range(record.start, config.epochs + 1):
        if config.patience and epoch - 1 - record.best_epoch >= config.patience:
            break  # the interrupted run had already stopped early
        tic = time.time()
        shuffle.manual_seed(config.seed * 1_000_003 + epoch + 7919 * world.rank)
        sampler.set_epoch(epoch)
        on_step = (lambda step, loss, start=(epoch - 1) * steps_per_epoch: ema.update(model, step=start + step)
                   ) if ema is not None else None
        train_loss, errors = train_one_epoch(trained, loader, optimizer, scheduler, loss_fn, epoch,
                                             config.max_steps_per_epoch, on_step=on_step)
        report_bad(errors, train_df["filepath"], "train")
        share_buffers(world, model, *([ema.module] if ema is not None else []))  # validate and keep rank 0's model
        train_loss = mean_over_ranks(world, train_loss, device)
        if math.isnan(train_loss):  # no batch had a readable image (a non-finite loss raises in train_one_epoch)
            raise DataError(f"{config.train_name}: no training image could be read in epoch {epoch} (listed above)")
        # keep=last validates each epoch for the record only (the kept model is re-validated with all its views
        # afterwards), so one view suffices there; keep=best selects on it, with the model's own views
        views = config.tta if config.keep == "best" else 1
        valid_loss, auc = _validate_epoch(evaluated, valid_set, valid_df, valid_targets, config, class_names, world,
                                          epoch, views)
        row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_auc": auc,
               "valid_views": views, "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - tic, 1)}
        record.add(row, writer)
        improved = record.keep_if_better(epoch, auc, evaluated, meta, config.keep)
        record.save(epoch, model, ema, optimizer, scheduler)
        log.info("epoch %d/%d: train loss %.4f, valid loss %.4f, valid AUC %.4f%s (%.0f s)", epoch, config.epochs,
                 train_loss, valid_loss, auc, " *kept*" if improved else "", row["seconds"])
        if config.patience and epoch - record.best_epoch >= config.patience:
            log.info("early stop: no validation AUC gain for %d epochs", config.patience)
            break
    unwrap(model).load_state_dict(record.best_state)
    return record.best_epoch


def source_draws(config: TrainConfig, train_df: pd.DataFrame) -> np.ndarray | None:
    """Per training image, how many times an epoch draws it on average (`source_weights`; None: once each)."""
    if not config.source_weights:
        return None
    check_source_weights(config, train_df)
    sources = train_df["source"].astype(str)
    draws = np.array(sources.map(config.source_weights).fillna(1.0), dtype=float)
    shares = pd.Series(draws).groupby(sources.to_numpy()).sum()
    log.info("an epoch draws %d images: %s", round(draws.sum()), ", ".join(
        f"{name} {total:.0f} (weight {config.source_weights.get(name, 1.0):g})" for name, total in shares.items()))
    return draws


def check_source_weights(config: TrainConfig, train_df: pd.DataFrame) -> None:
    """Every source `source_weights` names has training images (a misspelt name would weigh nothing)."""
    sources = set(train_df["source"].astype(str)) if "source" in train_df else set()
    unknown = sorted(set(config.source_weights) - sources)
    if unknown:
        raise DataError(f"source_weights: no training images of source(s) {', '.join(map(repr, unknown))}; the "
                        f"training sources are {', '.join(sorted(sources)) or 'unnamed'}")


def _class_weights(config: TrainConfig, train_targets: np.ndarray, class_names: list[str],
                   draws: np.ndarray | None = None) -> np.ndarray:
    """Inverse class frequencies (mean 1) among the images an epoch draws, for the balanced sampler or the weighted
    loss."""
    counts = np.bincount(train_targets, weights=draws, minlength=len(class_names)).astype(float)
    if (counts == 0).any():
        missing = [n for n, c in zip(class_names, counts, strict=True) if c == 0]
        raise DataError(f"{config.train_name}: no training images of class(es) {', '.join(missing)}")
    return counts.sum() / (len(counts) * counts)


def _loss_function(config: TrainConfig, class_weights: np.ndarray, device: torch.device) -> nn.Module:
    loss_weights = None
    if config.class_balance == "weighted_loss":
        loss_weights = torch.as_tensor(class_weights, dtype=torch.float32).to(device)
    return nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)


def _warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total_steps`."""
    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _validate_epoch(evaluated: nn.Module, valid_set: ImageDataset, valid_df: pd.DataFrame, valid_targets: np.ndarray,
                    config: TrainConfig, class_names: list[str], world: World, epoch: int, views: int
                    ) -> tuple[float, float]:
    """Validation loss and AUC (on the images that choose the epoch: --select-on) of `evaluated` after `epoch`."""
    shard = np.arange(world.rank, len(valid_set), world.size)  # each rank validates a slice; gathered
    shard_set = ImageDataset(valid_df["filepath"].iloc[shard], valid_targets[shard], valid_set.transform)
    probs, errors = run_inference(evaluated, shard_set, config.batch_size, config.num_workers, tta=views,
                                  desc="validating")
    probs = gather_rows(world, probs, shard, len(valid_set))
    errors = [(int(shard[i]), reason) for i, reason in errors]
    ok = ~np.isnan(probs).any(1)
    if not ok.any():  # the files went bad during training; readable decoded them at the start
        report_bad(errors, valid_df["filepath"], "valid")
        raise DataError(f"{config.valid}: no validation image could be read in epoch {epoch} (listed above)")
    valid_loss = float(nn.functional.nll_loss(torch.log(torch.as_tensor(probs[ok]).clamp_min(1e-12)),
                                              torch.as_tensor(valid_targets[ok])))
    judged = config.judged(valid_df)
    positive = config.positive_indices(class_names)
    auc = roc_auc(valid_df["label"].to_numpy()[ok & judged], probs[ok & judged][:, positive].sum(1))
    return valid_loss, auc


@dataclass
class _Record:
    """What the epochs so far chose (the best validation AUC, its epoch and weights) and summary.csv's rows: rank 0
    writes them after every epoch with the full training state, and a resume reads them back."""

    out: Path
    world: World
    data: str  # training_data_fingerprint: a resume must train on the same data
    best_auc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    rows: list = field(default_factory=list)
    start: int = 1  # the first epoch to train

    def resume(self, model: nn.Module, ema, optimizer: torch.optim.Optimizer, scheduler) -> None:
        state = load_training_state(self.out / "checkpoints", model, ema, optimizer, scheduler, data=self.data,
                                    processes=self.world.size)
        if state is not None:
            self.best_state, self.rows = state["best"], state["rows"]
            self.best_auc, self.best_epoch, self.start = state["best_auc"], state["best_epoch"], state["epoch"] + 1
            log.info("resuming after epoch %d (best %d, validation AUC %.4f)", state["epoch"], self.best_epoch,
                     self.best_auc)

    def add(self, row: dict, writer: SummaryWriter) -> None:
        self.rows.append(row)
        if self.world.is_main:
            atomic_write(self.out / "summary.csv", lambda tmp: pd.DataFrame(self.rows).to_csv(tmp, index=False))
        for key in ("train_loss", "valid_loss", "valid_auc", "lr"):
            writer.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])

    def keep_if_better(self, epoch: int, auc: float, evaluated: nn.Module, meta: dict, keep: str) -> bool:
        """Keep `evaluated` (in memory, and as the unfinished run's model) if it is the best so far, or keep=last."""
        improved = auc > self.best_auc or keep == "last"
        if improved:
            self.best_auc, self.best_epoch = auc, epoch
            self.best_state = {k: v.detach().clone() for k, v in unwrap(evaluated).state_dict().items()}
            if self.world.is_main:
                save_model(evaluated, {**meta, "epoch": epoch, "validation": {"auc": auc}, "unfinished": True},
                           self.out / "model")
        return improved

    def save(self, epoch: int, model: nn.Module, ema, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """The full training state after `epoch`, for an exact resume; every rank waits for it."""
        if self.world.is_main:
            save_training_state(self.out / "checkpoints", epoch, model, ema, optimizer, scheduler, self.best_state,
                                {"best_auc": self.best_auc, "best_epoch": self.best_epoch, "rows": self.rows,
                                 "data": self.data, "processes": self.world.size})
        barrier(self.world)
