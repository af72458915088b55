"""Fine-tuning the whole network: AdamW with warmup and cosine decay, EMA, early stopping, DDP, resumable."""

from __future__ import annotations

import logging
import math
import time
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
    ImageDataset,
    build_transform,
)
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
                 writer: SummaryWriter, resume: bool = False, world: World = World()) -> int:
    """Whole network, AdamW + warmup/cosine, class balancing, early stopping on validation AUC; best kept.

    After every epoch the full training state goes to out/checkpoints (atomically), so `resume` replays from the
    last complete epoch exactly: weights, EMA, optimiser, schedule, shuffling order and random number generators."""
    train_set = ImageDataset(train_df["filepath"], train_targets, build_transform(
        config.image_size, prep["mean"], prep["std"], config.augment))
    valid_set = ImageDataset(valid_df["filepath"], valid_targets, eval_transform(config, prep))
    counts = np.bincount(train_targets, minlength=len(class_names)).astype(float)
    if (counts == 0).any():
        missing = [n for n, c in zip(class_names, counts, strict=True) if c == 0]
        raise DataError(f"{config.train_name}: no training images of class(es) {', '.join(missing)}")
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
    positive = config.positive_indices(class_names)
    valid_labels = valid_df["label"].to_numpy()
    judged = config.judged(valid_df)  # the validation images that choose the epoch (--select-on)
    best_auc, best_epoch, best_state, rows, start = -1.0, 0, None, [], 1
    data = training_data_fingerprint(train_df, valid_df)
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
        report_bad(errors, train_df["filepath"], "train")
        share_buffers(world, model, *([ema.module] if ema is not None else []))  # validate and keep rank 0's model
        train_loss = mean_over_ranks(world, train_loss, device)
        if math.isnan(train_loss):  # no batch had a readable image (a non-finite loss raises in train_one_epoch)
            raise DataError(f"{config.train_name}: no training image could be read in epoch {epoch} (listed above)")
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
        if not ok.any():  # the files went bad during training; readable decoded them at the start
            report_bad(errors, valid_df["filepath"], "valid")
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

