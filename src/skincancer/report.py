"""Report: ROC, confusion-matrix and calibration plots, the sample grid, and the HTML evaluation report."""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from . import NOTICE  # noqa: E402
from .checkpoint import atomic_write  # noqa: E402
from .data import ImageError, load_image  # noqa: E402
from .provenance import describe  # noqa: E402


def _literal(text: object) -> str:
    """User-controlled text (folder, class and file names) as written: matplotlib reads text between two `$` as
    mathtext, so a folder `tiny_$1_$2` crashed the plots; an escaped `\\$` is drawn as a plain `$`."""
    return str(text).replace("$", r"\$")


def _plain_text(plot):
    """Run a plot with TeX rendering off: a matplotlibrc with text.usetex would fail on `_` and `^` in names."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with plt.rc_context({"text.usetex": False}):
            return plot(*args, **kwargs)
    return wrapper


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


@_plain_text
def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], operating_point: tuple[float, float] | None,
             path: Path, title: str = "ROC") -> Path:
    """curves: name -> (labels, scores, auc). operating_point: (1 - specificity, sensitivity) at the threshold."""
    fig, ax = plt.subplots(figsize=(5, 5))
    lines = []
    for name, (labels, scores, auc) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        lines += ax.plot(fpr, tpr, lw=2, label=f"{_literal(name)} (AUC {auc:.3f})")
    if operating_point is not None:
        lines += ax.plot(*operating_point, "o", color="black", label="chosen threshold")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title=_literal(title), xlim=(0, 1), ylim=(0, 1.01))
    # explicit handles: left to itself, legend() drops labels that start with "_" (a class named "_x")
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    return _save(fig, path)


@_plain_text
def plot_confusion(counts: dict[str, int], names: tuple[str, str], path: Path) -> Path:
    """Counts and row-normalised rates side by side; rows are the truth, columns the prediction."""
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], dtype=float)
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, values, fmt, title in ((axes[0], matrix, "{:.0f}", "counts"), (axes[1], normalised, "{:.2f}",
                                                                            "normalised by true class")):
        ax.imshow(values / max(values.max(), 1e-9), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, fmt.format(v), ha="center", va="center", color="white" if values[i, j] > values.max() / 2
                    else "black", fontsize=13)
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=[_literal(n) for n in names],
               yticklabels=[_literal(n) for n in names], xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


@_plain_text
def plot_calibration(calibration: dict, path: Path, title: str = "Calibration") -> Path:
    """Reliability diagram (observed malignant share against mean probability, per bin) over the bins' image counts.
    `calibration`: metrics.calibration's result."""
    bins = calibration["bins"]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    ax.plot([b["mean_probability"] for b in bins], [b["observed"] for b in bins], "o-", lw=2,
            label=f"model (ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f})")
    ax.set(ylabel="observed share malignant", title=_literal(title), xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left")
    counts.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["n"] for b in bins],
               width=[0.9 * (b["high"] - b["low"]) for b in bins], color="#8aa")
    counts.set(xlabel="predicted probability of malignancy", ylabel="images")
    return _save(fig, path)


@_plain_text
def preview_grid(manifest: pd.DataFrame, path: Path, n: int = 16, seed: int = 0, columns: int = 4) -> Path:
    """A grid of sample images with their diagnosis and label (the tutorial's show_batch)."""
    sample = manifest.sample(min(n, len(manifest)), random_state=seed) if len(manifest) > n else manifest
    rows = int(np.ceil(len(sample) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), sample.iterrows(), strict=False):
        try:
            ax.imshow(load_image(row["filepath"]))
            verdict = "malignant" if row["label"] == 1 else "benign"
            ax.set_title(f"{_literal(row['diagnosis'])} ({verdict})", fontsize=9)
        except ImageError as err:
            ax.set_title(f"unreadable: {_literal(err.reason)}", fontsize=8, color="red")
    return _save(fig, path)


def _png(path: Path) -> dict:
    return {"data": base64.b64encode(path.read_bytes()).decode(), "name": path.stem}


THUMBNAIL_SIDE = 160


def _thumbnail(path: str | Path, caption: str) -> dict:
    """A figure: the image as an embedded JPEG thumbnail (`jpeg`), or the reason it cannot be shown (`unreadable`),
    and its caption."""
    try:
        image = load_image(path)
    except ImageError as err:
        return {"unreadable": err.reason, "caption": caption}
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return {"jpeg": base64.b64encode(buffer.getvalue()).decode(), "caption": caption}


def error_examples(table: pd.DataFrame, filepaths, score: str, threshold: float, n: int) -> dict[str, list[dict]]:
    """The evaluation's worst errors at `threshold`: up to n malignant images scored lowest (missed) and up to n
    benign images scored highest (false alarms), each {image_id, diagnosis, probability, filepath}."""
    frame = table.assign(filepath=list(filepaths))
    frame = frame[frame[score].notna()]
    missed = frame[(frame["label"] == 1) & (frame[score] < threshold)].sort_values(score, kind="stable").head(n)
    alarms = frame[(frame["label"] == 0) & (frame[score] >= threshold)].sort_values(
        score, ascending=False, kind="stable").head(n)
    return {name: [{"image_id": str(r.image_id), "diagnosis": str(r.diagnosis), "probability": float(r[score]),
                    "filepath": str(r.filepath)} for _, r in part.iterrows()]
            for name, part in (("missed", missed), ("false_alarms", alarms))}


def _error_gallery(examples: dict | None) -> list[dict] | None:
    """The report's section of thumbnails: what the model missed and what it mistook for malignant."""
    if not examples:
        return None
    return [{"heading": heading, "none": none,
             "figures": [_thumbnail(e["filepath"], f"{e['image_id']}, {e['diagnosis']}: {100 * e['probability']:.2f}%")
                         for e in examples[name]]}
            for name, heading, none in (
                ("missed", "Malignant images it scored lowest (missed at the threshold)",
                 "none: every malignant image is at or above the threshold"),
                ("false_alarms", "Benign images it scored highest (flagged at the threshold)",
                 "none: every benign image is below the threshold"))]


def _fmt(value) -> str:
    """A figure as the report shows it (the template escapes it): 4 decimals, n/a for NaN, lists in brackets."""
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _provenance(metrics: dict) -> list[str]:
    """Which code and data made these figures: the evaluation's environment and each model's training record."""
    env = metrics.get("environment")
    if not env:
        return []
    data = env.get("data", {})
    lines = [f"Evaluated {data.get('images', '?')} images (data fingerprint {str(data.get('fingerprint', ''))[:16]}) "
             f"with {describe(env)}, {env.get('at', '')}."]
    for run, trained in (metrics.get("model", {}).get("trained_with") or {}).items():
        if isinstance(trained, dict):
            data = trained.get("data") if isinstance(trained.get("data"), dict) else {}
            splits = ", ".join(f"{split} {d.get('images', '?')} images ({str(d.get('fingerprint', '?'))[:16]})"
                               for split, d in data.items() if isinstance(d, dict))
            resumed = trained.get("resumed") if isinstance(trained.get("resumed"), list) else []
            resumes = "".join(f"; resumed with {describe(r)}, {r.get('at', '')}"
                              for r in resumed if isinstance(r, dict))
            lines.append(f"{run}: trained with {describe(trained)}, {trained.get('at', '')}{resumes}; {splits}.")
        else:
            lines.append(f"{run}: saved before runs recorded their environment.")
    return lines


def _figures(metrics: dict) -> list[tuple[str, object]]:
    """The table's headline rows, (name, value), before the calibration's."""
    headline = ["n", "n_positive", "auc", "auc_ci95", "threshold", "sensitivity", "sensitivity_ci95", "specificity",
                "specificity_ci95", "ppv", "npv", "accuracy", "balanced_accuracy"]
    rows = [(k, metrics[k]) for k in headline if k in metrics]
    at_half = metrics.get("at_0.5", {})
    rows += [(f"{k} at 0.5", at_half[k]) for k in ("sensitivity", "specificity", "balanced_accuracy") if k in at_half]
    rows += [(f"specificity at sensitivity {k}", v) for k, v in metrics.get("specificity_at_sensitivity", {}).items()]
    return rows + [(f"AUC {k} vs rest", v) for k, v in metrics.get("class_auc", {}).items()]


def report_context(metrics: dict, plots: list[Path], title: str, examples: dict | None) -> dict:
    """What templates/report.html shows, as plain values: the template escapes every string in it."""
    model = metrics.get("model", {})
    source = str(model.get("validation_source") or "valid")
    seen = metrics.get("seen_in_fitting") or {}
    return {
        "title": title, "notice": NOTICE, "data": str(metrics.get("data", "")), "figures": _figures(metrics),
        "model": {"backbone": str(model.get("backbone", "")), "mode": str(model.get("mode", "")),
                  "class_names": model.get("class_names", [])},
        # whether age and sex went into these figures (evaluate fuses them where the data and the model have them)
        "with_metadata": (metrics["n_with_metadata"] or 0) if "n_with_metadata" in metrics else None,
        "n": metrics.get("n", "?"),
        "unfinished": metrics.get("unfinished_models"),
        "threshold_where": ("on out-of-fold predictions over the training and validation images"
                            if source.startswith("out-of-fold") else "on the validation split"),
        "threshold_policy": str(model.get("threshold_policy", "")),
        "seen": {"train": seen["train"], "valid": seen["valid"], "examples": seen.get("examples", [])}
        if seen.get("train") or seen.get("valid") else None,
        "unchecked": seen.get("unchecked_models"),
        "calibration": metrics.get("calibration"), "subgroups": metrics.get("subgroups"), "guard": metrics.get("guard"),
        "plots": [_png(p) for p in plots], "threshold": metrics.get("threshold"), "examples": _error_gallery(examples),
        "skipped": metrics.get("skipped", []), "provenance": _provenance(metrics),
    }


@functools.cache
def _templates():
    from jinja2 import Environment, PackageLoader, select_autoescape

    environment = Environment(loader=PackageLoader("skincancer", "templates"), autoescape=select_autoescape(),
                              keep_trailing_newline=True)
    environment.filters["fmt"] = _fmt
    return environment


def html_report(metrics: dict, plots: list[Path], path: Path, title: str = "skincancer evaluation",
                examples: dict | None = None) -> Path:
    """One self-contained HTML page (templates/report.html, autoescaped; plots and thumbnails embedded) with the
    headline metrics and the notice; `examples`: error_examples() for a section of thumbnails of the worst errors."""
    page = _templates().get_template("report.html").render(report_context(metrics, plots, title, examples))
    atomic_write(path, lambda tmp: tmp.write_text(page))
    return path
