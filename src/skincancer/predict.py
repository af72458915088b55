"""Prediction: load a trained run and turn images (paths, PIL images or arrays) into probabilities and labels."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .checkpoint import META_FILE, CheckpointError, find_model_dir, read_meta
from .engines import INT8_FILE, ONNX_FILE, ExportError, OnnxEngine, find_export, slower_than_float, weights_digest
from .errors import BackboneError
from .guard import OUT_OF_DISTRIBUTION, PIXEL_STATS, Guard, frame_problem, load_guard, pixel_stats
from .images import (
    AugmentedView,
    EvalTransform,
    ImageError,
    ImageInput,
    as_source,
    describe,
    image_ids,
    is_batch_array,
)
from .records import Judged, Prediction, predictions_table, refusal_sentence, sentence
from .views import average_views

# torch, timm, pandas and scikit-learn are imported where they are needed: predicting with an ONNX export needs no
# torch or timm (pandas only for the table), so `skincancer predict` of one image starts in about a second
# (tests/test_onnx.py keeps it so).
if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from .metadata import MetadataModel

log = logging.getLogger("skincancer")

_WARNED_VIEWS: set = set()  # (model folder, views) said once a process: a server would say it for every request
ENGINES = ("auto", "onnx", "int8", "torch")


class Deferred:
    """A value made on first use (once, whichever thread asks first): the PyTorch network of a run predicted with
    ONNX Runtime, which only Grad-CAM and the like need."""

    def __init__(self, make: Callable):
        self.make, self.lock = make, threading.Lock()


class _BuiltOnFirstUse:
    """Classifier.model: the network given, or a Deferred one made the first time it is read."""

    def __set_name__(self, owner, name: str):
        self.slot = f"_{name}"

    def __get__(self, obj, owner=None):
        if obj is None:
            raise AttributeError(self.slot)  # no class-level default (dataclasses asks)
        value = obj.__dict__[self.slot]
        if isinstance(value, Deferred):
            with value.lock:
                value = obj.__dict__[self.slot]
                if isinstance(value, Deferred):
                    value = obj.__dict__[self.slot] = value.make()
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class Classifier:
    """A trained model plus everything needed to use it: preprocessing, class names, label map, threshold."""

    model: nn.Module = _BuiltOnFirstUse()  # a Deferred one is built when first read (ONNX runs: Grad-CAM)
    meta: dict
    source: Path
    engine: OnnxEngine | None = None  # None: eager PyTorch on `model`; Grad-CAM always uses `model`
    guard: Guard | None = None  # the out-of-distribution statistics (None: a run fitted before the guard existed)

    @property
    def members(self) -> list[Classifier]:
        """An ensemble's runs; [] for a single run."""
        return []

    @property
    def runs(self) -> list[Classifier]:
        """The single runs behind this model: an ensemble's members, or itself."""
        return self.members or [self]

    @property
    def engine_name(self) -> str:
        return "torch" if self.engine is None else self.engine.name

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def positive_name(self) -> str:
        return self.meta.get("positive_name", "malignant")

    @property
    def negative_name(self) -> str:
        return self.meta.get("negative_name", "benign")

    @property
    def positive_indices(self) -> list[int]:
        """Model outputs that count as malignant: the diagnoses the label map sends to 1."""
        if self.meta.get("head") == "binary":
            return [1]
        return [i for i, name in enumerate(self.class_names) if self.meta["labels"].get(name) == 1]

    def transform(self, draw: int = 0) -> Callable:
        """The evaluation preprocessing as torch transforms (PIL image -> normalised tensor); draw >= 1: that fixed
        augmentation of the image first (test-time views beyond 8; images.AugmentedView)."""
        from .datasets import build_transform

        return self._preprocessing(build_transform, draw)

    def array_transform(self, draw: int = 0) -> Callable:
        """The same preprocessing in numpy (PIL image -> normalised float32 array), for ONNX Runtime."""
        return self._preprocessing(EvalTransform, draw)

    def _preprocessing(self, make: Callable, draw: int) -> Callable:
        size, mean, std = self.meta["image_size"], self.meta["mean"], self.meta["std"]
        if draw:  # the augmentation crops the centre square itself, before it turns the image
            return AugmentedView(make(size, mean, std), draw, self.resize)
        return make(size, mean, std, resize=self.resize)

    @property
    def resize(self) -> str:
        """How a non-square image becomes square (model.json `resize`; runs from before it: squash)."""
        return self.meta.get("resize", "squash")

    def malignant_probability(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, self.positive_indices].sum(axis=1)

    @property
    def metadata_model(self) -> MetadataModel | None:
        """The age/sex model fused with the image's probabilities where metadata is given (None: image only)."""
        values = self.meta.get("metadata_model")
        if not values:
            return None
        from .metadata import MetadataModel

        return MetadataModel.from_dict(values)

    @property
    def uses_metadata(self) -> bool:
        """Whether age/sex given with an image change its prediction (an ensemble: any member's)."""
        return self.metadata_model is not None

    def fuses(self, row: dict | None) -> bool:
        """Whether this image's {'age', 'sex'} change its prediction: a metadata model for the fields it gives
        (an ensemble: any member's)."""
        if self.members:
            return any(member.fuses(row) for member in self.members)
        model = self.metadata_model
        return model is not None and model.covers(row)

    def predict_proba(self, images: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0,
                      tta: int | None = None, metadata=None) -> tuple[np.ndarray, list]:
        """Per-class probabilities [N, classes] (NaN rows for unreadable files) and the (index, reason) failures.

        tta: views averaged: 1, 2, 4 or 8 dihedral views; 16, 24, ... 64: the 8 of the image and of each of 1-7
        fixed augmentations of it (images.AugmentedView); None = the model's own setting (model.json `tta`, else 1).
        metadata: per image {'age': years, 'sex': 'male'|'female'} or None (or a DataFrame with age_approximate /
        sex columns); fused with the image probabilities when the model has a metadata model, ignored otherwise."""
        probs, errors, _, _ = self._outputs(images, batch_size, num_workers, tta, metadata, guarded=False)
        return probs, errors

    @property
    def has_guard(self) -> bool:
        """Whether predictions get an out-of-distribution score (an ensemble: every member has a guard)."""
        return self.guard is not None

    def judge(self, images: Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0,
              tta: int | None = None, metadata=None, refuse: bool = True) -> Judged:
        """predict_proba, with the guard's word on each image: its out-of-distribution score (1 is the limit; NaN
        without a guard) and, where the image is not one the model can judge, why (refuse=False: said, not
        enforced: every image keeps its verdict, for research)."""
        probs, errors, scores, frames = self._outputs(images, batch_size, num_workers, tta, metadata, guarded=True)
        reasons = []
        for i in range(len(probs)):
            problem = frame_problem(*frames[i]) if len(frames) else None
            if problem is None and self.has_guard and np.isfinite(probs[i]).all() and not np.isfinite(scores[i]):
                problem = "the guard could not score the image (its features are not finite)"
            if problem is None and scores[i] > 1:
                problem = f"the image {OUT_OF_DISTRIBUTION} (out-of-distribution score {_above_one(scores[i])}; " \
                          "above 1 is refused)"
            reasons.append(problem or "")
        return Judged(probs, errors, scores, reasons, refuse, self.has_guard)

    def _outputs(self, images, batch_size: int, num_workers: int, tta: int | None, metadata, guarded: bool
                 ) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
        """Probabilities [N, classes] and failures; with `guarded`, the out-of-distribution scores [N] (NaN: no
        guard) and each frame's luminance mean and spread [N, 2]."""
        tta = self.meta.get("tta", 1) if tta is None else tta
        if images is None or isinstance(images, (bytes, bytearray)):
            raise TypeError("images: expected a list of paths, PIL images or arrays (for encoded bytes, "
                            "PIL.Image.open(io.BytesIO(data)))")
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray)
                                                             and not is_batch_array(images)):
            images = [images]  # one image, as `predict` takes it
        images = list(images)
        rows = _normalise_rows(metadata, images)
        sources = []
        for i, image in enumerate(images):
            try:
                sources.append(as_source(image, i))
            except ImageError as err:  # an image too small: its own error, as for an unreadable file
                sources.append(err)
        features = guarded and self.guard is not None
        views = self.meta.get("guard", {}).get("views", tta) if features else tta
        if features and views != tta and (self.source, tta) not in _WARNED_VIEWS:
            _WARNED_VIEWS.add((self.source, tta))
            log.warning("%s: the guard's threshold was chosen on %d view(s) per image; with %d its refusals are "
                        "approximate", self.source, views, tta)
        output = "probs+features" if features else "probs"
        extra = (lambda batch: pixel_stats(batch, self.meta["mean"], self.meta["std"])) if guarded else None
        values, errors = average_views(self, sources, batch_size, num_workers, tta, output, extra)
        classes = len(self.class_names)
        probs = values[:, :classes] if values.shape[1] else values
        scores = np.full(len(images), np.nan)
        frames = np.full((len(images), PIXEL_STATS), np.nan)
        if guarded and values.shape[1]:
            frames = values[:, -PIXEL_STATS:].astype(np.float64)
            if features:
                scores = self.guard.score(values[:, classes:-PIXEL_STATS])
        probs = np.ascontiguousarray(probs)
        model = self.metadata_model
        if model is not None and rows is not None and probs.shape[1]:
            probs = model.fuse(probs, rows)
        failed = {i for i, _ in errors}
        broken = [i for i in np.flatnonzero(~np.isfinite(probs).all(1)) if i not in failed] if probs.shape[1] else []
        if broken:  # never let a NaN read as 'benign'
            probs[broken] = np.nan
            errors = sorted([*errors, *((int(i), "the model gave a non-finite output (corrupted weights?)")
                                        for i in broken)])
        return probs, errors, scores, frames

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0,
                tta: int | None = None, metadata=None, refuse: bool = True) -> pd.DataFrame:
        """One row per image: source, a probability per class, the malignant probability, the label at the
        model's threshold ('refused' where the guard refuses the image), the out-of-distribution score (1 is the
        limit), whether the image is in distribution, why it was refused, and an error message for files that
        could not be read; `metadata_used` where metadata was given to a model that fuses it. The rows are
        `predictions`' records (Prediction), as a table.

        metadata: see predict_proba; one dict (or None) per image, a single dict for a single image.
        refuse: False keeps every verdict (the guard's columns are still filled), for research."""
        predictions = self.predictions(images, batch_size=batch_size, num_workers=num_workers, tta=tta,
                                       metadata=metadata, refuse=refuse)
        return predictions_table(predictions, self.class_names, self.positive_name,
                                 metadata_used=metadata is not None and self.uses_metadata)

    def predictions(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32, num_workers: int = 0,
                    tta: int | None = None, metadata=None, refuse: bool = True) -> list[Prediction]:
        """What the model says of each image (see Prediction): `predict` without the table (and without pandas)."""
        if images is None or isinstance(images, (bytes, bytearray)):
            raise TypeError("images: expected an image or a list of paths, PIL images or arrays (for encoded bytes, "
                            "PIL.Image.open(io.BytesIO(data)))")
        if isinstance(images, (str, Path, Image.Image, np.ndarray)) and not is_batch_array(images):
            images = [images]
            metadata = [metadata] if isinstance(metadata, dict) else metadata
        images = list(images)
        judged = self.judge(images, batch_size=batch_size, num_workers=num_workers, tta=tta, metadata=metadata,
                            refuse=refuse)
        return self.records(images, judged, metadata)

    def records(self, images: Sequence[ImageInput], judged: Judged, metadata=None,
                sources: Sequence[str] | None = None) -> list[Prediction]:
        """The one place that decides what a prediction says (its label, the guard's word, the sentence a person
        reads), from what `judge` returned for these images. metadata: as given to `judge`; each record says
        whether its age/sex were fused. sources: the images' names (default: the path, or '<image N>')."""
        errors = dict(judged.errors)
        probs = judged.probs
        malignant = self.malignant_probability(probs) if probs.shape[1] else np.full(len(images), np.nan)
        rows = _normalise_rows(metadata, list(images)) if self.uses_metadata else None
        if sources is None:
            sources = [describe(image, i) for i, image in enumerate(images)]
        records = []
        for i, source in enumerate(sources):
            error, probability = errors.get(i, ""), malignant[i]
            refused = not error and judged.refused(i)
            verdict = ("" if np.isnan(probability) else
                       self.positive_name if probability >= self.threshold else self.negative_name)
            records.append(Prediction(
                source=source,
                probabilities=probs[i] if probs.shape[1] else np.full(len(self.class_names), np.nan),
                malignant=probability,
                label="refused" if refused else verdict,
                ood_score=judged.ood_score[i],
                in_distribution=None if error else judged.in_distribution(i),
                refusal="" if error else judged.refusals[i],
                error=error,
                sentence=("" if error else refusal_sentence(judged.refusals[i]) if refused else
                          sentence(probability, self.threshold, self.positive_name, self.negative_name)),
                metadata_used=rows is not None and not error and self.fuses(rows[i]),
            ))
        return records


def load_model(run: str | Path, engine: str = "auto", guard: bool = True) -> Classifier:
    """Load a trained run (the run folder, or its model/ folder); no pickle is ever read.

    engine: 'torch' (eager PyTorch), 'onnx' (ONNX Runtime on RUN/model/model.onnx, made by `skincancer export`),
    'int8' (its int8 graph, model.int8.onnx, made by `skincancer export --int8`) or 'auto' (int8, else onnx, when
    a current export exists, else torch; not an int8 graph that export timed slower than the float one). With a
    current export of the same network and weights (checked by their SHA-256), the PyTorch network is built only
    when something asks for `model`.
    guard: False loads the model without its out-of-distribution guard (`skincancer guard` refitting a damaged one).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    model_dir = find_model_dir(run)
    meta = read_meta(model_dir)
    runtime = None
    if engine == "int8" or (engine == "auto" and (model_dir / INT8_FILE).is_file() and not _slower_int8(model_dir)):
        runtime = _current_export(model_dir, meta, guard, INT8_FILE)
        if runtime is None and engine == "auto":
            log.warning("%s: not current (retrained or exported again since?); run `skincancer export --model %s "
                        "--int8` again; using the float graph if it is current", model_dir / INT8_FILE,
                        model_dir.parent)
    if runtime is None and engine in ("onnx", "auto"):
        runtime = _current_export(model_dir, meta, guard)
    if runtime is None:
        model = _build_network(model_dir, meta)
        num_features = getattr(model, "num_features", None)
    else:  # the export was checked against these weights in this network when it was made
        model, num_features = Deferred(lambda: _build_network(model_dir, meta)), runtime.num_features
    if meta.get("unfinished"):
        log.warning("%s: saved during training (epoch %s) by a run that has not finished: its threshold (%s) is a "
                    "placeholder, not chosen on validation; finish it with `skincancer train --resume`",
                    model_dir, meta.get("epoch"), meta["threshold"])
    try:
        guard = load_guard(model_dir, meta.get("guard")) if guard else None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{model_dir / META_FILE}: guard: {err}") from None
    if guard is not None and len(guard.mean) != (num_features or len(guard.mean)):
        raise CheckpointError(f"{model_dir / 'guard.safetensors'}: statistics of {len(guard.mean)} features, the "
                              f"model has {num_features}; fit it again with `skincancer guard --model "
                              f"{model_dir.parent}`")
    if engine != "torch" and runtime is None:
        runtime = find_export(model_dir, required=engine != "auto", image_size=int(meta["image_size"]),
                              classes=len(meta["class_names"]), name=INT8_FILE if engine == "int8" else ONNX_FILE)
    if runtime is not None and guard is not None and not runtime.has_features:
        problem = (f"{runtime.path}: exported before the guard (no features output); run `skincancer export "
                   f"--model {model_dir.parent}{' --int8' if runtime.name == 'int8' else ''}` again")
        if engine != "auto":
            raise ExportError(problem)
        log.warning("%s; using PyTorch", problem)
        runtime = None
    return Classifier(model=model, meta=meta, source=model_dir, engine=runtime, guard=guard)


def _slower_int8(model_dir: Path) -> bool:
    if slower_than_float(model_dir / INT8_FILE):
        log.info("%s: slower than the float graph where it was exported (its sidecar's speedup); using the float "
                 "graph (--engine int8 uses it)", model_dir / INT8_FILE)
        return True
    return False


# What model_from_meta builds the network from: an export made from the same fields and weights is that network.
NETWORK_FIELDS = ("backbone", "class_names", "pooling", "head")


def _current_export(model_dir: Path, meta: dict, guard: bool, name: str = ONNX_FILE) -> OnnxEngine | None:
    """The run's ONNX engine when it can stand in for the PyTorch network without building it: a current export
    (find_export's checks) whose sidecar records this model.json's network fields and these weights (model.json's
    weights_sha256 too), with the features output a guard needs. None otherwise, silently: the full load that
    follows says what is wrong, as it always has."""
    path = model_dir / name
    try:
        recorded = json.loads(path.with_name(path.name + ".json").read_text())
        digest = weights_digest(model_dir)
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or any(recorded.get(k) != meta.get(k) for k in NETWORK_FIELDS):
        return None
    if meta["weights_sha256"] != digest:
        return None
    try:
        runtime = find_export(model_dir, required=True, image_size=int(meta["image_size"]),
                              classes=len(meta["class_names"]), weights_sha256=digest, name=name)
    except ExportError:
        return None
    if guard and meta.get("guard") is not None and not runtime.has_features:
        return None
    return runtime


def _build_network(model_dir: Path, meta: dict) -> nn.Module:
    """The PyTorch network model.json describes, with its checked weights, in eval mode."""
    from .backbones import model_from_meta
    from .checkpoint import load_weights_into, read_weights

    try:
        model = model_from_meta(meta)
    except (BackboneError, ValueError) as err:
        raise CheckpointError(f"{model_dir / META_FILE}: {err}") from None
    load_weights_into(model, read_weights(model_dir, meta["weights_sha256"]), str(model_dir))
    return model.eval()


def _normalise_rows(metadata, images: list) -> list[dict | None] | None:
    """metadata.normalise_rows for these images (None: no metadata, and no pandas to import)."""
    if metadata is None:
        return None
    from .metadata import normalise_rows

    return normalise_rows(metadata, len(images), image_ids(images))


def _above_one(score: float) -> str:
    """A refused image's score with the digits that show it is above 1 (1.003, not 1.00)."""
    digits = 2
    while float(f"{score:.{digits}f}") <= 1 and digits < 6:
        digits += 1
    return f"{score:.{digits}f}"
