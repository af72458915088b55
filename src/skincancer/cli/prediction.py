"""The predict command: one image (a sentence) or many (a table), in this process or on Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import NOTICE
from ..errors import MetadataError
from .common import ENGINE_HELP, check_inference_options, fail, output_file


def _patient_metadata(files: list[str], csv: Path | None, age: float | None, sex: str | None) -> list | None:
    """Per-file {'age', 'sex'} rows from --metadata CSV (matched on the file name's stem) or --age/--sex."""
    if csv is None and age is None and sex is None:
        return None  # before importing metadata (pandas, scikit-learn): most predictions have none
    from ..metadata import parse_age, parse_sex, read_metadata_csv, records

    if csv is not None and (age is not None or sex is not None):
        fail("give either --metadata CSV or --age/--sex, not both")
    if age is not None or sex is not None:
        if len(files) != 1:
            fail("--age/--sex describe one image; for several use --metadata CSV")
        try:
            return [{"age": parse_age(age, "--age", typed=True), "sex": parse_sex(sex, "--sex")}]
        except MetadataError as err:
            fail(str(err))
    if csv is None:
        return None
    table = read_metadata_csv(csv)
    rows = []
    for path in files:
        stem = Path(path).stem
        rows.append(records(table.loc[[stem]], str(csv))[0] if stem in table.index else None)
    return rows




def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files and/or folders")],
    model: Annotated[list[Path], typer.Option(help="run folder; repeat for an ensemble (probabilities averaged)")],
    format: Annotated[str | None, typer.Option("--format", help=(
        "csv | json: a table even for one image (default: a sentence for one image, else CSV, or JSON for "
        "-o x.json)"))] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="write the table here instead of stdout")] = None,
    tta: Annotated[int | None, typer.Option(help="test-time views: 1, 2, 4, 8, 16, 24, ... 64 (default: the model's)")
                   ] = None,
    batch_size: int = 32,
    num_workers: Annotated[int | None, typer.Option(help=(
        "images decoded while the model runs (default 1): threads with an ONNX engine, loader processes with "
        "torch; with --ray, the number of model "
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
        fail(f"--num-workers: with --ray it counts model actors; expected 1 or more, got {num_workers}")
    check_inference_options(tta, batch_size, 1 if num_workers is None else num_workers)
    if cam is not None and cam.exists() and not cam.is_dir():
        fail(f"--cam {cam}: is a file; name a folder for the overlays")
    if ray:
        if metadata is not None or age is not None or sex is not None:
            fail("--ray predicts from images only; drop --metadata/--age/--sex")
        if cam is not None:
            fail("--ray writes predictions only; run --cam without --ray")
        if format not in (None, "csv") or (format == "csv" and out is not None and out.suffix.lower() != ".csv"):
            fail(f"--ray writes CSV or Parquet by the -o suffix; drop --format {format}")
        return _predict_on_ray(paths, model, out, ray_address, engine=engine, tta=tta, batch_size=batch_size,
                               actors=num_workers, refuse=guard)
    from ..ensemble import load_models
    from ..guard import NO_GUARD
    from ..predict import ENGINES

    num_workers = 1 if num_workers is None else num_workers
    table_asked, format = format is not None, _table_format(format, out)
    if engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    files = _image_files(paths)
    if out is not None:
        output_file(out, (f".{format}",) if table_asked else (".csv", ".json"), inputs=[*files, metadata],
                     replaces=("source",))
    rows = _patient_metadata(files, metadata, age, sex)  # checked before the model loads
    classifier = load_models(model, engine=engine)
    _say_metadata_use(classifier, files, rows, metadata)
    if not classifier.has_guard:
        typer.echo(f"note: {NO_GUARD}; only blank, black or washed-out frames are refused", err=True)
    predictions = classifier.predictions(files, batch_size=batch_size, num_workers=num_workers, tta=tta,
                                         metadata=rows, refuse=guard)
    _say_unused_metadata(classifier, files, rows)
    failed = [p for p in predictions if p.error]
    for p in failed:
        typer.echo(f"error: {p.source}: {p.error}", err=True)
    single = len(files) == 1 and not any(p.is_dir() for p in paths)
    if single and out is None and not table_asked:
        if not failed:  # one unreadable image: its error above is the whole answer
            _say_sentence(predictions[0])
    else:
        _write_table(classifier, predictions, rows is not None, format, out, len(failed), guard)
    if cam is not None:
        _write_overlays(classifier, predictions, cam, len(model))
    if failed:
        raise typer.Exit(1)


def _image_files(paths: list[Path]) -> list[str]:
    """The image files named or found in the folders named; the other files in those folders are said, not read."""
    from ..images import IMAGE_EXTENSIONS, expand_inputs

    passed_over: list[str] = []
    files = expand_inputs(paths, passed_over)
    if passed_over:
        shown = ", ".join(passed_over[:3]) + (f" and {len(passed_over) - 3} more" if len(passed_over) > 3 else "")
        typer.echo(f"note: {len(passed_over)} file(s) in the folder(s) not predicted, not having an image "
                   f"extension ({', '.join(sorted(IMAGE_EXTENSIONS))}): {shown}", err=True)
    if not files:
        fail(f"no image files found in {', '.join(map(str, paths))}")
    return files


def _say_metadata_use(classifier, files: list[str], rows: list | None, metadata: Path | None) -> None:
    if rows is not None and not classifier.uses_metadata:
        typer.echo("note: this model was trained without metadata; age/sex are ignored", err=True)
    elif metadata is not None:
        missing = [Path(f).name for f, row in zip(files, rows, strict=True) if row is None]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            typer.echo(f"note: {len(missing)} of {len(files)} images have no age or sex in {metadata} (matched by "
                       f"image_id = file name without extension), so the image alone decides: {shown}", err=True)


def _say_unused_metadata(classifier, files: list[str], rows: list | None) -> None:
    unused = [Path(f).name for f, row in zip(files, rows or [], strict=False)
              if row is not None and any(v is not None for v in row.values())
              and classifier.uses_metadata and not classifier.fuses(row)]
    if unused:
        typer.echo(f"note: the age or sex of {len(unused)} image(s) is not used: this model has no metadata model for "
                   "the fields given (runs trained before per-field models use age and sex only together): "
                   + ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""), err=True)


def _say_sentence(prediction) -> None:
    """One image: the tutorial's sentence, or why the image gets no verdict."""
    typer.echo(prediction.sentence)
    if prediction.refusal and prediction.label != "refused":  # --no-guard: the verdict stands, the guard's word too
        typer.echo(f"warning (--no-guard): {prediction.refusal}", err=True)
    typer.echo(f"note: {NOTICE}", err=True)


def _table_format(format: str | None, out: Path | None) -> str:
    """csv or json: --format, else -o's suffix (preds.json says json), else csv."""
    if format is None and out is not None and out.suffix.lower() == ".json":
        format = "json"
    format = format or "csv"
    if format not in ("csv", "json"):
        fail(f"--format must be csv or json, got {format!r}")
    return format


def _write_table(classifier, predictions: list, metadata_given: bool, format: str, out: Path | None, failed: int,
                 guard: bool) -> None:
    """Several images (or a table asked for): CSV or JSON to stdout or to --out."""
    from ..records import predictions_table

    table = predictions_table(predictions, classifier.class_names, classifier.positive_name,
                              metadata_used=metadata_given and classifier.uses_metadata)
    text = table.to_csv(index=False) if format == "csv" else json.dumps(
        json.loads(table.to_json(orient="records")), indent=2) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        typer.echo(f"wrote {out}: {len(table) - failed} predicted, {failed} failed", err=True)
    else:
        sys.stdout.write(text)
    refused = int((table["refusal"] != "").sum())
    if refused:
        typer.echo(f"note: {refused} image(s) {'got no verdict' if guard else 'would get no verdict'}: not "
                   "images the model can judge (see the refusal column)", err=True)
    typer.echo(f"note: {NOTICE}", err=True)


def _write_overlays(classifier, predictions: list, cam: Path, models: int) -> None:
    from ..explain import write_overlays

    judged_files = [p.source for p in predictions
                    if not p.error and p.label != "refused"]  # no map of a score that means nothing for the image
    written = write_overlays(classifier, judged_files, cam)
    made = [f"{source} -> {png}" for source, png in written.items() if not png.startswith("error:")]
    if made:
        typer.echo("Grad-CAM overlays:\n  " + "\n  ".join(made), err=True)
    note = f" (mean of the {models} models' maps)" if models > 1 else ""
    typer.echo(f"wrote {len(made)} Grad-CAM overlay(s){note} to {cam}", err=True)


def _predict_on_ray(paths: list[Path], model: list[Path], out: Path | None, address: str | None, engine: str,
                    tta: int | None, batch_size: int, actors: int | None = None, refuse: bool = True) -> None:
    from ..ray_predict import OUTPUT_FORMATS, RayPredictError, predict_with_ray

    if out is not None:  # before Ray starts: never over an input, a folder or a file this command did not write
        output_file(out, OUTPUT_FORMATS, inputs=paths, replaces=("source",))

    def report(source: str, reason: str) -> None:
        typer.echo(f"error: {source}: {reason}", err=True)

    try:
        rows, failed = predict_with_ray(model, paths, out, address=address, engine=engine, tta=tta,
                                        batch_size=batch_size, actors=actors, on_error=report, refuse=refuse)
    except RayPredictError as err:
        fail(str(err))
    if out is not None:
        typer.echo(f"wrote {out}: {rows - failed} predicted, {failed} failed", err=True)
    if failed:
        raise typer.Exit(1)
