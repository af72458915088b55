"""Ray batch prediction: a run's Classifier in Ray Data actors over a lazy stream of image paths, to a file.

Each actor loads the model once and runs `Classifier.predict` on its batches, so the
preprocessing, the engine (ONNX or torch) and the output columns are those of the single-process `predict`
(sources as absolute paths, which the workers resolved).
Folders are listed inside Ray tasks and results are written as they arrive: neither the list of images nor
the table of results is ever held whole by the driver. Workers must see the images and the run folder at the
paths given (a shared file system on a multi-node cluster).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

OUTPUT_FORMATS = (".parquet", ".csv")


class RayPredictError(ValueError):
    """Bad arguments for a Ray prediction; the message names the file or address."""


def predict_with_ray(run: str | Path | Sequence[str | Path], inputs: Sequence[str | Path],
                     out: str | Path | None = None, address: str | None = None, engine: str = "auto",
                     batch_size: int = 32, tta: int | None = None, actors: int | None = None,
                     cpus_per_actor: float = 1.0, num_cpus: int | None = None,
                     on_error: Callable[[str, str], None] | None = None, progress: bool = True,
                     refuse: bool = True) -> tuple[int, int]:
    """Predict every image in `inputs` (files and folders) on Ray and write one row per image to `out`.

    run: a run folder, or several for an ensemble (probabilities averaged, as `predict --model A --model B`).
    tta: views averaged (Classifier.predict_proba); None: each model's own setting, as `predict` does.

    out: a .parquet or .csv file (None: CSV on stdout). address: a Ray cluster ('auto', 'ray://host:10001');
    None starts a local Ray (with `num_cpus` CPUs) unless this process is already connected to one.
    actors: a fixed number of model actors; None lets Ray scale between 1 and the cluster's CPUs.
    on_error(source, reason) is called for each unreadable file. Returns (rows written, rows with an error).
    refuse: as `predict --guard/--no-guard`: images the guard refuses get the label 'refused' (False: their
    verdicts are kept; the guard's columns are filled either way).
    """
    try:
        import ray
    except ImportError:
        raise RayPredictError("Ray is not installed: pip install 'skincancer[ray]'") from None

    from .checkpoint import find_model_dir
    from .ensemble import load_models
    from .predict import ENGINES

    if engine not in ENGINES:
        raise RayPredictError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if out is not None and Path(out).suffix.lower() not in OUTPUT_FORMATS:
        raise RayPredictError(f"{out}: the output must end in {' or '.join(OUTPUT_FORMATS)}")
    if out is not None and Path(out).is_dir():
        raise RayPredictError(f"{out}: is a folder; name a .parquet or .csv file")
    if not inputs:
        raise RayPredictError("no inputs: give image files and/or folders")
    model_dirs = [find_model_dir(r).resolve() for r in ([run] if isinstance(run, (str, Path)) else run)]
    load_models(model_dirs, engine=engine)  # fail here, with a clear message, rather than inside every actor
    started = not ray.is_initialized()
    if started:
        _check_reachable(address)
        runtime_env = None if address is None else {"py_modules": [str(Path(__file__).resolve().parent)]}
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 runtime_env=runtime_env, logging_level="WARNING", log_to_driver=False)
    try:
        with _quiet_ray_data():
            dataset = build_dataset(model_dirs, inputs, engine=engine, batch_size=batch_size, tta=tta, actors=actors,
                                    cpus_per_actor=cpus_per_actor, progress=progress, refuse=refuse)
            rows, failed = write_stream(_batches(dataset), out, on_error)
    finally:
        if started:
            ray.shutdown()
    if rows == 0:
        raise RayPredictError(f"no image files found in {', '.join(map(str, inputs))}")
    return rows, failed


def build_dataset(model_dirs: Sequence[str | Path], inputs: Sequence[str | Path], engine: str = "auto",
                  batch_size: int = 32, tta: int | None = None, actors: int | None = None,
                  cpus_per_actor: float = 1.0, progress: bool = True, refuse: bool = True):
    """The lazy Ray Dataset: inputs -> image paths (listed in tasks) -> prediction rows (in model actors, each
    holding every run of `model_dirs`)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come out in the order `predict` would give them
    # bars on a terminal; elsewhere Ray Data logs progress tables at INFO, which stay in its log files
    context.enable_progress_bars = progress
    cpus = int(ray.cluster_resources().get("CPU", 1) // max(cpus_per_actor, 1e-3))
    # at most `actors`, starting from one: a fixed pool of as many actors as CPUs left the listing task none (hang)
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors or cpus))
    # folders are listed in light tasks; rows are cut into blocks of one batch so that every actor gets work
    paths = (ray.data.from_items([{"input": str(Path(p).absolute())} for p in inputs])
             .flat_map(_expand_input, num_cpus=0.1)
             .repartition(target_num_rows_per_block=batch_size))
    return paths.map_batches(_ClassifierActor, batch_size=batch_size, batch_format="pandas", compute=pool,
                             num_cpus=cpus_per_actor,
                             fn_constructor_kwargs={"runs": [str(d) for d in model_dirs], "engine": engine,
                                                    "batch_size": batch_size, "tta": tta, "refuse": refuse,
                                                    "threads": max(1, int(cpus_per_actor))})


def write_stream(batches: Iterator[pd.DataFrame], out: str | Path | None,
                 on_error: Callable[[str, str], None] | None = None) -> tuple[int, int]:
    """Append result batches to a Parquet or CSV file (None: CSV on stdout), one batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = failed = 0
    path = Path(out) if out is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    parquet = path is not None and path.suffix.lower() == ".parquet"
    tmp = path.with_name(f".{path.name}.part") if path is not None else None
    writer = None
    handle = sys.stdout if path is None else None
    done = False
    try:
        for table in batches:
            if on_error is not None:
                for source, reason in zip(table["source"], table["error"], strict=True):
                    if reason:
                        on_error(source, reason)
            if parquet:
                if "in_distribution" in table:  # all-empty in a batch: keep the column boolean, not null
                    table = table.astype({"in_distribution": "boolean"})
                arrow = pa.Table.from_pandas(table, preserve_index=False,
                                             schema=writer.schema if writer is not None else None)
                writer = writer or pq.ParquetWriter(tmp, arrow.schema)
                writer.write_table(arrow)
            else:
                if handle is None:
                    handle = open(tmp, "w", newline="")
                table.to_csv(handle, index=False, header=rows == 0)
            rows += len(table)
            failed += int((table["error"] != "").sum())
        done = True
    finally:
        if writer is not None:
            writer.close()
        if handle is not None and handle is not sys.stdout:
            handle.close()
        if not done and tmp is not None:
            tmp.unlink(missing_ok=True)  # a failed run leaves neither a half table nor its temporary file
    if tmp is not None and tmp.exists():
        tmp.replace(path)  # a finished table or none: an interrupted run leaves no half file under the name
    return rows, failed


# ---------------------------------------------------------------- internals


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Ray keeps retrying an address nobody answers at (for minutes, warning each time): try it once first.
    None and 'local' start a Ray here; 'auto' finds the cluster of `ray start` on this machine (Ray's own check)."""
    import socket

    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayPredictError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise RayPredictError(f"cannot reach a Ray cluster at {address} ({err.strerror or err})") from None


def ray_data_console_handlers() -> list[logging.Handler]:
    """Ray Data's handlers that write to the console (not its session log files)."""
    import ray.data  # noqa: F401  (its import sets up the handlers)

    return [handler for handler in logging.getLogger("ray.data").handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """While predicting, Ray Data's INFO lines (execution plans, log folders, progress tables) stay in its session log
    files; warnings and errors still reach stderr, beside the command's own messages. The console handlers get their
    levels back afterwards, for Python callers that want Ray's INFO lines."""
    handlers = ray_data_console_handlers()
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)


def _batches(dataset) -> Iterator[pd.DataFrame]:
    yield from dataset.iter_batches(batch_format="pandas", batch_size=None)


def _expand_input(row: dict) -> list[dict]:
    """One command-line input -> its image files, as the single-process `predict` lists them."""
    from .images import expand_inputs

    return [{"path": path} for path in expand_inputs([row["input"]])]


class _ClassifierActor:
    """Holds one loaded model (or ensemble); called with a batch of paths, returns their rows of
    `Classifier.predict`."""

    def __init__(self, runs: list[str], engine: str, batch_size: int, tta: int | None, threads: int = 1,
                 refuse: bool = True):
        import torch

        from .ensemble import load_models

        torch.set_num_threads(threads)
        self.classifier = load_models(runs, engine=engine)
        self.batch_size, self.tta, self.refuse = batch_size, tta, refuse

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        paths = list(batch["path"])
        table = self.classifier.predict(paths, batch_size=self.batch_size, num_workers=0, tta=self.tta,
                                        refuse=self.refuse)
        # a batch of only unreadable files has NaN (float64) columns: keep every batch's schema the same
        numeric = [c for c in table.columns if c not in ("source", "label", "error", "refusal", "in_distribution")]
        return table.astype({**{c: "float32" for c in numeric}, "in_distribution": "boolean"})
