"""Engine: PyTorch inference (training, evaluate, predict --engine torch; the loop is engines.collect), feature
extraction and a training epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import collate
from .distributed import every_rank
from .engines import collect
from .progress import progress

log = logging.getLogger("skincancer")

def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bfloat16 mixed precision on CUDA; nothing changes on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool = False,
                sampler: Sampler | None = None, seed: int = 0, generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader that tolerates unreadable files; `generator` (re-seeded per epoch by training) fixes the
    shuffling order and the workers' random seeds, so an epoch can be replayed exactly after a resume."""
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, generator=generator,
                      persistent_workers=False, drop_last=False)


class ProbabilitiesAndFeatures(nn.Module):
    """The classifier's softmax probabilities and the pooled features its head reads, from one forward pass: what a
    prediction and its out-of-distribution guard need (and what the ONNX export outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_head(self.model.forward_features(image), pre_logits=True)
        logits = self.model.get_classifier()(features)
        return logits.float().softmax(dim=1), features.float()


OUTPUTS = ("probs", "features", "probs+features")


@torch.no_grad()
def run_inference(model: nn.Module, dataset: Dataset, batch_size: int = 32, num_workers: int = 2,
                  tta: int = 1, output: str = "probs", desc: str = "predicting",
                  extra: Callable[[torch.Tensor], np.ndarray] | None = None) -> tuple[np.ndarray, list]:
    """Push a dataset through the model once.

    output='probs': softmax probabilities [N, classes], averaged over `tta` dihedral views.
    output='features': pooled backbone features [N, D] (pre-logits), averaged likewise.
    output='probs+features': both, side by side [N, classes + D].
    extra(images) -> [B, k]: columns appended to each batch's (for view-independent figures of the input).
    Rows of unreadable files are NaN; their (index, reason) pairs come back as the second value.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    model.eval()
    device = next(model.parameters()).device
    both = ProbabilitiesAndFeatures(model)

    def forward(images: torch.Tensor) -> np.ndarray:
        with autocast(device):
            x = images.to(device, non_blocking=True)
            if output == "features":
                return model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy()
            if output == "probs+features":
                return torch.cat(both(x), dim=1).cpu().numpy()
            return model(x).float().softmax(dim=1).cpu().numpy()

    return collect(make_loader(dataset, batch_size, num_workers), len(dataset), forward, tta, desc, extra)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, epoch: int,
                    max_steps: int = 0, on_step: Callable[[int, float], None] | None = None) -> tuple[float, list]:
    """One pass over the training loader; returns the mean loss and the files that failed to load.

    on_step(step, loss) runs after each optimiser step (EMA updates, logging)."""
    model.train()
    device = next(model.parameters()).device
    # Under DDP, ranks must take the same branch around the gradient all-reduce: if one skipped a step the others
    # take, the all-reduces would pair up across different steps and the run would hang.
    agreed = every_rank if isinstance(model, nn.parallel.DistributedDataParallel) else (lambda flag, _: flag)
    total, count, errors = 0.0, 0, []
    steps = len(loader) if not max_steps else min(max_steps, len(loader))
    bar = progress(total=steps, desc=f"epoch {epoch}", unit="batch", leave=False)
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        errors.extend(batch["errors"])
        bar.update(1)
        if not agreed(batch["image"] is not None, device):
            continue  # a batch of unreadable files on any rank: every rank skips the step, so DDP stays in step
        with autocast(device):
            logits = model(batch["image"].to(device, non_blocking=True))
            loss = loss_fn(logits.float(), batch["target"].to(device))
        if not agreed(math.isfinite(loss.item()), device):
            raise FloatingPointError(f"epoch {epoch} step {step}: non-finite loss (this process: {loss.item()}); "
                                     "lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = len(batch["target"])
        total, count = total + loss.item() * n, count + n
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        if on_step is not None:
            on_step(step, loss.item())
    bar.close()
    return (total / count if count else float("nan")), errors
