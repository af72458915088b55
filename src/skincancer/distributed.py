"""Distributed training helpers: process groups under torchrun, sharded validation, a class-balanced sampler."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .progress import world_from_env


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA); else one process."""
    rank, size, local_rank = world_from_env()
    if size <= 1:
        return World()
    world = World(rank, size, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend)
    return world


def device_for(world: World, requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank) if world.distributed else torch.device("cuda")


def gather_rows(world: World, rows: np.ndarray, indices: np.ndarray, total: int) -> np.ndarray:
    """Each rank predicted rows for some indices; every rank gets the full [total, ...] array back."""
    if not world.distributed:
        return rows
    pieces: list = [None] * world.size
    dist.all_gather_object(pieces, (indices, rows))
    full = np.full((total, *rows.shape[1:]), np.nan, dtype=rows.dtype)
    for piece_indices, piece_rows in pieces:
        full[piece_indices] = piece_rows
    return full


def every_rank(flag: bool, device: torch.device) -> bool:
    """True when the flag is True on every rank (one tiny all-reduce under torchrun; the flag itself otherwise),
    so that all ranks take the same branch around a collective call."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def share_buffers(world: World, *modules: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, an EMA's copies of them).

    DDP broadcasts rank 0's buffers at the start of each forward pass, but each rank then updates its own copy on
    its own batch: after an epoch the ranks hold different models. Validation is sharded over the ranks and rank 0
    saves the model, so all of them must hold the model that is saved."""
    if not world.distributed:
        return
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_contiguous():
                dist.broadcast(buffer.data, src=0)
            else:  # the backends send contiguous memory only
                sent = buffer.data.contiguous()
                dist.broadcast(sent, src=0)
                buffer.data.copy_(sent)


def mean_over_ranks(world: World, value: float, device: torch.device) -> float:
    """The mean of a per-rank figure (each rank's mean training loss over as many steps), the value itself alone."""
    if not world.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class ShardedSampler(Sampler[int]):
    """Every rank draws the same epoch order from generators seeded by (seed, epoch), then takes its own slice
    rank::size; together the ranks see one epoch.

    The order is a shuffle of all n images, unless `draws` (per image: how many times an epoch draws it;
    source_weights) or `weights` (per-image sampling weights, drawn with replacement: class balance) are given.
    Images of equal draws d form a group: an epoch takes floor(d) passes over the group plus the next round(frac(d) x
    its size) images of one endless stream of shuffles of it, so a group weighted 0.2 shows a different fifth every
    epoch and all of it every five epochs. With weights as well, an epoch has as many images, drawn with
    replacement from weights x draws."""

    def __init__(self, n: int, world: World, seed: int, weights: np.ndarray | None = None,
                 draws: np.ndarray | None = None):
        self.n, self.world, self.seed, self.weights, self.epoch = n, world, seed, weights, 0
        self.draws = None if draws is None else np.asarray(draws, dtype=float)
        # per group of equal draws d: its whole passes, the images it adds beyond them, and its members
        self.groups = [] if draws is None else [
            (int(d), round((d % 1) * len(members)), members)
            for d in np.unique(self.draws) for members in [np.flatnonzero(self.draws == d)]]
        self.total = n if draws is None else max(1, sum(whole * len(g) + take for whole, take, g in self.groups))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            weights = torch.as_tensor(self.weights, dtype=torch.double)
            if self.draws is not None:
                weights = weights * torch.tensor(self.draws)
            return torch.multinomial(weights, self.total, replacement=True, generator=generator)
        if self.draws is None:
            return torch.randperm(self.n, generator=generator)
        picked = []
        for number, (whole, take, group) in enumerate(self.groups):
            picked += [group] * whole
            if take:  # this epoch's stretch of the group's stream of shuffles (the k-th shuffle seeded by k)
                first = max(self.epoch - 1, 0) * take  # epochs count from 1 (fit_finetune); 0 = unset
                cycles = range(first // len(group), (first + take - 1) // len(group) + 1)
                stream = np.concatenate([group[torch.randperm(len(group), generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + 7_919 * number + 104_729 * k)).numpy()] for k in cycles])
                start = first - cycles[0] * len(group)
                picked.append(stream[start : start + take])
        order = torch.from_numpy(np.concatenate(picked))
        return order[torch.randperm(len(order), generator=generator)]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        per_rank = -(-self.total // self.world.size)
        order = torch.cat([order, order[: per_rank * self.world.size - self.total]])  # pad: every rank gets as many
        return iter(order[self.world.rank :: self.world.size].tolist())

    def __len__(self) -> int:
        return -(-self.total // self.world.size)
