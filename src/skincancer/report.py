"""Report: ROC, confusion-matrix and calibration plots, the sample grid, and the HTML evaluation report."""

from __future__ import annotations

import base64
import functools
import html
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


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


THUMBNAIL_SIDE = 160


def _thumbnail_tag(path: str | Path, caption: str) -> str:
    """A figure with the image as an embedded JPEG thumbnail (or the reason it cannot be shown) and a caption."""
    try:
        image = load_image(path)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        picture = (f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}" '
                   f'alt="{html.escape(caption)}">')
    except ImageError as err:
        picture = f"<span>unreadable now: {html.escape(err.reason)}</span>"
    return f"<figure>{picture}<figcaption>{html.escape(caption)}</figcaption></figure>"


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


def _error_gallery(examples: dict | None, metrics: dict) -> str:
    """The report's section of thumbnails: what the model missed and what it mistook for malignant."""
    if not examples:
        return ""
    threshold = _fmt(metrics.get("threshold"))
    parts = []
    for name, heading, none in (
            ("missed", "Malignant images it scored lowest (missed at the threshold)", "none: every malignant image "
             "is at or above the threshold"),
            ("false_alarms", "Benign images it scored highest (flagged at the threshold)", "none: every benign image "
             "is below the threshold")):
        figures = "".join(_thumbnail_tag(e["filepath"], f"{e['image_id']}, {e['diagnosis']}: "
                                                        f"{100 * e['probability']:.2f}%") for e in examples[name])
        parts.append(f"<h3>{heading}</h3>" + (f'<div class="gallery">{figures}</div>' if figures else f"<p>{none}</p>"))
    return (f"<h2>Errors to look at</h2><p>At the threshold {threshold}, the worst errors of each kind, with the "
            "malignant probability the model gave. Looking at them shows what it misses and what it mistakes for "
            "malignant (rulers, ink marks, hair or a blurred photo can mislead such models); they are examples, not a "
            "measurement.</p>" + "".join(parts))


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return html.escape(str(value))


def _subgroup_table(subgroups: dict | None) -> str:
    """Per sex and age band where the data had them, and per value of the columns asked for: n, AUC, sensitivity and
    specificity with their intervals."""
    if not subgroups:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(kind)}: {html.escape(name)}</td><td>{g['n']} ({g['n_positive']})</td>"
        f"<td>{_fmt(g['auc'])} {_fmt(g.get('auc_ci95', ''))}</td>"
        f"<td>{_fmt(g['sensitivity'])} {_fmt(g['sensitivity_ci95'])}</td>"
        f"<td>{_fmt(g['specificity'])} {_fmt(g['specificity_ci95'])}</td></tr>"
        for kind, groups in subgroups.items() for name, g in groups.items())
    return (f"<h2>Subgroups</h2><p>By {html.escape(', '.join(subgroups))}, from the data's columns. Small groups "
            "give wide intervals: a difference between groups is a question to test on more data, not a finding.</p>"
            "<table><tr><th>group</th><th>images (malignant)</th><th>AUC [95% CI]</th><th>sensitivity [95% CI]</th>"
            "<th>specificity [95% CI]</th></tr>"
            f"{rows}</table>")


def _metadata_note(metrics: dict) -> str:
    """Whether age and sex went into these figures (evaluate fuses them where the data and the model have them)."""
    if "n_with_metadata" not in metrics:
        return ""
    used = metrics["n_with_metadata"]
    return (f"Age and sex were fused with the image for {used} of the {metrics.get('n', '?')} images." if used else
            "Age and sex were not used: the figures are the images' alone.")


def _calibration_note(calibration: dict) -> str:
    return (f"<p>Calibration: a probability of 30% should mean that about 30 in 100 such images are malignant; the "
            "calibration plot shows how far that held here (expected calibration error "
            f"{_fmt(calibration['ece'])}). It holds at most for data like this, where "
            f"{100 * calibration['prevalence']:.1f}% of the images are malignant: where melanoma is rarer (a general "
            "clinic), the same image is less likely to be malignant than its probability says.</p>")


def _provenance_note(metrics: dict) -> str:
    """Which code and data made these figures: the evaluation's environment and each model's training record."""
    env = metrics.get("environment")
    if not env:
        return ""
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
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f'<h2>Provenance</h2><ul class="provenance">{items}</ul>'


def _guard_note(guard: dict | None) -> str:
    """What the out-of-distribution guard would have refused on these images, and the figures without them."""
    if not guard:
        return ""
    kind = ("its out-of-distribution guard and frame checks" if guard.get("guarded") else
            "frame checks only (this model has no out-of-distribution guard)")
    text = (f"<h2>Images the model would refuse</h2><p>By {kind}: {guard['n_refused']} image(s) "
            f"({guard['n_out_of_distribution']} not like the training images, {guard['n_frame_problems']} blank, "
            "black or washed-out frames). They count in the figures above, as the model's own scores.")
    kept = guard.get("without_refused")
    if kept:
        text += (f" Without them ({kept['n']} images): AUC {_fmt(kept['auc'])}, sensitivity "
                 f"{_fmt(kept['sensitivity'])}, specificity {_fmt(kept['specificity'])}.")
    items = "".join(f"<li>{html.escape(r['image_id'])}: {html.escape(r['reason'])}</li>"
                    for r in guard.get("refused", [])[:20])
    return text + "</p>" + (f"<ul>{items}</ul>" if items else "")


def html_report(metrics: dict, plots: list[Path], path: Path, title: str = "skincancer evaluation",
                examples: dict | None = None) -> Path:
    """One self-contained HTML page (plots and thumbnails embedded) with the headline metrics and the notice;
    `examples`: error_examples() for a section of thumbnails of the worst errors."""
    headline = ["n", "n_positive", "auc", "auc_ci95", "threshold", "sensitivity", "sensitivity_ci95", "specificity",
                "specificity_ci95", "ppv", "npv", "accuracy", "balanced_accuracy"]
    rows = "".join(f"<tr><th>{k}</th><td>{_fmt(metrics[k])}</td></tr>" for k in headline if k in metrics)
    at_half = metrics.get("at_0.5", {})
    rows += "".join(f"<tr><th>{k} at 0.5</th><td>{_fmt(at_half[k])}</td></tr>"
                    for k in ("sensitivity", "specificity", "balanced_accuracy") if k in at_half)
    rows += "".join(f"<tr><th>specificity at sensitivity {k}</th><td>{_fmt(v)}</td></tr>"
                    for k, v in metrics.get("specificity_at_sensitivity", {}).items())
    rows += "".join(f"<tr><th>AUC {html.escape(k)} vs rest</th><td>{_fmt(v)}</td></tr>"
                    for k, v in metrics.get("class_auc", {}).items())
    calibration = metrics.get("calibration")
    if calibration:
        rows += (f"<tr><th>Brier score (always answering the prevalence: {_fmt(calibration['brier_reference'])})</th>"
                 f"<td>{_fmt(calibration['brier'])}</td></tr>"
                 f"<tr><th>expected calibration error (10 bins)</th><td>{_fmt(calibration['ece'])}</td></tr>"
                 f"<tr><th>mean probability / share malignant</th><td>{_fmt(calibration['mean_probability'])} / "
                 f"{_fmt(calibration['prevalence'])}</td></tr>")
    model = metrics.get("model", {})
    skipped = metrics.get("skipped", [])
    unfinished = metrics.get("unfinished_models")
    source = str(model.get("validation_source") or "valid")
    where = ("on out-of-fold predictions over the training and validation images" if source.startswith("out-of-fold")
             else "on the validation split")
    threshold_note = (
        f'<strong class="notice">Unfinished training: {html.escape(", ".join(unfinished))} was saved before its '
        "run finished; the threshold is a placeholder, not chosen on validation.</strong>" if unfinished else
        f"The threshold was chosen {where} ({html.escape(str(model.get('threshold_policy', '')))}).")
    seen = metrics.get("seen_in_fitting") or {}
    if seen.get("train") or seen.get("valid"):
        threshold_note += (
            f' <strong class="notice">{seen["train"]} of these images were training images of the model and '
            f'{seen["valid"]} were validation images (identical files, e.g. '
            f'{html.escape(", ".join(seen.get("examples", [])))}): the figures are optimistic.</strong>')
    if seen.get("unchecked_models"):
        threshold_note += (f" Not checked for images they were fitted on (saved before runs recorded them): "
                           f"{html.escape(', '.join(seen['unchecked_models']))}.")
    skipped_html = "".join(f"<li>{html.escape(s['path'])}: {html.escape(s['reason'])}</li>" for s in skipped)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}
.notice{{background:#fff3cd;border:1px solid #e0c060;padding:10px;border-radius:4px}} img{{max-width:100%}}
strong.notice{{display:block;margin:.5em 0}}
.gallery{{display:flex;flex-wrap:wrap;gap:10px}} .gallery figure{{margin:0;width:160px;font-size:.8em}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p class="notice"><strong>Notice.</strong> {html.escape(NOTICE)}</p>
<p>Model: {html.escape(str(model.get('backbone', '')))} ({html.escape(str(model.get('mode', '')))}),
classes {html.escape(', '.join(model.get('class_names', [])))}; data: {html.escape(str(metrics.get('data', '')))}.
AUC is computed from predicted probabilities (not thresholded labels); the 95% interval is a stratified bootstrap.
{_metadata_note(metrics)} {threshold_note}</p>
{_calibration_note(calibration) if calibration else ''}
<table>{rows}</table>
{_subgroup_table(metrics.get("subgroups"))}
{_guard_note(metrics.get("guard"))}
{''.join(_img_tag(p) for p in plots)}
{_error_gallery(examples, metrics)}
{f'<h2>Skipped files</h2><ul>{skipped_html}</ul>' if skipped else ''}
{_provenance_note(metrics)}
</body></html>
"""
    atomic_write(path, lambda tmp: tmp.write_text(page))
    return path
