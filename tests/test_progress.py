"""Progress bars: a bar on a terminal, plain timed lines in a log file or pipe (no carriage returns)."""

from __future__ import annotations

import io
import sys

from skincancer.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_lines_and_a_terminal_gets_a_bar(monkeypatch):
    for stream in (io.StringIO(), Terminal()):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress(total=4, desc="epoch 3", unit="batch", leave=False)
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.5000", refresh=False)
        bar.close()
        text = stream.getvalue()
        if isinstance(stream, Terminal):
            assert "\r" in text and "|" in text  # the redrawn bar
        else:
            lines = text.splitlines()
            assert "\r" not in text and lines[0].startswith("epoch 3: 0/4 [")
            assert lines[-1].startswith("epoch 3: 4/4 [") and "loss=0.5000" in lines[-1]  # a closing line
            assert len(lines) == 2  # nothing between: the next line would come 30 s on


def test_only_rank_0_draws_under_torchrun(monkeypatch):
    """Started by hand, torchrun shows every rank's stderr: the other ranks' bars would repeat rank 0's."""
    # a RANK alone (set by something else), or one that is not a number, hides nothing
    for size, rank, shown in (("2", "0", True), ("2", "1", False), ("1", "1", True), ("2", "x", True)):
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("WORLD_SIZE", size)
        monkeypatch.setenv("RANK", rank)
        for _ in progress(range(3), desc="epoch 1"):
            pass
        assert bool(stream.getvalue()) == shown
