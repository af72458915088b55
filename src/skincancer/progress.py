"""Progress bars: tqdm's redrawn bar on a terminal; in a log file or pipe, one plain line every half minute."""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

from tqdm.auto import tqdm
from tqdm.notebook import tqdm as notebook_tqdm

LOG_INTERVAL_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no time left to tell
CURSOR_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A stream for tqdm that turns each redraw into a line of its own: a bar redrawn with carriage returns is
    one unreadable line of megabytes in a log file."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        for piece in CURSOR_CODES.sub("", text).replace("\n", "\r").split("\r"):
            if piece.strip():  # tqdm clears a finished bar with spaces: nothing to log
                self.stream.write(piece.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them in the environment; (0, 1, 0) outside it. The one reader
    of RANK, WORLD_SIZE and LOCAL_RANK (as timm's world_info_from_env)."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        return 0, 1, 0


def in_torchrun() -> bool:
    """True in a process torchrun started (one of several)."""
    return world_from_env()[1] > 1


def other_rank() -> bool:
    """True in a torchrun worker other than rank 0, whose messages and bars would repeat rank 0's."""
    rank, size, _ = world_from_env()
    return size > 1 and rank > 0


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on stderr: a bar on a terminal or in a notebook; elsewhere a line every 30 s and
    one when the bar closes (its final count), whatever `leave` says. Under torchrun, rank 0's bar only: the
    other ranks' would repeat it."""
    if other_rank():
        kwargs = {**kwargs, "disable": True}
    stream = sys.stderr
    if not issubclass(tqdm, notebook_tqdm) and not getattr(stream, "isatty", lambda: False)():
        total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
        kwargs = {"file": _Lines(stream), "mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S,
                  "bar_format": LOG_FORMAT if total is not None else LOG_FORMAT_NO_TOTAL, **kwargs, "leave": True}
    return tqdm(iterable, **kwargs)
