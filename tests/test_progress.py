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
            assert "\r" not in text and text.splitlines()[0].startswith("epoch 3: 0/4 [")
            assert all(line.startswith("epoch 3: ") for line in text.splitlines())
