"""Tables that benchmark scripts write into BENCHMARKS.md, between markers of their own."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_block(name: str, script: str, rows: list[str], heading: str) -> None:
    """Replace the block between `<!-- NAME:begin ... -->` and `<!-- NAME:end -->` (appended under `heading` if the
    file has none yet)."""
    begin, end = f"<!-- {name}:begin ({script} writes this table) -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text()
    table = begin + "\n" + "\n".join(rows) + "\n" + end
    if begin in text and end in text:
        text = text[:text.index(begin)] + table + text[text.index(end) + len(end):]
    else:
        text += f"\n## {heading}\n\n" + table + "\n"
    BENCHMARKS.write_text(text)
