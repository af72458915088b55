"""int8: a run's ONNX export quantised with ONNX Runtime's static quantisation, calibrated on training images, and
refused where it strays from the float model on real images."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write, find_model_dir, write_json
from .engines import INPUT_NAME, INT8_FILE, INT8_SLOWER, OnnxEngine
from .errors import CheckpointError
from .metrics import roc_auc
from .provenance import file_sha256

log = logging.getLogger("skincancer")

CALIBRATION_IMAGES = 128  # activation ranges settle well before this; each image costs a float forward pass
CHECK_IMAGES = 300  # the parity check's share of the validation images (all of them when fewer)
SPEED_IMAGES = 64  # the check images each graph is timed on (model only, batches of 32), the best of 3 rounds


class QuantizeError(CheckpointError):
    pass


@dataclass(frozen=True)
class Tolerance:
    """How far the int8 model may stray from the float one on the check images before the export is refused."""

    auc: float = 0.005  # |melanoma AUC (int8) - AUC (float)|, where the check images have both classes
    mean_difference: float = 0.01  # mean |p_int8 - p_float| of the malignant probability
    max_difference: float = 0.10  # the largest single-image difference
    guard_changes: float = 0.01  # share of check images the out-of-distribution guard decides otherwise


def _sample(frame, n: int, seed: int = 0):
    """At most n rows, every diagnosis kept in proportion (a fixed seed: the same export twice is the same)."""
    if len(frame) <= n:
        return frame
    import pandas as pd

    share = n / len(frame)
    parts = [group.sample(max(1, round(len(group) * share)), random_state=seed)
             for _, group in frame.groupby("diagnosis")]
    return pd.concat(parts).reset_index(drop=True)


def _arrays(classifier, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, list[int]]:
    """Normalised images [N, 3, S, S] float32 (the model's own preprocessing) and the indices that decoded."""
    from .datasets import ImageDataset
    from .engine import make_loader

    loader = make_loader(ImageDataset(paths, None, classifier.transform()), batch_size, 0)
    images, kept = [], []
    for batch in loader:
        for index, reason in batch["errors"]:
            log.warning("%s: %s; left out", paths[index], reason)
        if batch["image"] is not None:
            images.append(batch["image"].numpy())
            kept.extend(batch["index"].tolist())
    if not images:
        raise QuantizeError(f"none of the {len(paths)} images could be read")
    return np.concatenate(images), kept


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over arrays, a few images per call."""

    def __init__(self, name: str, images: np.ndarray, step: int = 8):
        self.batches = iter([{name: images[i:i + step]} for i in range(0, len(images), step)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def prepare(float_path: Path, out: Path) -> None:
    """The float graph with its shapes inferred and constants folded: what the quantiser works on."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(float_path), str(out), skip_symbolic_shape=True)


def plans(prepared: Path) -> list[tuple[str, list[str]]]:
    """Which convolutions go to int8, most first. Depthwise convolutions (and the stem) lose the most here: a frozen
    ImageNet backbone's features move far when they are quantised (the demo probe's validation AUC fell from 0.937
    to 0.876 with every convolution in int8, and stayed within 0.002 with the later half of the pointwise ones)."""
    import onnx

    convs = [node for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
    grouped = {node.name: next((a.i for a in node.attribute if a.name == "group"), 1) for node in convs}
    pointwise = [node.name for node in convs[1:] if grouped[node.name] == 1]
    return [("every convolution", [node.name for node in convs]),
            ("the pointwise convolutions after the stem", pointwise),
            ("the later half of the pointwise convolutions", pointwise[len(pointwise) // 2:])]


def quantize_graph(prepared: Path, out: Path, calibration: np.ndarray, nodes: list[str]) -> None:
    """Static int8 quantisation of `nodes` (QDQ; per-channel int8 weights, uint8 activations; MinMax ranges from
    the calibration images); everything else, softmax and pooling included, stays in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(prepared), str(out), _Reader(INPUT_NAME, calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=nodes, op_types_to_quantize=["Conv"], calibrate_method=CalibrationMethod.MinMax)


def parity(classifier, float_engine, int8_engine, images: np.ndarray, labels: np.ndarray | None) -> dict:
    """The int8 model against the float one on the same images: malignant-probability differences, verdicts
    changed at the run's threshold, AUC of each (where labels have both classes), guard decisions changed."""
    n_classes = len(classifier.class_names)
    both = [engine.outputs(images) if engine.has_features else engine.probabilities(images)
            for engine in (float_engine, int8_engine)]
    p_float, p_int8 = (classifier.malignant_probability(out[:, :n_classes]) for out in both)
    difference = np.abs(p_int8 - p_float)
    report = {"images": len(images), "mean_difference": float(difference.mean()),
              "max_difference": float(difference.max()),
              "verdicts_changed": int(((p_float >= classifier.threshold) != (p_int8 >= classifier.threshold)).sum())}
    if labels is not None and 0 < labels.sum() < len(labels):
        report["auc_float"], report["auc_int8"] = roc_auc(labels, p_float), roc_auc(labels, p_int8)
    if classifier.guard is not None and all(out.shape[1] > n_classes for out in both):
        refused = [classifier.guard.score(out[:, n_classes:]) > 1 for out in both]
        report["guard_decisions_changed"] = int((refused[0] != refused[1]).sum())
    return report


def images_per_second(engines: list, images: np.ndarray, rounds: int = 3) -> list[float]:
    """Model-only throughput of each engine on the same images (batches of 32): the best of `rounds` runs each,
    interleaved, so that a busy spell on the machine slows them alike."""
    images = np.ascontiguousarray(images[:SPEED_IMAGES], dtype=np.float32)
    for engine in engines:
        engine.probabilities(images[:2])  # the first run of a session allocates
    best = [0.0] * len(engines)
    for _ in range(rounds):
        for i, engine in enumerate(engines):
            start = time.perf_counter()
            for first in range(0, len(images), 32):
                engine.probabilities(images[first:first + 32])
            best[i] = max(best[i], len(images) / (time.perf_counter() - start))
    return best


def refusal(report: dict, tolerance: Tolerance) -> str | None:
    """Why the int8 model is refused (None: within tolerance)."""
    problems = []
    if "auc_float" in report and abs(report["auc_int8"] - report["auc_float"]) > tolerance.auc:
        problems.append(f"melanoma AUC {report['auc_int8']:.4f} against {report['auc_float']:.4f} in float "
                        f"(tolerance {tolerance.auc})")
    if report["mean_difference"] > tolerance.mean_difference:
        problems.append(f"mean probability difference {report['mean_difference']:.4f} (tolerance "
                        f"{tolerance.mean_difference})")
    if report["max_difference"] > tolerance.max_difference:
        problems.append(f"largest probability difference {report['max_difference']:.4f} (tolerance "
                        f"{tolerance.max_difference})")
    changed = report.get("guard_decisions_changed", 0) / max(1, report["images"])
    if changed > tolerance.guard_changes:
        problems.append(f"the guard decides {report['guard_decisions_changed']} of {report['images']} images "
                        f"otherwise (tolerance {tolerance.guard_changes:.0%})")
    return "; ".join(problems) or None


@dataclass
class QuantisationInputs:
    """What the int8 graph is calibrated and checked on: the manifests named, and their images as model inputs."""

    calibration: list
    check: str | Path
    calibration_arrays: np.ndarray
    check_arrays: np.ndarray
    truth: np.ndarray  # the check images' labels


def quantisation_inputs(classifier, model_dir: Path, run, calibration=None, check=None,
                        calibration_images: int = CALIBRATION_IMAGES,
                        check_images: int = CHECK_IMAGES) -> QuantisationInputs:
    """`calibration_images` of the calibration manifests and `check_images` of the check manifest (default: the
    run's training and validation manifests, from its config.yaml), decoded as the model sees them."""
    from .config import load_config
    from .sources import read_sources

    if calibration is None or check is None:
        config_path = model_dir.parent / "config.yaml"
        if not config_path.is_file():
            raise QuantizeError(f"{run}: no config.yaml naming the run's training data; give --calibration and "
                                "--check manifests")
        config = load_config(config_path)
        named = [] if calibration else config.train_paths
        named += [] if check else [config.valid]
        missing = [str(p) for p in named if not Path(p).exists()]
        if missing:
            raise QuantizeError(f"{', '.join(missing)}: named by {config_path} but not found from here; give "
                                "--calibration and --check manifests")
        calibration, check = calibration or config.train_paths, check or config.valid
    labels = classifier.meta["labels"]
    calibration_frame = _sample(read_sources([str(p) for p in calibration], labels), calibration_images)
    check_frame = _sample(read_sources([str(check)], labels), check_images)
    calibration_arrays, _ = _arrays(classifier, calibration_frame["filepath"].tolist())
    check_arrays, kept = _arrays(classifier, check_frame["filepath"].tolist())
    truth = np.asarray(check_frame["diagnosis"].map(labels).to_numpy()[kept], dtype=int)
    return QuantisationInputs(calibration, check, calibration_arrays, check_arrays, truth)


def export_int8(run: str | Path, calibration: list[str | Path] | None = None, check: str | Path | None = None,
                tolerance: Tolerance = Tolerance(), calibration_images: int = CALIBRATION_IMAGES,
                check_images: int = CHECK_IMAGES) -> dict:
    """Quantise the run's current ONNX export to RUN/model/model.int8.onnx, calibrated on `calibration_images` of
    its training images (default: the manifests in its config.yaml), then compare it with the float export on
    `check_images` validation images; refused (nothing written) beyond `tolerance`. Of the plans within it, the
    first (the most in int8) not slower than the float graph here (INT8_SLOWER) is kept, else the fastest: its
    sidecar says so, and the `auto` engine then uses the float graph. Returns the parity and timing report, also
    recorded in model.int8.onnx.json."""
    from .predict import load_model

    model_dir = find_model_dir(run)
    classifier = load_model(model_dir, engine="onnx")  # int8 starts from a current float export
    float_engine = classifier.engine
    if classifier.meta.get("unfinished"):
        raise QuantizeError(f"{model_dir}: saved by a run that has not finished (its threshold is a placeholder); "
                            "finish it (`skincancer train --resume`) first")
    out = model_dir / INT8_FILE
    inputs = quantisation_inputs(classifier, model_dir, run, calibration, check, calibration_images, check_images)
    calibration, check = inputs.calibration, inputs.check
    calibration_arrays, check_arrays, truth = inputs.calibration_arrays, inputs.check_arrays, inputs.truth
    with tempfile.TemporaryDirectory() as tmp:
        prepared, candidate = Path(tmp) / "prepared.onnx", Path(tmp) / INT8_FILE
        prepare(float_engine.path, prepared)
        tried, kept = [], None
        for plan, nodes in plans(prepared):  # as much in int8 as the tolerance allows, if that is faster
            quantize_graph(prepared, candidate, calibration_arrays, nodes)
            engine = OnnxEngine(candidate)
            report = {"plan": plan, "int8_convolutions": len(nodes),
                      **parity(classifier, float_engine, engine, check_arrays, truth)}
            problem = refusal(report, tolerance)
            if problem is not None:
                tried.append(f"with {plan} in int8 ({len(nodes)}): {problem}")
                log.info("int8 %s", tried[-1])
                continue
            float_speed, speed = images_per_second([float_engine, engine], check_arrays)
            report.update(float_images_per_s=round(float_speed, 1), images_per_s=round(speed, 1),
                          speedup=round(speed / float_speed, 3))
            if kept is None or report["speedup"] > kept[0]["speedup"]:
                kept = report, candidate.read_bytes()
            if report["speedup"] >= INT8_SLOWER:
                break
            log.info("int8 with %s in int8 (%d): within tolerance, but %.1f images/s against %.1f in float on this "
                     "machine (slower); trying less in int8", plan, len(nodes), speed, float_speed)
        if kept is None:
            for stale in (out, out.with_name(out.name + ".json")):  # a refused graph leaves no older one in use
                stale.unlink(missing_ok=True)
            raise QuantizeError(f"{out}: not written: the int8 model strays from the float one on {report['images']} "
                                f"images of {check}: " + "; ".join(tried))
        report, graph = kept  # the first plan within tolerance that is not slower, else the fastest within it
        atomic_write(out, lambda target: Path(target).write_bytes(graph))
    # the float export's record, checked against its weights and graph when it was loaded
    float_record = json.loads(float_engine.path.with_name(float_engine.path.name + ".json").read_text())["onnx"]
    write_json(out.with_name(out.name + ".json"), {
        **classifier.meta, "onnx": {**float_record, "onnx_sha256": file_sha256(out),
                                    "float_onnx_sha256": float_record["onnx_sha256"]},
        "int8": {"calibration": [str(p) for p in calibration], "calibration_images": len(calibration_arrays),
                 "check": str(check), "tolerance": asdict(tolerance), "parity": report}})
    log.info("wrote %s: %s", out, report)
    return report
