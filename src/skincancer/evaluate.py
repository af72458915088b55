"""Evaluation: score a trained run on labelled data and write metrics.json, predictions, plots and the HTML report."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import FITTED_IMAGES_FILE, atomic_write, fitted_images, write_json
from .data import DataError, check_labels_agree, content_keys, manifest_labels, resolve_data
from .ensemble import Ensemble, load_models
from .metadata import MetadataError, has_metadata
from .metadata import records as metadata_records
from .metrics import binary_report, delong_test, roc_auc, subgroup_report
from .predict import Classifier
from .provenance import data_fingerprint, environment
from .report import error_examples as worst_errors
from .report import html_report, plot_calibration, plot_confusion, plot_roc

log = logging.getLogger("skincancer")
ISIC_TASKS = ("melanoma", "seborrheic_keratosis")


def evaluate(model: str | Path | Classifier | Sequence[str | Path], data: str | Path, out: str | Path,
             tta: int | None = None, batch_size: int = 32, num_workers: int = 2, n_boot: int = 2000,
             use_metadata: bool = True, engine: str = "auto", error_examples: int = 8,
             group_by: Sequence[str] = ()) -> dict:
    """Predict every image of `data` (manifest or folder-per-class) and write the evaluation into `out`.

    `model`: a run, a loaded Classifier, or several runs (an ensemble averaging their probabilities).
    `tta`: views to average (Classifier.predict_proba); None uses each model's own setting (model.json's `tta`).
    `use_metadata`: fuse the manifest's age/sex columns, where present, for models with a metadata model.
    `engine`: how runs given as paths are loaded (onnx | int8 | torch | auto), once `out` is known to be usable.
    `error_examples`: the report shows thumbnails of up to this many missed malignant and flagged benign images,
    the worst of each kind (0: none, and no image in the report).
    `group_by`: manifest columns (a site, a camera, a skin type...) whose values get their own figures, as sex and
    age bands do."""
    out = Path(out)
    _check_out_folder(out, data)
    _check_group_columns(data, group_by)
    if isinstance(model, Classifier):
        classifier = model
    else:
        classifier = load_models([model] if isinstance(model, (str, Path)) else list(model), engine=engine)
    out.mkdir(parents=True, exist_ok=True)
    frame = resolve_data(data, classifier.meta["labels"])
    check_labels_agree(frame, classifier.meta["labels"], data)
    own = classifier.class_names if classifier.meta.get("head") == "diagnosis" else classifier.meta["labels"]
    others = sorted(set(manifest_labels(frame)) - set(own))
    if others:
        log.warning("%s: diagnoses %s are not among the model's (%s): they count by the manifest's label for the "
                    "malignant figures and get no AUC of their own", data, ", ".join(others), ", ".join(own))
    _require_both_labels(frame["label"], data, "")
    patients = _patients(frame, data, use_metadata)
    rows = patients if use_metadata else None
    judged = classifier.judge(list(frame["filepath"]), batch_size=batch_size, num_workers=num_workers, tta=tta,
                              metadata=rows)
    probs, errors = judged.probs, judged.errors
    skipped = [{"path": frame["filepath"].iloc[i], "reason": reason} for i, reason in errors]
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    ok = ~np.isnan(probs).any(1) if probs.shape[1] else np.zeros(len(frame), bool)
    if not ok.any():
        raise DataError(f"{data}: none of the {len(frame)} images could be read")
    malignant = classifier.malignant_probability(probs)
    labels = frame["label"].to_numpy()
    _require_both_labels(frame["label"][ok], data, " among the readable images")

    metrics = _figures(classifier, frame, probs, malignant, ok, patients, group_by, n_boot)
    metrics["guard"] = guard_figures(judged, labels, malignant, ok, classifier.threshold, frame["image_id"], n_boot)
    metrics.update({
        "data": str(data), "tta": _tta_used(classifier, tta), "skipped": skipped,
        "n_with_metadata": _metadata_used(classifier, rows, ok),
        "model": {k: classifier.meta.get(k) for k in ("backbone", "mode", "head", "class_names", "image_size",
                                                         "threshold", "threshold_policy", "validation_source",
                                                         "validation")}
                 | {"positive_name": classifier.positive_name, "engine": classifier.engine_name},
    })
    table = _write_predictions(out, classifier, frame, judged, malignant, ok)
    _add_provenance(metrics, classifier, frame, ok, data)
    write_json(out / "metrics.json", metrics)
    _write_report(out, metrics, classifier, frame, table, probs, malignant, ok, data, error_examples)
    return metrics


def _figures(classifier: Classifier, frame: pd.DataFrame, probs: np.ndarray, malignant: np.ndarray, ok: np.ndarray,
             patients: list | None, group_by: Sequence[str], n_boot: int) -> dict:
    """The malignant figures on the readable images, each class's AUC, and the figures of each subgroup."""
    labels = frame["label"].to_numpy()
    metrics = binary_report(labels[ok], malignant[ok], classifier.threshold, n_boot=n_boot)
    metrics["class_auc"] = {}
    if classifier.meta.get("head") != "binary" and "diagnosis" in frame:
        for c, name in enumerate(classifier.class_names):
            is_class = (frame["diagnosis"].to_numpy() == name).astype(int)[ok]
            metrics["class_auc"][name] = roc_auc(is_class, probs[ok, c])
        tasks = [metrics["class_auc"].get(t) for t in ISIC_TASKS]
        if all(v is not None for v in tasks):
            metrics["isic_mean_auc"] = float(np.mean(tasks))
    if patients is not None:  # how the model does for each sex and age band, where the manifest says
        metrics["subgroups"] = {
            kind: subgroup_report(labels[ok], malignant[ok], classifier.threshold,
                                  [group(p) for p, good in zip(patients, ok, strict=True) if good])
            for kind, group in (("sex", _sex_group), ("age", _age_group))}
        ages = metrics["subgroups"]["age"]  # youngest first, not alphabetically
        metrics["subgroups"]["age"] = {k: ages[k] for k in [name for _, name in AGE_BANDS] + ["unknown"] if k in ages}
    for column in group_by:  # the user's own columns
        values = [_group_value(v) for v in frame[column][ok]]
        metrics.setdefault("subgroups", {})[column] = subgroup_report(labels[ok], malignant[ok],
                                                                      classifier.threshold, values)
    return metrics


def _write_predictions(out: Path, classifier: Classifier, frame: pd.DataFrame, judged, malignant: np.ndarray,
                       ok: np.ndarray) -> pd.DataFrame:
    """predictions.csv (every image), and isic_predictions.csv for a model of the ISIC tasks; the table."""
    probs, errors = judged.probs, judged.errors
    table = pd.DataFrame({
        "image_id": frame["image_id"], "diagnosis": frame["diagnosis"], "label": frame["label"].to_numpy(),
        **{name: probs[:, c] for c, name in enumerate(classifier.class_names)},
        classifier.positive_name: malignant,
        "predicted": np.where(np.isnan(malignant), -1, (malignant >= classifier.threshold).astype(int)),
        "error": [dict(errors).get(i, "") for i in range(len(frame))],
        "ood_score": judged.ood_score,
        "refusal": [r if good else "" for r, good in zip(judged.refusals, ok, strict=True)],
    })
    atomic_write(out / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    if all(t in classifier.class_names for t in ISIC_TASKS):  # the challenge's submission format
        isic = table.loc[ok, ["image_id", *ISIC_TASKS]]
        atomic_write(out / "isic_predictions.csv", lambda tmp: isic.to_csv(tmp, index=False))
    elif (out / "isic_predictions.csv").exists():
        (out / "isic_predictions.csv").unlink()  # an earlier evaluation's, of another model: never leave it stale
    return table


def _add_provenance(metrics: dict, classifier: Classifier, frame: pd.DataFrame, ok: np.ndarray, data) -> None:
    """Where the figures came from: the environment and data, the images the model was fitted on, its training."""
    keys = content_keys(list(frame["filepath"]))  # each file hashed once: for the fingerprint and the overlap check
    metrics["environment"] = {**environment(), "data": {
        "images": int(ok.sum()),
        "fingerprint": data_fingerprint([k for k, good in zip(keys, ok, strict=True) if good],
                                        list(frame["diagnosis"][ok]))}}
    seen = seen_in_fitting(classifier, frame["filepath"], keys)
    if seen is not None:
        metrics["seen_in_fitting"] = seen
        if seen["train"] or seen["valid"]:
            log.warning("%s: %d of the %d images were training images and %d validation images of the model "
                        "(identical bytes, e.g. %s): figures on them are optimistic", data, seen["train"], len(frame),
                        seen["valid"], ", ".join(seen["examples"]))
    # where each model came from (older runs did not record it: null)
    metrics["model"]["trained_with"] = {str(m.source): m.meta.get("environment")
                                        for m in classifier.runs}
    unfinished = [str(m.source) for m in classifier.runs if m.meta.get("unfinished")]
    if unfinished:
        metrics["unfinished_models"] = unfinished  # the report says their threshold is a placeholder


def _write_report(out: Path, metrics: dict, classifier: Classifier, frame: pd.DataFrame, table: pd.DataFrame,
                  probs: np.ndarray, malignant: np.ndarray, ok: np.ndarray, data, error_examples: int) -> None:
    """The plots (ROC, confusion matrix, calibration) and report.html."""
    labels = frame["label"].to_numpy()
    curves = {classifier.positive_name: (labels[ok], malignant[ok], metrics["auc"])}
    for name in ISIC_TASKS[1:]:
        if name in metrics["class_auc"] and not np.isnan(metrics["class_auc"][name]):
            c = classifier.class_names.index(name)
            curves[f"{name} vs rest"] = ((frame["diagnosis"].to_numpy() == name)[ok].astype(int), probs[ok, c],
                                         metrics["class_auc"][name])
    plots = [
        plot_roc(curves, (1 - metrics["specificity"], metrics["sensitivity"]), out / "roc.png",
                 title=f"ROC on {Path(str(data)).name} (n={metrics['n']})"),
        plot_confusion(metrics["confusion"], (classifier.negative_name, classifier.positive_name),
                       out / "confusion_matrix.png"),
        plot_calibration(metrics["calibration"], out / "calibration.png",
                         title=f"Calibration on {Path(str(data)).name} (n={metrics['n']})"),
    ]
    examples = (worst_errors(table, frame["filepath"], classifier.positive_name, classifier.threshold, error_examples)
                if error_examples > 0 else None)
    html_report(metrics, plots, out / "report.html", examples=examples)


def guard_figures(judged, labels: np.ndarray, malignant: np.ndarray, ok: np.ndarray, threshold: float,
                  image_ids, n_boot: int) -> dict:
    """What the guard did on labelled data: how many images it would refuse and why, and the figures on the images
    it lets through (the headline figures keep every image, as the model was scored before the guard)."""
    refused = np.array([bool(r) for r in judged.refusals]) & ok
    out_of_distribution = refused & np.array([not r.startswith("the frame") for r in judged.refusals])
    figures = {"guarded": judged.guarded, "n_refused": int(refused.sum()),
               "n_out_of_distribution": int(out_of_distribution.sum()),
               "n_frame_problems": int((refused & ~out_of_distribution).sum()),
               "refused_share": float(refused.sum() / max(1, ok.sum())),
               "refused": [{"image_id": str(image_ids.iloc[i]), "reason": judged.refusals[i]}
                           for i in np.flatnonzero(refused)[:50]]}
    if judged.guarded:
        scores = judged.ood_score[ok]
        figures["ood_score_quantiles"] = {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.98")}
    kept = ok & ~refused
    if refused.any() and len(set(labels[kept])) == 2:
        report = binary_report(labels[kept], malignant[kept], threshold, n_boot=n_boot)
        figures["without_refused"] = {k: report[k] for k in ("n", "n_positive", "auc", "auc_ci95", "sensitivity",
                                                            "specificity", "balanced_accuracy")}
    return figures


def compare(first: str | Path, second: str | Path, task: str = "malignant") -> dict:
    """Two evaluations of the same images (folders `evaluate` wrote): the AUC of each on the images both scored, the
    difference first - second with its 95% interval, and DeLong's p-value of 'no difference'.

    task: 'malignant' compares the malignant-vs-benign probability of each model (against `label`); a diagnosis
    (e.g. 'seborrheic_keratosis') compares that class's one-vs-rest probability."""
    models = [_evaluated_model(Path(folder)) for folder in (first, second)]
    if any(m.get("positive_name") == task and task not in m.get("class_names", []) for m in models):
        task = "malignant"  # a model's own name for its malignant probability, not one of its classes
    tables = [_evaluation_table(Path(folder), task, model)
              for folder, model in zip((first, second), models, strict=True)]
    common = tables[0].index.intersection(tables[1].index)
    if len(common) == 0:
        raise DataError(f"{first} and {second}: no image scored by both (compare evaluations of the same data)")
    truth = [t.loc[common, "truth"] for t in tables]
    differs = common[truth[0].to_numpy() != truth[1].to_numpy()]
    if len(differs):
        raise DataError(f"{first} and {second}: {len(differs)} images are labelled differently in the two "
                        f"evaluations, e.g. {differs[0]}; compare evaluations with the same labels")
    labels = truth[0].to_numpy()
    if min(labels.sum(), len(labels) - labels.sum()) < 2:
        raise DataError(f"{first} and {second}: of the {len(common)} images both scored, {int(labels.sum())} are "
                        f"positive for {task}; comparing AUCs needs at least 2 of each class")
    result = delong_test(labels, tables[0].loc[common, "score"], tables[1].loc[common, "score"])
    result.update({"task": task, "first": str(first), "second": str(second),
                   "only_in_first": int(len(tables[0]) - len(common)),
                   "only_in_second": int(len(tables[1]) - len(common))})
    seen = {}  # images a model was fitted or validated on make its AUC optimistic, and the comparison with it
    for name, folder in (("first", first), ("second", second)):
        record = json.loads((Path(folder) / "metrics.json").read_text()).get("seen_in_fitting") or {}
        if isinstance(record, dict) and (record.get("train") or record.get("valid")):
            seen[name] = {"train": int(record.get("train") or 0), "valid": int(record.get("valid") or 0)}
    if seen:
        result["seen_in_fitting"] = seen
    return result


def _evaluation_table(folder: Path, task: str, model: dict) -> pd.DataFrame:
    """image_id -> truth (0/1) and score for `task`, from an evaluation folder's predictions.csv (`model`: its
    metrics.json's)."""
    path = folder / "predictions.csv"
    try:
        table = pd.read_csv(path, dtype={"image_id": str, "diagnosis": str})
    except (ValueError, OSError) as err:  # empty, truncated, not CSV
        raise DataError(f"{path}: unreadable ({err})") from None
    missing = [c for c in ("image_id", "diagnosis", "label", "predicted") if c not in table]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} column(s); not a predictions table of `evaluate`")
    positive = model.get("positive_name")
    columns = list(table.columns)
    if task == "malignant":
        # by name where metrics.json records it; evaluations made before that: the column `evaluate` writes just
        # before `predicted` (a class named like the positive class shares that column)
        score = positive if positive in table else columns[columns.index("predicted") - 1]
        table = table.assign(truth=table["label"], score=pd.to_numeric(table[score], errors="coerce"))
    else:
        if task not in table or task in ("image_id", "diagnosis", "label", "predicted", "error"):
            raise DataError(f"{path}: no {task!r} probability column (its model's classes do not include it)")
        table = table.assign(truth=(table["diagnosis"] == task).astype(int),
                             score=pd.to_numeric(table[task], errors="coerce"))
    if table["image_id"].duplicated().any():
        raise DataError(f"{path}: image_id {table['image_id'][table['image_id'].duplicated()].iloc[0]!r} appears "
                        "twice; images are matched by id")
    table = table[table["score"].notna()]  # images the model could not read
    return table.set_index("image_id")[["truth", "score"]]


def _evaluated_model(folder: Path) -> dict:
    """metrics.json's `model` of an evaluation folder ({} for evaluations that did not record it)."""
    if not _is_evaluation(folder / "metrics.json") or not (folder / "predictions.csv").is_file():
        raise DataError(f"{folder}: not an evaluation folder (no metrics.json and predictions.csv of `evaluate`)")
    model = json.loads((folder / "metrics.json").read_text()).get("model")
    return model if isinstance(model, dict) else {}


def seen_in_fitting(classifier: Classifier, paths: Sequence[str], keys: Sequence[str | None] | None = None
                    ) -> dict | None:
    """How many of `paths` have the bytes of an image the model (any ensemble member) trained on, or was validated
    on (its threshold, epoch or regularisation chosen there); None for runs saved before this was recorded."""
    fitted: dict[str, set] = {"train": set(), "valid": set()}
    members = classifier.runs
    unchecked = []
    for member in members:
        try:  # the images of the run its weights started from (init_from) too
            record = fitted_images(Path(member.source), required=True)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            if not isinstance(err, FileNotFoundError):
                log.warning("%s: unreadable (%s); not checking which images the model was fitted on",
                            Path(member.source) / FITTED_IMAGES_FILE, err)
            unchecked.append(str(member.source))
        else:
            for split in fitted:
                fitted[split].update(str(k) for k in record[split])
    if len(unchecked) == len(members):
        return None
    keys = content_keys(paths) if keys is None else keys
    train = [p for p, k in zip(paths, keys, strict=True) if k in fitted["train"]]
    valid = [p for p, k in zip(paths, keys, strict=True) if k in fitted["valid"] and k not in fitted["train"]]
    seen = {"train": len(train), "valid": len(valid), "examples": [Path(p).name for p in (train + valid)[:5]]}
    if unchecked:  # members saved before runs recorded their images: no claim about them
        seen["unchecked_models"] = unchecked
        log.warning("%s: saved without a record of its training images; not checked for overlap",
                    ", ".join(unchecked))
    return seen


AGE_BANDS = ((30, "under 30"), (50, "30-49"), (70, "50-69"), (float("inf"), "70 and over"))


def _patients(frame: pd.DataFrame, data, use_metadata: bool) -> list | None:
    """The manifest's age and sex per row (None without those columns). With --no-metadata they only group the
    figures, so an unreadable value skips the subgroups instead of stopping the evaluation."""
    if not has_metadata(frame):
        return None
    try:
        return metadata_records(frame, str(data))
    except MetadataError as err:
        if use_metadata:
            raise
        log.warning("%s; no subgroup figures", err)
        return None


MAX_GROUPS = 50


def _check_group_columns(data: str | Path, columns: Sequence[str]) -> None:
    """--group-by needs a manifest holding each column, with a manageable number of values: checked before the
    models load."""
    if not columns:
        return
    path = Path(data)
    if path.is_dir() or path.suffix.lower() != ".csv":
        raise DataError(f"--group-by: {data} is not a manifest; a folder-per-class tree has no columns to group by")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    for column in columns:
        if column in ("age_approximate", "sex", "age"):
            raise DataError(f"--group-by {column}: age and sex are grouped already (from the age_approximate and sex "
                            "columns: sex, and age bands)")
        if column not in frame.columns:
            raise DataError(f"--group-by {column}: no such column in {path} (columns: {', '.join(frame.columns)})")
        groups = frame[column].map(_group_value).nunique()
        if groups > MAX_GROUPS:
            raise DataError(f"--group-by {column}: {groups} different values (at most {MAX_GROUPS}); an identifier "
                            "or a number is no grouping: add a column with fewer categories")


def _group_value(value) -> str:
    """A cell as its group's name: 'unknown' where empty; 3.0 (a number column with gaps) as 3."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    return "unknown" if text.lower() in ("", "nan", "unknown", "none", "na", "n/a") else text


def _sex_group(patient: dict | None) -> str:
    return (patient or {}).get("sex") or "unknown"


def _age_group(patient: dict | None) -> str:
    age = (patient or {}).get("age")
    return "unknown" if age is None else next(name for limit, name in AGE_BANDS if age < limit)


def _tta_used(classifier: Classifier, tta: int | None) -> int | str:
    if tta is not None:
        return tta
    return "per model" if isinstance(classifier, Ensemble) else classifier.meta.get("tta", 1)


def _metadata_used(classifier: Classifier, rows: list | None, ok: np.ndarray) -> int:
    """Evaluated images whose age/sex were fused into the prediction (0 when the model has no metadata model)."""
    if rows is None or not classifier.uses_metadata:
        return 0
    return int(sum(classifier.fuses(row) for row, good in zip(rows, ok, strict=True) if good))


def _check_out_folder(out: str | Path, data: str | Path) -> None:
    """An evaluation goes into a new or empty folder, or replaces an earlier evaluation (a folder whose
    metrics.json `evaluate` wrote); never into a folder of other files (a user's documents, a run) nor inside a
    folder-per-class image tree being evaluated (its plots would become images of it)."""
    out, data = Path(out), Path(data)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file is in the way of the evaluation folder (choose another --out)")
    if data.is_dir() and Path(os.path.realpath(out)).is_relative_to(os.path.realpath(data)):
        raise DataError(f"{out}: inside the image folder {data}; evaluate into a folder outside it")
    if out.is_dir() and any(out.iterdir()) and not _is_evaluation(out / "metrics.json"):
        raise DataError(f"{out}: not empty and not an earlier evaluation (no metrics.json of `evaluate`); evaluate "
                        "into a new or empty folder")


def _is_evaluation(path: Path) -> bool:
    return json_with_keys(path, {"auc", "n", "threshold", "skipped"})


def json_with_keys(path: Path, keys: set[str]) -> bool:
    """Whether `path` is a JSON object holding `keys`: an output this tool wrote, which it may replace."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and keys <= record.keys()


def _require_both_labels(labels, data, where: str) -> None:
    if labels.nunique() < 2:
        only = "malignant" if labels.iloc[0] == 1 else "benign"
        raise DataError(f"{data}: every image{where} is {only}; AUC and specificity/sensitivity need both malignant "
                        "and benign images (use `predict` for data without both)")

