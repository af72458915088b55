"""Distillation: a student network trained on a teacher's soft targets (skincancer distill).

The teacher (one run, or several as their ensemble) gives each training image its per-class probabilities, with all
its test-time views. A labelled image's target is distill_alpha * the teacher's + (1 - distill_alpha) * its true
label; an extra image (a transfer set: no label needed, e.g. HAM10000) has the teacher's alone. Cross-entropy with
probability targets is the KL divergence to them up to a constant. Validation, the threshold and the guard are those
of any fine-tune, on the labelled images. The teacher's probabilities are computed once and kept in the run folder
(TARGETS_FILE), so `train --resume` does not pay for them again.

Out of fold (distill_out_of_fold): the teacher runs are those of every fold of a cross-validation, and each image's
probabilities are the mean of the runs whose weights were never fitted on it (their model/fitted_images.json), so no
target is the teacher's memory of an image it trained on. With folds of one recipe per member (e.g. three folds x
Lite0, Lite2 and the probe), a held-out image's target is its fold's ensemble; an extra image, seen by none, has the
mean of them all.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import FITTED_IMAGES_FILE, CheckpointError, atomic_write, fitted_images
from .data import TEXT_COLUMNS, DataError, content_keys, read_csv_checked
from .images import expand_inputs
from .provenance import file_sha256

log = logging.getLogger("skincancer")

TARGETS_FILE = "teacher_targets.safetensors"


@dataclass
class Distillation:
    """What fit_finetune trains on when a teacher is given."""

    train_df: pd.DataFrame  # the labelled training images, then the extra ones (diagnosis '', label -1)
    hard: np.ndarray  # [N] the class for balancing: the true one, or the teacher's most probable for extra images
    soft: np.ndarray  # [N, classes] float32: the targets
    record: dict  # model.json's `distilled_from`
    keys: list  # content keys of train_df's files, and of the validation files (hashed once, for fitted_images)
    valid_keys: list


def distil(config, splits: tuple, meta: dict, out: Path, world, teacher=None) -> tuple[tuple, np.ndarray]:
    """train's splits (train_df, train_targets, valid_df, valid_targets, class_names) with the extra images added,
    and the targets to train on (teacher_targets; every process of a multi-process run computes them, which takes
    no longer than one doing it while the others wait on a barrier that may time out, and rank 0 saves them). meta
    gets `distilled_from` and the `sources` of the images and of the teachers (their licences travel on); the
    extra images join the training images in model/fitted_images.json."""
    from .runfolder import write_fitted_images
    from .sources import source_table, starting_sources

    train_df, train_targets, valid_df, valid_targets, class_names = splits
    taught = teacher_targets(config, class_names, train_df, train_targets, out, valid_df, save=world.is_main,
                             teacher=teacher)
    meta["distilled_from"] = taught.record
    meta["sources"] = [*source_table(taught.train_df, valid_df), *teacher_sources(taught.record),
                       *starting_sources(meta)]
    if world.is_main:
        write_fitted_images(out / "model", taught.keys, taught.valid_keys)
    return (taught.train_df, taught.hard, valid_df, valid_targets, class_names), taught.soft


def check_teacher(config, class_names: list[str] | None = None, teacher=None):
    """The teacher (one run, or several as an ensemble; loaded unless given), refused unless its label map is the
    student's and, once they are known, its classes are the student's: checked before a run folder is touched."""
    from .ensemble import load_models

    if teacher is None:
        teacher = FoldTeachers(config.teacher) if config.distill_out_of_fold else load_models(config.teacher)
    if teacher.meta["labels"] != config.labels or (class_names is not None and teacher.class_names != class_names):
        raise DataError(f"teacher: classes {teacher.class_names} (labels {teacher.meta['labels']}) differ from the "
                        f"student's {class_names or ''} (labels {config.labels}); give the student the teacher's "
                        "labels (labels: in the config)")
    return teacher


class FoldTeachers:
    """The teacher runs of every fold, for out-of-fold targets: one classifier each, with the same classes and label
    map (as an ensemble's members), but not an ensemble: no shared threshold (each validated on its own fold)."""

    def __init__(self, runs: list[str]):
        from .checkpoint import find_model_dir
        from .predict import load_model

        self.fitted = [fitted_on(find_model_dir(run)) for run in runs]  # before the networks: a missing record is quick
        self.runs = [load_model(run) for run in runs]
        first = self.runs[0]
        for run in self.runs[1:]:
            if run.class_names != first.class_names or run.meta["labels"] != first.meta["labels"]:
                raise CheckpointError(f"{run.source}: classes {run.class_names} (labels {run.meta['labels']}) differ "
                                      f"from {first.source}'s; the fold runs must be of one teacher")
        self.meta, self.class_names = first.meta, first.class_names


def extra_images(paths: list[str]) -> pd.DataFrame:
    """The extra images named by manifests (only `filepath` is read: their diagnoses need not be the model's),
    folders (every image inside) or files, as manifest rows without labels."""
    from .sources import licence_of

    frames = []
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"extra: {path}: no such file or folder")
        if Path(path).suffix.lower() == ".csv":
            frame = read_csv_checked(path, ["filepath"], dtype=dict.fromkeys(TEXT_COLUMNS, str))
            base = Path(path).parent.absolute()
            files = [os.path.normpath(p if os.path.isabs(p) else base / p) for p in frame["filepath"].astype(str)]
            frames.append(pd.DataFrame({
                "image_id": frame["image_id"].astype(str) if "image_id" in frame else [Path(f).stem for f in files],
                "filepath": files, "source": frame["source"].astype(str) if "source" in frame else Path(path).stem,
                "licence": frame["licence"].astype(str) if "licence" in frame else None}))
        else:
            files = expand_inputs([path])
            if not files:
                raise DataError(f"extra: {path}: no image files")
            frames.append(pd.DataFrame({"image_id": [Path(f).stem for f in files], "filepath": files,
                                        "source": Path(path).name if Path(path).is_dir() else Path(path).parent.name,
                                        "licence": None}))
    frame = pd.concat(frames, ignore_index=True)
    frame["licence"] = frame["licence"].fillna(frame["source"].map(licence_of)).astype(str)  # ham10000: CC BY-NC
    return frame.assign(diagnosis="", label=-1)


def teacher_targets(config, class_names: list[str], train_df: pd.DataFrame, train_targets: np.ndarray,
                    out: Path, valid_df: pd.DataFrame | None = None, save: bool = True,
                    teacher=None) -> Distillation:
    """The student's training set and targets (see the module's docstring); the teacher's probabilities are read
    from out/TARGETS_FILE when it holds them for these very images and this teacher, else computed (and saved).
    An extra image that is a training or validation image (same bytes), or another extra one, is left out."""
    teacher = check_teacher(config, class_names, teacher)
    extra = extra_images(config.extra) if config.extra else train_df.iloc[:0]
    keys = content_keys([*train_df["filepath"], *extra["filepath"]])
    valid_keys = content_keys(valid_df["filepath"]) if valid_df is not None else []
    seen = {*keys[:len(train_df)], *valid_keys}
    kept = []
    for key in keys[len(train_df):]:
        kept.append(key is not None and key not in seen)
        seen.add(key)
    if not all(kept):
        log.warning("extra: %d image(s) left out: unreadable, or copies of training or validation images or of "
                    "each other", kept.count(False))
    extra = extra[np.asarray(kept, dtype=bool)].reset_index(drop=True)
    keys = [*keys[:len(train_df)], *(k for k, keep in zip(keys[len(train_df):], kept, strict=True) if keep)]
    paths = [*train_df["filepath"], *extra["filepath"]]
    digests = [m.meta["weights_sha256"] for m in teacher.runs]
    stamp = [*digests, "out-of-fold"] if config.distill_out_of_fold else digests
    probs = _cached(out / TARGETS_FILE, keys, stamp)
    if probs is None:
        log.info("teacher %s: targets for %d images (views %s)%s", " + ".join(map(str, config.teacher)),
                 len(paths), " + ".join(str(int(m.meta.get("tta", 1))) for m in teacher.runs),
                 ", out of fold" if config.distill_out_of_fold else "")
        if config.distill_out_of_fold:
            probs, errors = _out_of_fold(teacher, paths, keys, config)
        else:
            probs, errors = teacher.predict_proba(paths, batch_size=config.batch_size,
                                                  num_workers=config.num_workers)
        for index, reason in errors:
            log.warning("teacher: %s: %s (left out of training)", paths[index], reason)
        if save:
            _save(out / TARGETS_FILE, probs, keys, stamp)
    probs = probs.astype(np.float32)
    n = len(train_df)
    onehot = np.eye(len(class_names), dtype=np.float32)[train_targets]
    soft = np.concatenate([config.distill_alpha * probs[:n] + (1 - config.distill_alpha) * onehot, probs[n:]])
    hard = np.concatenate([train_targets, np.nan_to_num(probs[n:], nan=0).argmax(1)]).astype(int)
    joined = pd.concat([train_df, extra], ignore_index=True)
    readable = np.isfinite(soft).all(1)  # the teacher could not read an image: no target, so not trained on
    record = {
        "teachers": [{"run": str(_run_folder(m.source)), "backbone": m.meta["backbone"], "weights_sha256": d,
                      "tta": int(m.meta.get("tta", 1)), "sources": m.meta.get("sources")}
                     for m, d in zip(teacher.runs, digests, strict=True)],
        **({"out_of_fold": True} if config.distill_out_of_fold else {}),
        "alpha": config.distill_alpha, "label_smoothing": config.label_smoothing,
        "labelled_images": int(readable[:n].sum()), "extra_images": int(readable[n:].sum()), "file": TARGETS_FILE,
    }
    return Distillation(joined[readable].reset_index(drop=True), hard[readable], soft[readable], record,
                        [k for k, ok in zip(keys, readable, strict=True) if ok], valid_keys)


def _out_of_fold(teacher: FoldTeachers, paths: list[str], keys: list, config) -> tuple[np.ndarray, list]:
    """Each image's probabilities: the mean of the teacher runs not fitted on it (see the module's docstring), and
    the (index, reason) of the images none could read. An image every run was fitted on is refused, by name."""
    total = np.zeros((len(paths), len(teacher.class_names)))
    count = np.zeros(len(paths), dtype=int)
    errors: dict[int, str] = {}
    for run, fitted in zip(teacher.runs, teacher.fitted, strict=True):
        rows = np.array([i for i, key in enumerate(keys) if key not in fitted], dtype=int)
        log.info("teacher %s: %d of the %d images are out of its fold", _run_folder(run.source), len(rows), len(keys))
        if not len(rows):
            continue
        probs, failed = run.predict_proba([paths[i] for i in rows], batch_size=config.batch_size,
                                          num_workers=config.num_workers)
        errors.update((int(rows[index]), reason) for index, reason in failed)
        ok = np.isfinite(probs).all(1)
        total[rows[ok]] += probs[ok]
        count[rows[ok]] += 1
    errors = {i: reason for i, reason in errors.items() if count[i] == 0}  # another run read it: trained on
    unseen = [i for i in np.flatnonzero(count == 0) if i not in errors]
    if len(set(count[count > 0])) > 1:
        log.warning("teacher (out of fold): images have targets from different numbers of runs (%s): is a fold's "
                    "member missing?", ", ".join(f"{n} runs: {k} images" for n, k in
                                                  zip(*np.unique(count[count > 0], return_counts=True), strict=True)))
    if unseen:
        raise DataError(f"teacher (out of fold): every teacher run was fitted on {len(unseen)} of the images, e.g. "
                        f"{', '.join(paths[i] for i in unseen[:3])}; give the runs of every fold (each image held "
                        "out by at least one), or leave out distill_out_of_fold")
    with np.errstate(invalid="ignore"):
        return (total / count[:, None]).astype(np.float32), sorted(errors.items())


def fitted_on(model_dir: Path) -> set:
    """The content keys of the images a run's weights were fitted on (its starting run's too), from its
    model/fitted_images.json; a run without that record is refused: it cannot say which images are out of its fold."""
    path = Path(model_dir) / FITTED_IMAGES_FILE
    try:
        return {str(k) for k in fitted_images(model_dir, required=True)["train"]}
    except (OSError, ValueError, TypeError, AttributeError) as err:
        why = "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({err.__class__.__name__}: {err})"
        raise DataError(f"teacher (out of fold): {path}: {why}; a run without the record of the images it was "
                        "fitted on cannot give out-of-fold targets") from None


def teacher_sources(record: dict) -> list[dict]:
    """The data the teachers learnt from, as rows of the student's `sources` (their licences travel on)."""
    from .card import teacher_names
    from .sources import inherited_sources

    rows = [row for teacher, name in zip(record["teachers"], teacher_names(record), strict=True)
            for row in inherited_sources(teacher.get("sources"), f"through the teacher {name}")]
    return list({json.dumps(row, sort_keys=True, default=str): row for row in rows}.values())


def _run_folder(model_dir: Path) -> Path:
    """The run folder a model folder sits in (RUN/model), or the model folder itself if it stands alone."""
    model_dir = Path(model_dir)
    return model_dir.parent if model_dir.name == "model" else model_dir


def _cached(path: Path, keys: list, digests: list[str]) -> np.ndarray | None:
    """The saved probabilities if they are for these images (content keys) and these teachers' weights."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            saved = handle.metadata() or {}
            probs = handle.get_tensor("probabilities")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); delete it to compute the teacher's targets again") from None
    if saved.get("keys") != _digest(keys) or saved.get("teachers") != ",".join(digests):
        return None
    return probs


def _save(path: Path, probs: np.ndarray, keys: list, digests: list[str]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"probabilities": np.ascontiguousarray(probs, dtype=np.float32)},
                                             str(tmp), metadata={"keys": _digest(keys), "teachers": ",".join(digests)}))
    log.info("teacher targets saved to %s (sha256 %s)", path, file_sha256(path)[:12])


def _digest(keys: list) -> str:
    import hashlib

    return hashlib.sha256("\n".join(str(k) for k in keys).encode()).hexdigest()
