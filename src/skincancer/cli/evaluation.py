"""Commands on evaluation: evaluate a run on labelled images, compare two evaluations."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import typer

from .common import ENGINE_HELP, check_inference_options, fail, output_file


def evaluate(
    model: Annotated[list[Path], typer.Option(help="run folder; repeat for an ensemble (probabilities averaged)")],
    data: Annotated[Path, typer.Option(help="labelled manifest CSV or folder-per-class directory")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for metrics.json, predictions, plots, report.html")],
    tta: Annotated[int | None, typer.Option(help="test-time views: 1, 2, 4, 8, 16, 24, ... 64 (default: the model's)")
                   ] = None,
    batch_size: int = 32,
    num_workers: int = 2,
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
    metadata: Annotated[bool, typer.Option("--metadata/--no-metadata", help=(
        "fuse the manifest's age/sex columns for models trained with metadata"))] = True,
    group_by: Annotated[list[str] | None, typer.Option(help=(
        "a manifest column (site, camera, skin type...) whose values get their own AUC, sensitivity and "
        "specificity; repeat for several"))] = None,
    error_examples: Annotated[int, typer.Option(help=(
        "thumbnails in the report of up to this many missed malignant and flagged benign images, the worst of each "
        "(0: no images in the report)"))] = 8,
) -> None:
    """Evaluate a run: AUC with 95% CI, operating points, ROC, confusion matrix, HTML report."""
    from ..evaluate import evaluate as run_evaluation
    from ..predict import ENGINES

    if engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    check_inference_options(tta, batch_size, num_workers)
    if error_examples < 0:
        fail(f"--error-examples: expected 0 or more images, got {error_examples}")
    metrics = run_evaluation(model, data, out, tta=tta, batch_size=batch_size, num_workers=num_workers,
                             use_metadata=metadata, engine=engine, error_examples=error_examples,
                             group_by=group_by or ())  # checks --out and --group-by before the models load
    lo, hi = metrics["auc_ci95"]
    typer.echo(f"{'n':<36}{metrics['n']} ({metrics['n_positive']} malignant)")
    typer.echo(f"{'AUC (95% CI)':<36}{metrics['auc']:.4f} ({lo:.4f}-{hi:.4f})")
    for name, value in metrics.get("class_auc", {}).items():
        typer.echo(f"{'AUC ' + name + ' vs rest':<36}{value:.4f}")
    if metrics["n_with_metadata"]:
        typer.echo(f"{'images with age/sex fused':<36}{metrics['n_with_metadata']}")
    for kind, groups in metrics.get("subgroups", {}).items():
        for name, group in groups.items():
            low, high = group.get("auc_ci95", [math.nan, math.nan])
            auc = "n/a (one class)" if math.isnan(group["auc"]) else f"{group['auc']:.4f} ({low:.4f}-{high:.4f})"
            typer.echo(f"{'AUC ' + kind + ': ' + name:<36}{auc} ({group['n']} images, {group['n_positive']} malignant)")
    typer.echo(f"{'threshold':<36}{metrics['threshold']:.4f}")
    for key in ("sensitivity", "specificity"):
        low, high = metrics[f"{key}_ci95"]
        typer.echo(f"{key + ' (95% CI)':<36}{metrics[key]:.4f} ({low:.4f}-{high:.4f})")
    for key in ("balanced_accuracy", "accuracy", "ppv", "npv"):
        typer.echo(f"{key:<36}{metrics[key]:.4f}")
    calibration = metrics["calibration"]
    brier, reference = calibration["brier"], calibration["brier_reference"]
    typer.echo(f"{'Brier score (prevalence alone)':<36}{brier:.4f} ({reference:.4f})")
    typer.echo(f"{'calibration error (ECE)':<36}{calibration['ece']:.4f}")
    guard = metrics["guard"]
    kind = "out-of-distribution guard and frame checks" if guard["guarded"] else "frame checks (the model has no guard)"
    typer.echo(f"{'refused by the guard':<36}{guard['n_refused']} of {metrics['n']} ({kind}; counted in the figures "
               "above)")
    if "without_refused" in guard:
        kept = guard["without_refused"]
        typer.echo(f"{'AUC without them':<36}{kept['auc']:.4f} ({kept['n']} images); sensitivity "
                   f"{kept['sensitivity']:.4f}, specificity {kept['specificity']:.4f}")
    typer.echo(f"report: {out / 'report.html'}")
    if metrics["skipped"]:  # everything is written; the exit status says the figures cover only part of the data
        fail(f"{len(metrics['skipped'])} of {metrics['n'] + len(metrics['skipped'])} images could not be read "
              f"(named above and in metrics.json); the figures are on the other {metrics['n']}", code=1)


def compare(
    first: Annotated[Path, typer.Argument(help="an evaluation folder (`evaluate --out`)")],
    second: Annotated[Path, typer.Argument(help="another evaluation of the same images")],
    task: Annotated[str, typer.Option(help=(
        "malignant (the malignant probability against the label) or a diagnosis such as seborrheic_keratosis "
        "(its one-vs-rest probability)"))] = "malignant",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="also write the result as JSON")] = None,
) -> None:
    """Compare two models' AUC on the same images: the difference, its 95% CI and DeLong's p-value."""
    from ..checkpoint import write_json
    from ..evaluate import compare as compare_evaluations
    from ..evaluate import json_with_keys

    if out is not None:
        output_file(out, (".json",), inputs=(first, second))
        for folder in (first, second):
            if os.path.realpath(out).startswith(os.path.realpath(folder) + os.sep):
                fail(f"--out {out}: inside the evaluation {folder}, which it would change; write it elsewhere")
        if out.exists() and not json_with_keys(out, {"auc_a", "auc_b", "p_value"}):
            fail(f"--out {out}: exists and is not an earlier comparison; choose a new file name")
    result = compare_evaluations(first, second, task)
    low, high = result["difference_ci95"]
    typer.echo(f"{'first':<28}{first}\n{'second':<28}{second}")
    typer.echo(f"{'images both scored':<28}{result['n']} ({result['n_positive']} {task})")
    for key, name in (("only_in_first", "first"), ("only_in_second", "second")):
        if result[key]:
            typer.echo(f"{'':<28}({result[key]} more scored only by the {name}: left out)")
    typer.echo(f"{'AUC first':<28}{result['auc_a']:.4f}\n{'AUC second':<28}{result['auc_b']:.4f}")
    typer.echo(f"{'difference (95% CI)':<28}{result['difference']:+.4f} ({low:+.4f} to {high:+.4f})")
    typer.echo(f"{'DeLong p-value':<28}{result['p_value']:.4g}")
    if math.isnan(result["p_value"]):
        typer.echo("(no spread between the two models' rankings to test a difference against)")
    for name, seen in result.get("seen_in_fitting", {}).items():
        typer.echo(f"warning: the {name} model was fitted on {seen['train']} and validated on {seen['valid']} of "
                   "these images (its evaluation says so): its AUC, and the comparison, are optimistic", err=True)
    if out is not None:
        write_json(out, result)
