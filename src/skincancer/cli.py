"""Command line: parses arguments and calls the package's modules; no logic of its own."""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import NOTICE
from .config import DEFAULT_LABELS, VIEWS, load_config, parse_labels
from .errors import BackboneError, CheckpointError, ConfigError, DataError, MetadataError
from .progress import in_torchrun, other_rank

# The modules that do the work import torch, pandas and scikit-learn: each command imports what it needs inside it,
# so that `--help` answers at once.

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help=f"Melanoma vs benign skin lesion classifier. {NOTICE}")
log = logging.getLogger("skincancer")
KNOWN_ERRORS = (DataError, ConfigError, CheckpointError, BackboneError, FileNotFoundError)
ENGINE_HELP = "onnx | int8 | torch | auto (int8, else onnx, when `skincancer export` was run)"
DEFAULT_LABELS_TEXT = ",".join(f"{k}={v}" for k, v in DEFAULT_LABELS.items())


def _patient_metadata(files: list[str], csv: Path | None, age: float | None, sex: str | None) -> list | None:
    """Per-file {'age', 'sex'} rows from --metadata CSV (matched on the file name's stem) or --age/--sex."""
    if csv is None and age is None and sex is None:
        return None  # before importing metadata (pandas, scikit-learn): most predictions have none
    from .metadata import parse_age, parse_sex, read_metadata_csv, records

    if csv is not None and (age is not None or sex is not None):
        _fail("give either --metadata CSV or --age/--sex, not both")
    if age is not None or sex is not None:
        if len(files) != 1:
            _fail("--age/--sex describe one image; for several use --metadata CSV")
        try:
            return [{"age": parse_age(age, "--age", typed=True), "sex": parse_sex(sex, "--sex")}]
        except MetadataError as err:
            _fail(str(err))
    if csv is None:
        return None
    table = read_metadata_csv(csv)
    rows = []
    for path in files:
        stem = Path(path).stem
        rows.append(records(table.loc[[stem]], str(csv))[0] if stem in table.index else None)
    return rows


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _output_file(out: Path, suffixes: tuple[str, ...], inputs=(), option: str = "--out",
                 replaces: tuple[str, ...] = ()) -> None:
    """Fail before any work when `out` cannot be the file this command writes: wrong kind of name (so that a
    slip never turns an image or a manifest into a CSV), a folder, one of the command's own inputs, a read-only
    file, or (with `replaces`, the leading column names of this command's own tables) an existing file this
    command did not write."""
    if out.suffix.lower() not in suffixes:
        _fail(f"{option} {out}: expected a {' or '.join(suffixes)} file name")
    if out.is_dir():
        _fail(f"{option} {out}: is a folder; name a file")
    target = os.path.realpath(out)  # realpath, unlike Path.resolve, does not raise on a symlink loop
    if any(os.path.realpath(path) == target for path in inputs if path is not None):
        _fail(f"{option} {out}: is one of this command's inputs; writing there would destroy it")
    if out.is_file() and (not out.stat().st_mode & 0o222 or not os.access(out, os.W_OK)):  # root may write anything
        _fail(f"{option} {out}: is read-only; it stays as it is (choose another name)")
    if replaces and out.is_file() and out.stat().st_size and _leading_columns(out)[:len(replaces)] != list(replaces):
        _fail(f"{option} {out}: already exists and is not a table this command wrote; remove it or choose "
              "another name")


def _leading_columns(path: Path) -> list[str]:
    """The first column names of a CSV, JSON records or Parquet table ([] when it is none of them)."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        except Exception:  # not a Parquet file: not ours
            return []
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace").lstrip("\ufeff")
    if path.suffix.lower() == ".json":
        return re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', head.split("}")[0])  # the keys of the first record
    return next(csv.reader(head.splitlines()[:1]), [])


def _check_inference_options(tta: int | None, batch_size: int, num_workers: int) -> None:
    if tta is not None and tta not in VIEWS:
        _fail(f"--tta: must be 1, 2, 4 or 8 views, got {tta}")
    if batch_size < 1:
        _fail(f"--batch-size: expected 1 or more, got {batch_size}")
    if num_workers < 0:
        _fail(f"--num-workers: expected 0 (decode in this process) or more, got {num_workers}")


@app.command()
def index(
    directory: Annotated[Path | None, typer.Argument(help="folder-per-class tree: DIR/<diagnosis>/*.jpg")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="manifest CSV to write")] = Path("manifest.csv"),
    labels: Annotated[str, typer.Option(help="diagnosis=0|1 pairs; 1 = malignant")] = DEFAULT_LABELS_TEXT,
    isic_csv: Annotated[Path | None, typer.Option(help=(
        "ground-truth CSV instead of DIR: ISIC 2017, ISIC 2018/2019 (one-hot) or the HAM10000 metadata; "
        "the layout is read from its header"))] = None,
    images: Annotated[Path | None, typer.Option(help="image folder for --isic-csv")] = None,
    source: Annotated[str | None, typer.Option(help=(
        "the source's name in the manifest's `source` column (default: the CSV's layout, e.g. ham10000, or DIR's "
        "name)"))] = None,
    licence: Annotated[str | None, typer.Option(help=(
        "the images' licence, carried into every model trained on them (default: known for isic2017, isic2018, "
        "isic2019 and ham10000; otherwise 'not stated')"))] = None,
    skip_bad: Annotated[bool, typer.Option(help="drop unreadable files instead of failing")] = False,
    metadata: Annotated[Path | None, typer.Option(
        help="ISIC metadata CSV (image_id, age_approximate, sex) to join into the manifest")] = None,
) -> None:
    """Index images into a manifest (filepath, label, diagnosis); every file is decoded and checked."""
    from .data import check_files, index_folder, refuse_conflicting_copies, save_manifest
    from .metadata import attach, read_metadata_csv, records
    from .sources import index_csv, with_source

    # "image_id,filepath": a manifest; an ISIC ground-truth or metadata CSV starts with image_id alone
    _output_file(out, (".csv",), inputs=[isic_csv, metadata], replaces=("image_id", "filepath"))
    label_map = parse_labels(labels)
    patient = read_metadata_csv(metadata) if metadata is not None else None
    if isic_csv is not None:
        if images is None:
            _fail("--isic-csv needs --images DIR")
        manifest = index_csv(isic_csv, images, label_map, source, licence)
    elif directory is not None:
        manifest = with_source(index_folder(directory, label_map), source or directory.absolute().name, licence)
    else:
        _fail("give a DIRECTORY or --isic-csv GT.csv --images DIR")
    bad = check_files(list(manifest["filepath"]))
    for item in bad:
        typer.echo(f"bad file: {item.path}: {item.reason}", err=True)
    if bad and not skip_bad:
        _fail(f"{len(bad)} of {len(manifest)} files are unusable (listed above); fix them or pass --skip-bad")
    manifest = manifest[~manifest["filepath"].isin({b.path for b in bad})]
    if manifest.empty:
        _fail("no usable images left")
    for group in refuse_conflicting_copies(manifest, str(directory or isic_csv)):
        typer.echo(f"warning: identical files (one image counted {len(group)} times): "
                   f"{', '.join(manifest['filepath'].iloc[i] for i in group)}", err=True)
    if patient is not None:
        manifest = attach(manifest, patient)
        known = sum(row is not None for row in records(manifest, str(metadata)))
        typer.echo(f"metadata: age or sex known for {known} of {len(manifest)} images")
        if not known:
            typer.echo(f"warning: {metadata} gives age or sex for none of these images (matched on image_id); is it "
                       "this data set's metadata?", err=True)
    save_manifest(manifest, out)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["diagnosis"].value_counts().sort_index().items())
    typer.echo(f"wrote {out}: {len(manifest)} images ({counts}); {len(bad)} skipped")


@app.command()
def preview(
    manifest: Annotated[Path, typer.Argument(help="manifest CSV or folder-per-class directory")],
    out: Annotated[Path, typer.Option("-o", "--out")] = Path("grid.png"),
    n: Annotated[int, typer.Option(help="number of images")] = 16,
    seed: int = 0,
    labels: Annotated[str, typer.Option(help="diagnosis=0|1 pairs for a folder-per-class tree; 1 = malignant")
                      ] = DEFAULT_LABELS_TEXT,
) -> None:
    """Save a grid of sample images with their labels."""
    from .data import resolve_data
    from .report import preview_grid

    if n < 1:
        _fail(f"--n: expected 1 or more images, got {n}")
    data = resolve_data(manifest, parse_labels(labels))
    _output_file(out, (".png",), inputs=list(data["filepath"]))
    preview_grid(data, out, n=n, seed=seed)
    typer.echo(f"wrote {out}")


@app.command()
def train(
    train: Annotated[list[str] | None, typer.Option(help=(
        "training manifest CSV or folder-per-class directory; repeat for several sources"))] = None,
    valid: Annotated[str | None, typer.Option(help="validation manifest CSV or folder")] = None,
    out: Annotated[str | None, typer.Option(help="run folder to create")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config; flags override it")] = None,
    mode: Annotated[str | None, typer.Option(help="linear | finetune")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm model name")] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    eval_image_size: Annotated[int | None, typer.Option(
        help="fine-tune: size for validation and prediction (default: --image-size)")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    head: Annotated[str | None, typer.Option(help="diagnosis (one output per class) | binary")] = None,
    labels: Annotated[str | None, typer.Option(help="diagnosis=0|1 pairs")] = None,
    threshold_policy: Annotated[str | None, typer.Option(help="sensitivity:0.90 | youden | fixed:0.5 | ...")] = None,
    select_on: Annotated[str | None, typer.Option(help=(
        "a source (the manifests' `source` column) whose held-out images alone choose the model and its threshold"))
                         ] = None,
    augment: Annotated[str | None, typer.Option(help="none | standard | strong | perez")] = None,
    num_workers: Annotated[int | None, typer.Option()] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="cap steps per epoch (smoke tests)")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue an interrupted run from its last epoch")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace the run already in --out (its model and checkpoints)")
                         ] = False,
    nproc: Annotated[int | None, typer.Option(help="train with N processes (torchrun, DDP)")] = None,
    metadata: Annotated[bool | None, typer.Option(
        "--metadata/--no-metadata", help="also fit an age/sex model from the manifest (fused where given)")] = None,
) -> None:
    """Train a model and write a self-describing run folder (config, summary, TensorBoard, model/)."""
    given = [name for name, value in locals().items()
             if name not in ("resume", "nproc", "overwrite") and value is not None]
    if nproc is not None and nproc < 1:
        _fail(f"--nproc: expected 1 or more processes, got {nproc}")
    from .resume import check_resume_processes, resume_config
    from .runfolder import check_start, is_finished
    from .train import train as run_training

    if resume is not None and is_finished(resume):  # before torchrun starts N processes to say so
        typer.echo(f"{resume}: the run has finished already (model/ is saved); nothing to resume")
        return
    if resume is not None:
        if overwrite:
            _fail("--resume continues the run in its folder; --overwrite would replace it: choose one")
        if given:
            _fail(f"--resume continues a run with its own config.yaml; drop --{', --'.join(given).replace('_', '-')}")
        cfg = resume_config(resume, quiet=nproc is not None and nproc > 1)  # torchrun's rank 0 says it
    else:
        cfg = load_config(config, train=train or None, valid=valid, out=out, mode=mode, backbone=backbone,
                          image_size=image_size, eval_image_size=eval_image_size, epochs=epochs, batch_size=batch_size,
                          lr=lr, seed=seed, head=head, labels=parse_labels(labels) if labels else None,
                          threshold_policy=threshold_policy, select_on=select_on, augment=augment,
                          num_workers=num_workers, max_steps_per_epoch=max_steps_per_epoch, pretrained=pretrained,
                          metadata=metadata)
    if not in_torchrun():  # what train() would refuse at once, said before torchrun starts N processes to say it
        check_start(cfg, overwrite=overwrite, resume=resume is not None)
        if resume is not None:
            check_resume_processes(resume, nproc or 1)
    if nproc is not None and nproc > 1:
        from .launch import LaunchError, torchrun

        try:
            torchrun(nproc, cfg, resume=resume is not None, overwrite=overwrite)
        except LaunchError as err:
            _fail(str(err))
        raise typer.Exit(0)
    run = run_training(cfg, resume=resume is not None, overwrite=overwrite)
    if not other_rank():  # under torchrun, rank 0 saves the run; the others only help
        typer.echo(f"run saved to {run}")


@app.command()
def evaluate(
    model: Annotated[list[Path], typer.Option(help="run folder; repeat for an ensemble (probabilities averaged)")],
    data: Annotated[Path, typer.Option(help="labelled manifest CSV or folder-per-class directory")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for metrics.json, predictions, plots, report.html")],
    tta: Annotated[int | None, typer.Option(help="test-time augmentation views: 1, 2, 4 or 8 (default: the model's)")
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
    from .evaluate import evaluate as run_evaluation
    from .predict import ENGINES

    if engine not in ENGINES:
        _fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    _check_inference_options(tta, batch_size, num_workers)
    if error_examples < 0:
        _fail(f"--error-examples: expected 0 or more images, got {error_examples}")
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
        _fail(f"{len(metrics['skipped'])} of {metrics['n'] + len(metrics['skipped'])} images could not be read "
              f"(named above and in metrics.json); the figures are on the other {metrics['n']}", code=1)


@app.command()
def compare(
    first: Annotated[Path, typer.Argument(help="an evaluation folder (`evaluate --out`)")],
    second: Annotated[Path, typer.Argument(help="another evaluation of the same images")],
    task: Annotated[str, typer.Option(help=(
        "malignant (the malignant probability against the label) or a diagnosis such as seborrheic_keratosis "
        "(its one-vs-rest probability)"))] = "malignant",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="also write the result as JSON")] = None,
) -> None:
    """Compare two models' AUC on the same images: the difference, its 95% CI and DeLong's p-value."""
    from .checkpoint import write_json
    from .evaluate import compare as compare_evaluations
    from .evaluate import json_with_keys

    if out is not None:
        _output_file(out, (".json",), inputs=(first, second))
        for folder in (first, second):
            if os.path.realpath(out).startswith(os.path.realpath(folder) + os.sep):
                _fail(f"--out {out}: inside the evaluation {folder}, which it would change; write it elsewhere")
        if out.exists() and not json_with_keys(out, {"auc_a", "auc_b", "p_value"}):
            _fail(f"--out {out}: exists and is not an earlier comparison; choose a new file name")
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



@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files and/or folders")],
    model: Annotated[list[Path], typer.Option(help="run folder; repeat for an ensemble (probabilities averaged)")],
    format: Annotated[str | None, typer.Option("--format", help=(
        "csv | json: a table even for one image (default: a sentence for one image, else CSV, or JSON for "
        "-o x.json)"))] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="write the table here instead of stdout")] = None,
    tta: Annotated[int | None, typer.Option(help="test-time augmentation views: 1, 2, 4 or 8 (default: the model's)")
                   ] = None,
    batch_size: int = 32,
    num_workers: Annotated[int | None, typer.Option(help=(
        "loader processes decoding images while the model runs (default 1); with --ray, the number of model "
        "actors (default: as many as Ray's CPUs allow)"))] = None,
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
    cam: Annotated[Path | None, typer.Option(help="write a Grad-CAM overlay PNG per image into this folder")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="predict on Ray Data actors; -o out.parquet|csv")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster: auto | ray://HOST:10001; default local")] = None,
    metadata: Annotated[Path | None, typer.Option(
        help="CSV of image_id (file name without extension), age_approximate, sex; used by models with metadata")
    ] = None,
    age: Annotated[float | None, typer.Option(help="patient's age in years (one image)")] = None,
    sex: Annotated[str | None, typer.Option(help="patient's sex: male | female (one image)")] = None,
    guard: Annotated[bool, typer.Option("--guard/--no-guard", help=(
        "refuse a verdict for images the model cannot judge (not dermoscopy-like, blank, black); --no-guard keeps "
        "every verdict, for research (the ood_score and in_distribution columns are still filled)"))] = True,
) -> None:
    """Predict one image (prints a sentence) or many (a CSV/JSON table); unreadable files are named, not fatal."""
    if ray and num_workers is not None and num_workers < 1:
        _fail(f"--num-workers: with --ray it counts model actors; expected 1 or more, got {num_workers}")
    _check_inference_options(tta, batch_size, 1 if num_workers is None else num_workers)
    if cam is not None and cam.exists() and not cam.is_dir():
        _fail(f"--cam {cam}: is a file; name a folder for the overlays")
    if ray:
        if metadata is not None or age is not None or sex is not None:
            _fail("--ray predicts from images only; drop --metadata/--age/--sex")
        if cam is not None:
            _fail("--ray writes predictions only; run --cam without --ray")
        if format not in (None, "csv") or (format == "csv" and out is not None and out.suffix.lower() != ".csv"):
            _fail(f"--ray writes CSV or Parquet by the -o suffix; drop --format {format}")
        return _predict_on_ray(paths, model, out, ray_address, engine=engine, tta=tta, batch_size=batch_size,
                               actors=num_workers, refuse=guard)
    from .ensemble import load_models
    from .guard import NO_GUARD
    from .images import IMAGE_EXTENSIONS
    from .predict import ENGINES, expand_inputs, refusal_sentence, sentence

    num_workers = 1 if num_workers is None else num_workers
    table_asked = format is not None
    if format is None and out is not None and out.suffix.lower() == ".json":
        format = "json"  # -o preds.json says it
    format = format or "csv"
    if format not in ("csv", "json"):
        _fail(f"--format must be csv or json, got {format!r}")
    if engine not in ENGINES:
        _fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    passed_over: list[str] = []
    files = expand_inputs(paths, passed_over)
    if passed_over:
        shown = ", ".join(passed_over[:3]) + (f" and {len(passed_over) - 3} more" if len(passed_over) > 3 else "")
        typer.echo(f"note: {len(passed_over)} file(s) in the folder(s) not predicted, not having an image "
                   f"extension ({', '.join(sorted(IMAGE_EXTENSIONS))}): {shown}", err=True)
    if not files:
        _fail(f"no image files found in {', '.join(map(str, paths))}")
    if out is not None:
        _output_file(out, (f".{format}",) if table_asked else (".csv", ".json"), inputs=[*files, metadata],
                     replaces=("source",))
    rows = _patient_metadata(files, metadata, age, sex)  # checked before the model loads
    classifier = load_models(model, engine=engine)
    if rows is not None and not classifier.uses_metadata:
        typer.echo("note: this model was trained without metadata; age/sex are ignored", err=True)
    elif metadata is not None:
        missing = [Path(f).name for f, row in zip(files, rows, strict=True) if row is None]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            typer.echo(f"note: {len(missing)} of {len(files)} images have no age or sex in {metadata} (matched by "
                       f"image_id = file name without extension), so the image alone decides: {shown}", err=True)
    if not classifier.has_guard:
        typer.echo(f"note: {NO_GUARD}; only blank, black or washed-out frames are refused", err=True)
    table = classifier.predict(files, batch_size=batch_size, num_workers=num_workers, tta=tta, metadata=rows,
                               refuse=guard)
    unused = [Path(f).name for f, row in zip(files, rows or [], strict=False)
              if row is not None and any(v is not None for v in row.values())
              and classifier.uses_metadata and not classifier.fuses(row)]
    if unused:
        typer.echo(f"note: the age or sex of {len(unused)} image(s) is not used: this model has no metadata model for "
                   "the fields given (runs trained before per-field models use age and sex only together): "
                   + ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""), err=True)
    failed = table[table["error"] != ""]
    for _, row in failed.iterrows():
        typer.echo(f"error: {row['source']}: {row['error']}", err=True)
    single = len(files) == 1 and not any(p.is_dir() for p in paths)
    if single and out is None and not table_asked:
        if failed.empty:  # one unreadable image: its error above is the whole answer
            row = table.iloc[0]
            if row["label"] == "refused":
                typer.echo(refusal_sentence(row["refusal"]))
            else:
                typer.echo(sentence(row[classifier.positive_name], classifier.threshold, classifier.positive_name,
                                    classifier.negative_name))
                if row["refusal"]:  # --no-guard: the verdict stands, the guard's word beside it
                    typer.echo(f"warning (--no-guard): {row['refusal']}", err=True)
            typer.echo(f"note: {NOTICE}", err=True)
    else:
        text = table.to_csv(index=False) if format == "csv" else json.dumps(
            json.loads(table.to_json(orient="records")), indent=2) + "\n"
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            typer.echo(f"wrote {out}: {len(table) - len(failed)} predicted, {len(failed)} failed", err=True)
        else:
            sys.stdout.write(text)
        refused = int((table["refusal"] != "").sum())
        if refused:
            typer.echo(f"note: {refused} image(s) {'got no verdict' if guard else 'would get no verdict'}: not "
                       "images the model can judge (see the refusal column)", err=True)
        typer.echo(f"note: {NOTICE}", err=True)
    if cam is not None:
        from .explain import write_overlays

        judged_files = [f for f, e, label in zip(files, table["error"], table["label"], strict=True)
                        if not e and label != "refused"]  # no map of a score that means nothing for the image
        written = write_overlays(classifier, judged_files, cam)
        made = [f"{source} -> {png}" for source, png in written.items() if not png.startswith("error:")]
        if made:
            typer.echo("Grad-CAM overlays:\n  " + "\n  ".join(made), err=True)
        note = f" (mean of the {len(model)} models' maps)" if len(model) > 1 else ""
        typer.echo(f"wrote {len(made)} Grad-CAM overlay(s){note} to {cam}", err=True)
    if not failed.empty:
        raise typer.Exit(1)


@app.command()
def card(
    model: Annotated[list[Path], typer.Option(help="run folder; repeat for an ensemble (probabilities averaged)")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="write the Markdown here instead of stdout")] = None,
) -> None:
    """The model card (Markdown): what the model is, how it was trained and validated, its intended use and limits.
    Training writes one for each run too (RUN/model/MODEL_CARD.md)."""
    from .card import CARD_HEADING, markdown_card
    from .checkpoint import META_FILE, atomic_write, find_model_dir
    from .ensemble import load_models

    if out is not None:
        _output_file(out, (".md",))
        own = len(model) == 1 and out.parent.resolve() == find_model_dir(model[0]).resolve()
        if (out.parent / META_FILE).is_file() and not own:
            _fail(f"--out {out}: that is another run's model folder ({out.parent}); its card describes that run")
        if out.is_file() and out.stat().st_size and not out.read_text(errors="replace").startswith(CARD_HEADING):
            _fail(f"--out {out}: already exists and is not a model card; remove it or choose another name")
    text = markdown_card(load_models(model, engine="torch"))
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(text))
    typer.echo(f"wrote {out}", err=True)


@app.command()
def guard(
    model: Annotated[Path, typer.Option(help="run folder")],
    train: Annotated[Path | None, typer.Option(help="training manifest (default: the run's config.yaml)")] = None,
    valid: Annotated[Path | None, typer.Option(help="validation manifest (default: the run's config.yaml)")] = None,
    false_rejection: Annotated[float, typer.Option(help=(
        "share of held-in dermoscopy images the threshold may refuse"))] = 0.02,
    batch_size: int = 32,
) -> None:
    """Fit the out-of-distribution guard of a trained run (training fits one; this adds it to a run made before
    the guard, or refits it at another false-rejection rate). Images past it get no verdict."""
    from .train import guard_run

    if not 0 < false_rejection < 0.5:
        _fail(f"--false-rejection: expected a share between 0 and 0.5 (e.g. 0.02), got {false_rejection}")
    record = guard_run(model, train, valid, false_rejection, batch_size=batch_size)
    typer.echo(f"guard fitted on {record['n_fit']} images: threshold {record['threshold']:.4f} refuses "
               f"{record['held_in_rejected']:.1%} of {record['n_held_in']} held-in images ({record['held_in']}); "
               f"written to {model}/model/", err=True)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="run folder")],
    out: Annotated[Path | None, typer.Option(
        "-o", "--out", help="ONNX file (default RUN/model/model.onnx, the one predict/serve --engine onnx use; "
                            "elsewhere, for other runtimes)")] = None,
    int8: Annotated[bool, typer.Option("--int8", help=(
        "also quantise the export to int8 (RUN/model/model.int8.onnx), calibrated on training images and refused "
        "where it strays from the float model on validation images"))] = False,
    calibration: Annotated[list[Path] | None, typer.Option(help=(
        "--int8: manifest(s) of calibration images (default: the run's training manifests)"))] = None,
    check: Annotated[Path | None, typer.Option(help=(
        "--int8: manifest of the images the int8 model is checked on (default: the run's validation manifest)"))
    ] = None,
) -> None:
    """Export a run to ONNX (dynamic batch, probabilities out) for fast CPU inference with ONNX Runtime."""
    from .checkpoint import META_FILE, find_model_dir
    from .export import export_onnx

    if out is not None and int8:
        _fail("--int8 quantises the run's own export (RUN/model/model.onnx); drop --out")
    if (calibration or check) and not int8:
        _fail("--calibration and --check choose the images of --int8; add --int8 or drop them")
    if out is not None:
        _output_file(out, (".onnx",))
        if (out.parent / META_FILE).is_file() and out.parent.resolve() != find_model_dir(model).resolve():
            _fail(f"--out {out}: that is another run's model folder ({out.parent}); its predictions would come "
                  "from this run's graph")
    path = export_onnx(model, out)
    typer.echo(f"wrote {path} and {path.name}.json (checked against PyTorch)")
    if int8:
        from .quantize import INT8_FILE, export_int8

        report = export_int8(model, calibration or None, check)
        auc = (f"; melanoma AUC {report['auc_int8']:.4f} against {report['auc_float']:.4f} in float"
               if "auc_float" in report else "")
        typer.echo(f"wrote {path.with_name(INT8_FILE)}: on {report['images']} check images the malignant "
                   f"probability moved by {report['mean_difference']:.4f} on average (at most "
                   f"{report['max_difference']:.4f}), {report['verdicts_changed']} verdict(s) changed{auc}")


@app.command()
def serve(
    model: Annotated[list[Path], typer.Option(help="run folder; repeat for an ensemble (probabilities averaged)")],
    host: Annotated[str, typer.Option(help="address to bind; 127.0.0.1 keeps it on this machine")] = "127.0.0.1",
    port: int = 8000,
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted upload (per file)")] = 20.0,
    max_batch: Annotated[int, typer.Option(help="most files in one POST /api/predict/batch")] = 32,
    tta: Annotated[int | None, typer.Option(help=(
        "test-time augmentation views for every prediction: 1, 2, 4 or 8 (default: each model's); more views make "
        "the answer steadier under rotation and slower"))] = None,
) -> None:
    """Serve the web page and the REST API (POST /api/predict and /api/predict/batch, GET /api/health, /api/model,
    /docs)."""
    import uvicorn

    from .predict import ENGINES
    from .serve import create_app

    if engine not in ENGINES:
        _fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not 0 <= port <= 65535:
        _fail(f"--port: expected 0-65535, got {port}")
    if not math.isfinite(max_upload_mb) or max_upload_mb <= 0:
        _fail(f"--max-upload-mb: expected a positive number of megabytes, got {max_upload_mb}")
    if not 1 <= max_batch <= 1000:  # Starlette's multipart parser refuses more than 1000 files
        _fail(f"--max-batch: expected 1-1000 files, got {max_batch}")
    _check_inference_options(tta, 1, 0)
    _check_can_bind(host, port)
    application = create_app(model, max_upload_mb=max_upload_mb, engine=engine, max_batch=max_batch, tta=tta)
    classifier = application.state.classifier
    served = ", ".join(str(m.source) for m in classifier.runs)
    typer.echo(f"serving {served} ({classifier.engine_name}) on http://{host}:{port}/  (API docs: /docs). {NOTICE}",
               err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


def _check_can_bind(host: str, port: int) -> None:
    """Fail before loading the model when the address is unusable (port taken, unknown host)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        _fail(f"--host {host}: unknown address ({err.strerror})")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as err:
            reason = "already in use (another server?)" if err.errno == errno.EADDRINUSE else err.strerror
            _fail(f"--host {host} --port {port}: cannot listen there: {reason}")


@app.command()
def download(
    dataset: Annotated[str, typer.Argument(help="isic2017")],
    dest: Annotated[Path, typer.Option(help="folder to fill with <split>/<diagnosis>/<images>")],
    base_url: Annotated[str | None, typer.Option(help="mirror holding train.zip, valid.zip, test.zip")] = None,
    urls: Annotated[Path | None, typer.Option(help="YAML/JSON list of archive URLs (or {url, name, sha256, size})")]
    = None,
    keep_archives: Annotated[bool, typer.Option(help="keep the .zip files in DEST/.archives")] = False,
    retries: Annotated[int, typer.Option(help="resumed attempts per archive after a broken connection")] = 5,
) -> None:
    """Download a challenge's archives (resumable, verified) into folder-per-class trees; a second run does nothing."""
    from .download import DATASETS, DownloadError, download_dataset, isic2017_archives, load_archive_list

    if dataset not in DATASETS:
        _fail(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if urls is not None and base_url is not None:
        _fail("give --urls or --base-url, not both")
    try:
        archives = load_archive_list(urls) if urls is not None else isic2017_archives(
            *([base_url] if base_url else []))
        done = download_dataset(archives, dest, keep_archives=keep_archives, retries=retries)
    except DownloadError as err:
        _fail(str(err))
    for archive in archives:
        typer.echo(f"{dest / archive.name}: {done[archive.name]['files']} images")


def _predict_on_ray(paths: list[Path], model: list[Path], out: Path | None, address: str | None, engine: str,
                    tta: int | None, batch_size: int, actors: int | None = None, refuse: bool = True) -> None:
    from .ray_predict import OUTPUT_FORMATS, RayPredictError, predict_with_ray

    if out is not None:  # before Ray starts: never over an input, a folder or a file this command did not write
        _output_file(out, OUTPUT_FORMATS, inputs=paths, replaces=("source",))

    def report(source: str, reason: str) -> None:
        typer.echo(f"error: {source}: {reason}", err=True)

    try:
        rows, failed = predict_with_ray(model, paths, out, address=address, engine=engine, tta=tta,
                                        batch_size=batch_size, actors=actors, on_error=report, refuse=refuse)
    except RayPredictError as err:
        _fail(str(err))
    if out is not None:
        typer.echo(f"wrote {out}: {rows - failed} predicted, {failed} failed", err=True)
    if failed:
        raise typer.Exit(1)


def main() -> None:
    # under a torchrun started by hand every rank prints: the others' progress would repeat rank 0's
    level = logging.WARNING if other_rank() else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        app()
    except KNOWN_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # the file system said no (a path taken by a file, no permission, disk full...)
        typer.echo(f"error: {_os_error(err)}", err=True)
        sys.exit(2)


def _os_error(err: OSError) -> str:
    if err.filename is None:
        return str(err)
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return f"{err.filename}: a file is in the way of a folder this command writes (choose another output path)"
    return f"{err.filename}: {err.strerror or err}"


if __name__ == "__main__":
    main()
