"""Export: a trained run to ONNX (dynamic batch, softmax included), and the ONNX Runtime engine that runs it."""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .checkpoint import WEIGHTS_FILE, CheckpointError, atomic_write, find_model_dir, write_json
from .engine import ProbabilitiesAndFeatures, collect, make_loader
from .provenance import file_sha256

log = logging.getLogger("skincancer")

ONNX_FILE = "model.onnx"
OPSET = 17  # well inside what onnxruntime 1.32 runs; the TorchScript exporter writes it without onnxscript
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "image", "probabilities", "features"
ORT_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)  # 2 here
# Images per session.run: a loader batch of 32 is fed in slices of 4, whose activations stay in the CPU caches
# (Lite0 at 224 px on this 2-core EPYC: ~280 images/s in slices of 4 against ~200 as one batch of 32).
ORT_SLICE = 4


class ExportError(CheckpointError):
    pass


def onnx_path(run: str | Path) -> Path:
    """Where a run's ONNX export lives: RUN/model/model.onnx."""
    return find_model_dir(run) / ONNX_FILE


def export_onnx(run: str | Path, out: str | Path | None = None, opset: int = OPSET, check: bool = True) -> Path:
    """Write the run's model as ONNX (input 'image' [batch, 3, S, S] normalised, outputs 'probabilities'
    [batch, classes] and 'features' [batch, D], the pooled features the guard scores) with the preprocessing
    metadata beside it in `<out>.json`; check it against PyTorch."""
    from .predict import load_model  # predict imports this module lazily for its engine

    classifier = load_model(run, engine="torch")
    out = Path(out) if out is not None else classifier.source / ONNX_FILE
    diff = write_onnx(classifier.model, int(classifier.meta["image_size"]), out, opset=opset, check=check)
    write_json(out.with_name(out.name + ".json"), {
        **classifier.meta, "onnx": {"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME,
                                    "features": FEATURES_NAME,
                                    "input_layout": "NCHW float32, resized and normalised with mean/std",
                                    "max_difference_to_torch": diff,
                                    "weights_sha256": weights_digest(classifier.source),
                                    "onnx_sha256": file_sha256(out)}})
    log.info("exported %s (opset %d); max difference to PyTorch %s", out, opset, diff)
    return out


def write_onnx(model: nn.Module, image_size: int, out: str | Path, opset: int = OPSET,
               check: bool = True) -> float | None:
    """Export any image classifier (logits out) as ONNX with its softmax, its pooled features and a dynamic batch
    axis (atomically); returns the largest probability difference to PyTorch on random input (checked to be
    < 1e-4; the features to 1e-3 of their scale)."""
    out = Path(out)
    wrapped = ProbabilitiesAndFeatures(model).eval()
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME],
                              do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"},
                                            FEATURES_NAME: {0: "batch"}})

    atomic_write(out, write)
    if not check:
        return None
    with torch.no_grad():
        expected, expected_features = (t.numpy() for t in wrapped(example))
    engine = OnnxEngine(out)
    got = engine.probabilities(example.numpy())
    diff = float(np.abs(got - expected).max())
    if diff > 1e-4:
        raise ExportError(f"{out}: ONNX output differs from PyTorch by {diff:.2e} (> 1e-4)")
    features = engine.outputs(example.numpy())[:, got.shape[1]:]
    feature_diff = float(np.abs(features - expected_features).max() / (np.abs(expected_features).max() + 1e-12))
    if feature_diff > 1e-3:
        raise ExportError(f"{out}: ONNX features differ from PyTorch by {feature_diff:.2e} of their scale (> 1e-3)")
    return diff


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of the run's safetensors weights: tells whether an export still matches its run."""
    return file_sha256(model_dir / WEIGHTS_FILE)


def find_export(model_dir: Path, required: bool, image_size: int | None = None,
                classes: int | None = None) -> OnnxEngine | None:
    """The ONNX engine for a run's model folder when a current export exists: its sidecar records the SHA-256 of
    the run's weights and of the graph itself, so an export made before retraining, or a graph copied in from
    another run, is never used. A missing export is an error when `required`, else None (the caller falls back to
    PyTorch); a stale, foreign or broken one is an error when `required`, else a warning and None."""
    path = model_dir / ONNX_FILE
    again = f"run `skincancer export --model {model_dir.parent}` again"
    present = path.is_file()
    problem = (_export_problem(path, model_dir, again) if present
               else f"{path}: no ONNX export; run `skincancer export --model {model_dir.parent}` first")
    if problem is None:
        try:
            engine = OnnxEngine(path)
            problem = engine.shape_problem(image_size, classes, again)
        except ExportError as err:
            problem = str(err)
        if problem is None:
            return engine
    if required:
        raise ExportError(problem)
    (log.warning if present else log.debug)("%s; using PyTorch", problem)  # no export at all is the usual case
    return None


def _export_problem(path: Path, model_dir: Path, again: str) -> str | None:
    try:
        recorded = json.loads(path.with_name(path.name + ".json").read_text())["onnx"]
        weights, graph = recorded["weights_sha256"], recorded["onnx_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path}: its metadata ({path.name}.json) is missing or unreadable; {again}"
    if weights != weights_digest(model_dir):
        return f"{path}: export does not match {model_dir / WEIGHTS_FILE} (retrained since?); {again}"
    if graph != file_sha256(path):
        return f"{path}: the graph is not the one exported from this run (replaced or damaged); {again}"
    return None


_THREADS_LOCK = threading.Lock()
_thread_users = 0
_saved_threads = 1


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a while: ToTensor/Normalize of one image gain nothing from a second thread, and on
    busy cores torch's spinning OpenMP threads made them ~20x slower (measured: 26 against 460 images/s).
    Counted, so that overlapping users (server threads) restore the setting only when the last one leaves."""
    global _thread_users, _saved_threads
    with _THREADS_LOCK:
        if _thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _thread_users += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _thread_users -= 1
            if _thread_users == 0:
                torch.set_num_threads(_saved_threads)


def session_options(threads: int = ORT_THREADS):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: the loader workers decoding the next batch need those cycles
    # (on 2 busy cores spinning cost ~30% of model throughput).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxEngine:
    """Runs an exported model with ONNX Runtime on the CPU; fed by the same Dataset/DataLoader/collate path as
    PyTorch, so decoding and resizing happen in loader workers while the session computes."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None, slice_size: int = ORT_SLICE):
        import onnxruntime as ort

        self.path, self.slice_size = Path(path), slice_size
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no ONNX export; run `skincancer export --model RUN` first")
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
                              "export --model RUN` again")
        return self._run(batch, [OUTPUT_NAME, FEATURES_NAME])

    def _run(self, batch: np.ndarray, names: list[str] | None) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        slices = []
        for i in range(0, len(batch), self.slice_size):
            got = self.session.run(names, {self.input_name: batch[i:i + self.slice_size]})
            slices.append(np.concatenate(got, axis=1) if names and len(names) > 1 else got[0])
        return np.concatenate(slices) if len(slices) != 1 else slices[0]

    def run_inference(self, dataset: Dataset, batch_size: int = 32, num_workers: int = 0, tta: int = 1,
                      output: str = "probs", extra=None) -> tuple[np.ndarray, list]:
        """Like engine.run_inference (output 'probs' or 'probs+features'): [N, outputs] with NaN rows, and
        (index, reason) failures."""
        forward = self.outputs if output == "probs+features" else self.probabilities
        # a single batch gains nothing from a worker process, and starting one costs more than decoding it
        workers = num_workers if len(dataset) > batch_size else 0
        with one_torch_thread():  # decoding in this process (workers=0) uses torch only for tiny tensor ops
            return collect(make_loader(dataset, batch_size, workers), len(dataset),
                           lambda images: forward(images.numpy()), tta, desc="predicting (onnx)", extra=extra)
