"""Progress bars: tqdm's redrawn bar on a terminal; in a log file or pipe, one plain line every half minute."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A stream for tqdm that turns each redraw into a line of its own: a bar redrawn with carriage returns is
    one unreadable line of megabytes in a log file (and a torchrun worker's stderr is a pipe)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        for piece in text.replace("\n", "\r").split("\r"):
            if piece.strip():  # tqdm clears a finished bar with spaces: nothing to log
                self.stream.write(piece.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on stderr, drawn as a bar on a terminal (or a notebook), as timed lines elsewhere."""
    stream = sys.stderr
    if "notebook" not in tqdm.__module__ and not getattr(stream, "isatty", lambda: False)():
        kwargs = {"file": _Lines(stream), "mininterval": LOG_INTERVAL_S, "bar_format": LOG_FORMAT, **kwargs}
    return tqdm(iterable, **kwargs)
