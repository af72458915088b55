"""What every command shares: how it fails, and the checks of its output file and inference options, made before
any work."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import typer

from ..config import DEFAULT_LABELS, PREDICT_VIEWS, PREDICT_VIEWS_TEXT

ENGINE_HELP = ("onnx | int8 | torch | auto (int8 where `skincancer export --int8` did not time it slower, else onnx, "
               "when `skincancer export` was run)")
DEFAULT_LABELS_TEXT = ",".join(f"{k}={v}" for k, v in DEFAULT_LABELS.items())

def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def output_file(out: Path, suffixes: tuple[str, ...], inputs=(), option: str = "--out",
                 replaces: tuple[str, ...] = ()) -> None:
    """Fail before any work when `out` cannot be the file this command writes: wrong kind of name (so that a
    slip never turns an image or a manifest into a CSV), a folder, one of the command's own inputs, a read-only
    file, or (with `replaces`, the leading column names of this command's own tables) an existing file this
    command did not write."""
    if out.suffix.lower() not in suffixes:
        fail(f"{option} {out}: expected a {' or '.join(suffixes)} file name")
    if out.is_dir():
        fail(f"{option} {out}: is a folder; name a file")
    target = os.path.realpath(out)  # realpath, unlike Path.resolve, does not raise on a symlink loop
    if any(os.path.realpath(path) == target for path in inputs if path is not None):
        fail(f"{option} {out}: is one of this command's inputs; writing there would destroy it")
    if out.is_file() and (not out.stat().st_mode & 0o222 or not os.access(out, os.W_OK)):  # root may write anything
        fail(f"{option} {out}: is read-only; it stays as it is (choose another name)")
    if replaces and out.is_file() and out.stat().st_size and leading_columns(out)[:len(replaces)] != list(replaces):
        fail(f"{option} {out}: already exists and is not a table this command wrote; remove it or choose "
              "another name")


def leading_columns(path: Path) -> list[str]:
    """The first column names of a CSV, JSON records or Parquet table ([] when it is none of them)."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        except Exception:  # not a Parquet file: not ours
            return []
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace").lstrip("\ufeff")
    if path.suffix.lower() == ".json":
        return re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', head.split("}")[0])  # the keys of the first record
    return next(csv.reader(head.splitlines()[:1]), [])


def check_inference_options(tta: int | None, batch_size: int, num_workers: int) -> None:
    if tta is not None and tta not in PREDICT_VIEWS:
        fail(f"--tta: must be {PREDICT_VIEWS_TEXT} views, got {tta}")
    if batch_size < 1:
        fail(f"--batch-size: expected 1 or more, got {batch_size}")
    if num_workers < 0:
        fail(f"--num-workers: expected 0 (decode in this process) or more, got {num_workers}")
