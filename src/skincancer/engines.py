"""Engines: the runtimes a trained model's images go through for prediction: ONNX Runtime on an export (numpy in,
numpy out, no torch), and the loop every engine shares (engine.run_inference is the PyTorch one)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .checkpoint import WEIGHTS_FILE, CheckpointError
from .config import VIEWS
from .images import collate_arrays
from .provenance import file_sha256

log = logging.getLogger("skincancer")

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # `skincancer export --int8`: the same graph quantised, checked against it
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "image", "probabilities", "features"
ORT_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)  # 2 here
# Images per session.run: a loader batch of 32 is fed in slices of 4, whose activations stay in the CPU caches
# (Lite0 at 224 px on this 2-core EPYC: ~280 images/s in slices of 4 against ~200 as one batch of 32).
ORT_SLICE = 4


class ExportError(CheckpointError):
    pass


# The dihedral group of the square: lesions have no up, down, left or right. Each view works on numpy arrays and
# torch tensors alike ([..., H, W]).
def _flip(x, dims: tuple[int, ...]):
    return np.flip(x, dims) if isinstance(x, np.ndarray) else x.flip(dims)


def _transpose(x):
    return np.swapaxes(x, -1, -2) if isinstance(x, np.ndarray) else x.transpose(-1, -2)


DIHEDRAL: list[Callable] = [
    lambda x: x,
    lambda x: _flip(x, (-1,)),
    lambda x: _flip(x, (-2,)),
    lambda x: _flip(x, (-1, -2)),
    lambda x: _transpose(x),
    lambda x: _flip(_transpose(x), (-1,)),
    lambda x: _flip(_transpose(x), (-2,)),
    lambda x: _flip(_transpose(x), (-1, -2)),
]


def _contiguous(x):
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()


def collect(loader: Iterable[dict], n: int, forward: Callable, tta: int = 1, desc: str = "predicting",
            extra: Callable | None = None) -> tuple[np.ndarray, list]:
    """The loop every engine shares: forward(batch) per dihedral view, averaged, placed at the batch's indices
    (with extra(batch)'s columns after them, from the first view); an [n, outputs] array with NaN rows for
    unreadable files, and their (index, reason) pairs. Batches hold torch tensors or numpy arrays."""
    if tta not in VIEWS:
        raise ValueError(f"tta must be one of {VIEWS}, got {tta}")
    if len(loader) >= 2:  # no bar for one batch (and no tqdm to import)
        from .progress import progress

        loader = progress(loader, desc=desc, unit="batch", leave=False)
    result: np.ndarray | None = None
    errors: list = []
    for batch in loader:
        errors.extend(batch["errors"])
        if batch["image"] is None:
            continue
        values = sum(forward(_contiguous(view(batch["image"]))) for view in DIHEDRAL[:tta]) / tta
        if extra is not None:
            values = np.concatenate([values, extra(batch["image"])], axis=1)
        if result is None:
            result = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
        result[np.asarray(batch["index"])] = values
    if result is None:
        result = np.full((n, 0), np.nan, dtype=np.float32)
    return result, errors


class ArrayBatches:
    """A dataset's samples in batches of numpy arrays (images.collate_arrays), decoded in this process; with
    `threads`, by that many threads, a batch ahead of the model. PIL's decoding and resizing and numpy's arithmetic
    release the GIL, so threads overlap the model as loader processes do, without copying every batch between
    processes (Lite0 at 224 px on 2 cores: 180 images/s against 117 with one loader process, 150 with none)."""

    def __init__(self, dataset, batch_size: int, threads: int = 0):
        self.dataset, self.batch_size, self.threads = dataset, batch_size, threads

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _batch(self, start: int, pool: ThreadPoolExecutor | None = None) -> dict:
        indices = range(start, min(start + self.batch_size, len(self.dataset)))
        return collate_arrays(list((pool.map if pool else map)(self.dataset.__getitem__, indices)))

    def __iter__(self):
        starts = range(0, len(self.dataset), self.batch_size)
        if not self.threads:
            yield from map(self._batch, starts)
            return
        pool, ahead = ThreadPoolExecutor(self.threads), ThreadPoolExecutor(1)
        try:
            pending = None
            for start in starts:
                following = ahead.submit(self._batch, start, pool)
                if pending is not None:
                    yield pending.result()
                pending = following
            if pending is not None:
                yield pending.result()
        finally:  # a consumer that stops early (an error, Ctrl-C) waits for no batch queued behind it
            ahead.shutdown(cancel_futures=True)
            pool.shutdown(cancel_futures=True)


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of the run's safetensors weights: tells whether an export still matches its run."""
    return file_sha256(model_dir / WEIGHTS_FILE)


def find_export(model_dir: Path, required: bool, image_size: int | None = None, classes: int | None = None,
                weights_sha256: str | None = None, name: str = ONNX_FILE) -> OnnxEngine | None:
    """The ONNX engine for a run's model folder when a current export exists: its sidecar records the SHA-256 of
    the run's weights and of the graph itself, so an export made before retraining, or a graph copied in from
    another run, is never used. A missing export is an error when `required`, else None (the caller falls back to
    PyTorch); a stale, foreign or broken one is an error when `required`, else a warning and None.
    weights_sha256: the weights' digest if the caller has it (weights_digest), not to read the file again.
    name: ONNX_FILE, or INT8_FILE for the int8 graph."""
    path = model_dir / name
    command = f"skincancer export --model {model_dir.parent}" + (" --int8" if name == INT8_FILE else "")
    again = f"run `{command}` again"
    present = path.is_file()
    problem, recorded = (_export_problem(path, model_dir, again, weights_sha256) if present else
                         (f"{path}: no {'int8 ' if name == INT8_FILE else ''}ONNX export; run `{command}` first", {}))
    if problem is None:
        try:
            engine = OnnxEngine(path)
            problem = engine.shape_problem(image_size, classes, again)
        except ExportError as err:
            problem = str(err)
        if problem is None:
            if recorded.get("same_padding") != "constant":  # an int8 sidecar carries its float export's record
                log.warning("%s: written by an earlier `skincancer export`, whose graphs pad at run time and run at "
                            "about 60%% of the speed; %s for the faster graph", path, again)
            return engine
    if required:
        raise ExportError(problem)
    (log.warning if present else log.debug)("%s; using PyTorch", problem)  # no export at all is the usual case
    return None


def _export_problem(path: Path, model_dir: Path, again: str,
                    weights_sha256: str | None = None) -> tuple[str | None, dict]:
    """What is wrong with an export (None: it is current), and its sidecar's `onnx` record as read."""
    try:
        recorded = json.loads(path.with_name(path.name + ".json").read_text())["onnx"]
        weights, graph = recorded["weights_sha256"], recorded["onnx_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path}: its metadata ({path.name}.json) is missing or unreadable; {again}", {}
    if weights != (weights_sha256 or weights_digest(model_dir)):
        return f"{path}: export does not match {model_dir / WEIGHTS_FILE} (retrained since?); {again}", recorded
    if graph != file_sha256(path):
        return f"{path}: the graph is not the one exported from this run (replaced or damaged); {again}", recorded
    if path.name == INT8_FILE and recorded.get("float_onnx_sha256") != _recorded_graph(model_dir / ONNX_FILE):
        return (f"{path}: quantised from another export than {model_dir / ONNX_FILE} (exported again since?); "
                f"{again}", recorded)
    return None, recorded


def _recorded_graph(path: Path) -> str | None:
    """The graph SHA-256 an export's sidecar records (None: no readable sidecar)."""
    try:
        return json.loads(path.with_name(path.name + ".json").read_text())["onnx"].get("onnx_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


INT8_SLOWER = 0.95  # below this share of the float graph's speed an int8 graph is slower (timing spread: ~5%)


def slower_than_float(int8_path: Path) -> bool:
    """Whether `skincancer export --int8` timed this int8 graph slower than its float graph (below INT8_SLOWER of
    its speed, on the machine that exported it): the `auto` engine then uses the float one. An export that recorded
    no timing: False."""
    try:
        speedup = json.loads(int8_path.with_name(int8_path.name + ".json").read_text())["int8"]["parity"]["speedup"]
        return float(speedup) < INT8_SLOWER
    except (OSError, ValueError, KeyError, TypeError):
        return False


def session_options(threads: int = ORT_THREADS):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: the threads decoding the next batch need those cycles
    # (on 2 busy cores spinning cost ~30% of model throughput).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxEngine:
    """Runs an exported model with ONNX Runtime on the CPU, on numpy batches (images.EvalTransform, no torch); with
    num_workers, threads decode and resize the next batch while the session computes (ArrayBatches)."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None, slice_size: int = ORT_SLICE):
        import onnxruntime as ort

        self.path, self.slice_size = Path(path), slice_size
        self.name = "int8" if self.path.name == INT8_FILE else "onnx"
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no ONNX export; run `skincancer export --model RUN"
                              f"{' --int8' if self.name == 'int8' else ''}` first")
        threads = threads or int(os.environ.get("SKINCANCER_ORT_THREADS", ORT_THREADS))
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise ExportError(f"{self.path}: not a usable ONNX model ({err})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ExportError(f"{self.path}: expected one image input [batch, 3, H, W], found {inputs}")
        self.input_name = inputs[0].name
        self.has_features = [o.name for o in self.session.get_outputs()][:2] == [OUTPUT_NAME, FEATURES_NAME]

    def shape_problem(self, image_size: int | None, classes: int | None, advice: str) -> str | None:
        """What makes this graph unfit for a model of `image_size` px and `classes` outputs (None: fit)."""
        height, width = self.session.get_inputs()[0].shape[2:]
        outputs = self.session.get_outputs()[0].shape
        if image_size is not None and (height, width) != (image_size, image_size):
            return f"{self.path}: takes {height}x{width} images, the model {image_size}x{image_size}; {advice}"
        if classes is not None and (len(outputs) != 2 or outputs[1] != classes):
            return f"{self.path}: gives outputs {outputs}, the model has {classes} classes; {advice}"
        return None

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Normalised images [N, 3, S, S] float32 -> probabilities [N, classes]."""
        return self._run(batch, [OUTPUT_NAME] if self.has_features else None)

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """Normalised images -> probabilities and pooled features side by side [N, classes + D]."""
        if not self.has_features:
            raise ExportError(f"{self.path}: exported without the features output the guard needs; run `skincancer "
                              f"export --model RUN{' --int8' if self.name == 'int8' else ''}` again")
        return self._run(batch, [OUTPUT_NAME, FEATURES_NAME])

    def _run(self, batch: np.ndarray, names: list[str] | None) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        slices = []
        for i in range(0, len(batch), self.slice_size):
            got = self.session.run(names, {self.input_name: batch[i:i + self.slice_size]})
            slices.append(np.concatenate(got, axis=1) if names and len(names) > 1 else got[0])
        return np.concatenate(slices) if len(slices) != 1 else slices[0]

    @property
    def num_features(self) -> int | None:
        """The width of the pooled features output (None: exported without it)."""
        return self.session.get_outputs()[1].shape[1] if self.has_features else None

    def run_inference(self, dataset, batch_size: int = 32, num_workers: int = 0, tta: int = 1,
                      output: str = "probs", extra=None) -> tuple[np.ndarray, list]:
        """Like engine.run_inference (output 'probs' or 'probs+features') on a dataset of numpy images
        (images.ImageList with images.EvalTransform): [N, outputs] with NaN rows, and (index, reason) failures."""
        forward = self.outputs if output == "probs+features" else self.probabilities
        # num_workers decoding threads (ArrayBatches); a single batch gains nothing from them
        loader = ArrayBatches(dataset, batch_size, threads=num_workers if len(dataset) > batch_size else 0)
        return collect(loader, len(dataset), forward, tta, desc=f"predicting ({self.name})", extra=extra)
