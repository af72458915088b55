"""Commands for serving: export to ONNX (and int8), the web service, downloading a challenge's data."""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Annotated

import typer

from .. import NOTICE
from .common import ENGINE_HELP, check_inference_options, fail, output_file

# what `serve` serves without --model: the most accurate model `make benchmark-accuracy` makes (its ensemble of
# three: 0.2 s a photo here), else `make demo`'s probe. Not its distilled student: 12 ms a photo, but below even
# the probe on melanoma (BENCHMARKS.md, "The fast model"); `--model runs/benchmark/student` serves it.
DEFAULT_SERVED = (("runs/benchmark/lite0", "runs/benchmark/lite2", "runs/benchmark/linear"), ("runs/demo",))


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
    from ..checkpoint import META_FILE, find_model_dir
    from ..export import export_onnx

    if out is not None and int8:
        fail("--int8 quantises the run's own export (RUN/model/model.onnx); drop --out")
    if (calibration or check) and not int8:
        fail("--calibration and --check choose the images of --int8; add --int8 or drop them")
    for option, path in [*(("--calibration", p) for p in calibration or []), ("--check", check)]:
        if path is not None and not path.exists():
            fail(f"{option} {path}: no such file or folder")
    if out is not None:
        output_file(out, (".onnx",))
        if (out.parent / META_FILE).is_file() and out.parent.resolve() != find_model_dir(model).resolve():
            fail(f"--out {out}: that is another run's model folder ({out.parent}); its predictions would come "
                  "from this run's graph")
    path = export_onnx(model, out)
    typer.echo(f"wrote {path} and {path.name}.json (checked against PyTorch)")
    if int8:
        from ..engines import INT8_SLOWER
        from ..quantize import INT8_FILE, export_int8

        report = export_int8(model, calibration or None, check)
        auc = (f"; melanoma AUC {report['auc_int8']:.4f} against {report['auc_float']:.4f} in float"
               if "auc_float" in report else "")
        speed = (f"; {report['images_per_s']:.1f} images/s against {report['float_images_per_s']:.1f} in float "
                 "here (model only)")
        typer.echo(f"wrote {path.with_name(INT8_FILE)} ({report['plan']} in int8): on {report['images']} check "
                   "images the malignant "
                   f"probability moved by {report['mean_difference']:.4f} on average (at most "
                   f"{report['max_difference']:.4f}), {report['verdicts_changed']} verdict(s) changed{auc}{speed}")
        if report["speedup"] < INT8_SLOWER:  # what its sidecar now records: `auto` passes over it
            typer.echo("every plan within tolerance ran slower than the float graph on this machine: predict, "
                       "evaluate and serve use the float graph unless given --engine int8")


def serve(
    model: Annotated[list[Path] | None, typer.Option(help=(
        "run folder; repeat for an ensemble (probabilities averaged). Default: the ensemble `make "
        "benchmark-accuracy` trains (runs/benchmark/lite0, lite2, linear) where it exists, else runs/demo"))] = None,
    host: Annotated[str, typer.Option(help="address to bind; 127.0.0.1 keeps it on this machine")] = "127.0.0.1",
    port: int = 8000,
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted upload (per file)")] = 20.0,
    max_batch: Annotated[int, typer.Option(help="most files in one POST /api/predict/batch")] = 32,
    tta: Annotated[int | None, typer.Option(help=(
        "test-time views for every prediction: 1, 2, 4, 8, 16, 24, ... 64 (default: each model's); more views make "
        "the answer steadier and slower"))] = None,
) -> None:
    """Serve the web page and the REST API (POST /api/predict and /api/predict/batch, GET /api/health, /api/model,
    /docs)."""
    import uvicorn

    from ..predict import ENGINES
    from ..serve import create_app

    if engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not 0 <= port <= 65535:
        fail(f"--port: expected 0-65535, got {port}")
    if not math.isfinite(max_upload_mb) or max_upload_mb <= 0:
        fail(f"--max-upload-mb: expected a positive number of megabytes, got {max_upload_mb}")
    if not 1 <= max_batch <= 1000:  # Starlette's multipart parser refuses more than 1000 files
        fail(f"--max-batch: expected 1-1000 files, got {max_batch}")
    check_inference_options(tta, 1, 0)
    model = model or default_served()
    _check_can_bind(host, port)
    application = create_app(model, max_upload_mb=max_upload_mb, engine=engine, max_batch=max_batch, tta=tta)
    classifier = application.state.classifier
    served = ", ".join(str(m.source) for m in classifier.runs)
    typer.echo(f"serving {served} ({classifier.engine_name}) on http://{host}:{port}/  (API docs: /docs). {NOTICE}",
               err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


def default_served() -> list[Path]:
    """The first model of DEFAULT_SERVED (run folders relative to the working folder) whose every run has finished
    training (a run still training keeps a placeholder model)."""
    from ..runfolder import is_finished

    for runs in DEFAULT_SERVED:
        if all(is_finished(Path(run)) for run in runs):
            return [Path(run) for run in runs]
    fail("--model: none given, and neither the ensemble of `make benchmark-accuracy` ("
         f"{', '.join(DEFAULT_SERVED[0])}) nor `make demo`'s {DEFAULT_SERVED[1][0]} is a finished run in this "
         "folder; pass --model RUN")


def _check_can_bind(host: str, port: int) -> None:
    """Fail before loading the model when the address is unusable (port taken, unknown host)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        fail(f"--host {host}: unknown address ({err.strerror})")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as err:
            reason = "already in use (another server?)" if err.errno == errno.EADDRINUSE else err.strerror
            fail(f"--host {host} --port {port}: cannot listen there: {reason}")


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
    from ..download import DATASETS, DownloadError, download_dataset, isic2017_archives, load_archive_list

    if dataset not in DATASETS:
        fail(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if urls is not None and base_url is not None:
        fail("give --urls or --base-url, not both")
    try:
        archives = load_archive_list(urls) if urls is not None else isic2017_archives(
            *([base_url] if base_url else []))
        done = download_dataset(archives, dest, keep_archives=keep_archives, retries=retries)
    except DownloadError as err:
        fail(str(err))
    for archive in archives:
        typer.echo(f"{dest / archive.name}: {done[archive.name]['files']} images")
