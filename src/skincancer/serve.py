"""Web service: a FastAPI app (create_app) over a trained run, with an APIRouter of routes (an upload page and a REST
API) that read the model from the app's state; bad uploads get JSON 4xx."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import NOTICE, __version__
from .card import FIGURE_NAMES, model_card
from .data import ImageError, load_image
from .ensemble import load_models
from .metadata import MetadataError, parse_age, parse_sex
from .middleware import MB, AccessLog, Metrics, UploadLimit, UploadTooLarge
from .predict import Classifier
from .records import Prediction

log = logging.getLogger("skincancer")
NOT_AN_IMAGE = "not an image"
BATCH_PATH = "/api/predict/batch"
BATCH_CAM_LIMIT = 32  # Grad-CAM maps in one batch answer: a backward pass per photo and member, ~0.1-1 MB each
ERRORS = {400: {"description": "a malformed multipart body"},
          413: {"description": "an upload over --max-upload-mb, or more files than --max-batch"},
          415: {"description": "not an image"}}  # 422 keeps FastAPI's own entry
BATCH_CHUNK = 16  # images decoded and predicted together within a batch request
BATCH_PIXELS = 64_000_000  # decoded pixels held at once within a batch request (about 190 MB as RGB)


UNFINISHED = ("this model was saved by a training run that has not finished: its threshold is a placeholder, not "
              "chosen on validation")


# A few hundred kB can hold a picture of 80 million pixels, hundreds of MB once decoded: the server decodes two
# uploads at a time, and keeps at most UPLOAD_MAX_SIDE px a side of each (the model sees a few hundred)
DECODE_SLOTS = threading.BoundedSemaphore(2)
UPLOAD_MAX_SIDE = 4096


def decode_upload(data: bytes, filename: str) -> Image.Image:
    """Uploaded bytes -> RGB image through the same checks as files on disk (data.load_image), scaled down to
    UPLOAD_MAX_SIDE px on its longer side when larger."""
    fd, path = tempfile.mkstemp(prefix="skincancer-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with DECODE_SLOTS:
            image = load_image(path)
            if max(image.size) > UPLOAD_MAX_SIDE:
                image.thumbnail((UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE), Image.Resampling.LANCZOS)
            return image
    except ImageError as err:
        status = 415 if err.reason.startswith(NOT_AN_IMAGE) else 422
        raise HTTPException(status, f"{filename}: {err.reason}") from None
    except Exception as err:  # any other decoder failure is still the upload's fault, not the server's
        raise HTTPException(422, f"{filename}: unreadable image ({type(err).__name__}: {err})") from None
    finally:
        os.unlink(path)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Service:
    """What the routes serve, kept in app.state.service: the model, its card, the page, and the limits."""

    classifier: Classifier
    card: dict
    page: str
    file_limit: int
    max_batch: int
    tta: int | None  # views averaged for every prediction (None: each model's own setting)
    metrics: Metrics
    inference_lock: threading.Lock = field(default_factory=threading.Lock)  # one batch at a time: each uses every core

    def answered(self, answer: dict, started: float) -> dict:
        """What every prediction answer carries beside its figures: the threshold, the model, the notice, a warning
        for an unfinished model, and the time taken."""
        answer.update(threshold=self.classifier.threshold, notice=NOTICE,
                      model={k: self.card[k] for k in ("name", "backbone", "version", "engine")})
        if self.card["unfinished"]:
            answer["warning"] = UNFINISHED
        answer["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return answer

    def answer_batch(self, files: list, ages: list | None, sexes: list | None, cam: bool, guard: bool = True) -> dict:
        started = time.perf_counter()
        results: list[dict] = []
        pending: list[tuple[int, str, Image.Image, dict | None]] = []  # decoded, not yet predicted
        for index, file in enumerate(files):
            name = getattr(file, "filename", None) or f"file {index + 1}"
            results.append({"filename": name})
            try:
                if not isinstance(file, StarletteUploadFile):
                    raise HTTPException(422, f"{name}: a form field, not a file (send the photo as a file part)")
                patient = {"age": parse_age(ages[index], f"age of {name}", typed=True) if ages else None,
                           "sex": parse_sex(sexes[index], f"sex of {name}") if sexes else None}
                image = read_upload(file, self.file_limit, name)
            except MetadataError as err:
                results[index].update(error=str(err), status=422)
                continue
            except HTTPException as err:
                results[index].update(error=err.detail, status=err.status_code)
                continue
            # bounded memory: decoded photos wait for prediction in chunks of at most BATCH_CHUNK images and
            # BATCH_PIXELS pixels (a 100 KB PNG can declare 80 million), never more than one large photo at a time
            if pending and (len(pending) == BATCH_CHUNK or
                            sum(p[2].width * p[2].height for p in pending) + image.width * image.height > BATCH_PIXELS):
                self.predict_pending(pending, results, cam, guard)
            pending.append((index, name, image, patient if any(v is not None for v in patient.values()) else None))
        if pending:
            self.predict_pending(pending, results, cam, guard)
        failed = sum("error" in r for r in results)
        self.metrics.count_images(len(results) - failed, failed)
        return self.answered({"results": results, "n": len(results), "n_failed": failed}, started)

    def predict_pending(self, pending: list[tuple[int, str, Image.Image, dict | None]], results: list[dict],
                        cam: bool, guard: bool) -> None:
        """Predict the decoded photos waiting in `pending` into their places in `results`, and empty it."""
        classifier = self.classifier
        with self.inference_lock:
            metadata = [patient for *_, patient in pending] if classifier.uses_metadata else None
            judged = classifier.judge([image for _, _, image, _ in pending], num_workers=0, tta=self.tta,
                                      batch_size=BATCH_CHUNK, metadata=metadata, refuse=guard)
        records = classifier.records([image for _, _, image, _ in pending], judged, metadata,
                                     sources=[name for _, name, _, _ in pending])
        for record, (index, name, _, _) in zip(records, pending, strict=True):
            results[index] = ({"filename": name, "error": f"{name}: {record.error}", "status": 422} if record.error
                              else answer(record, classifier.class_names))
        if cam:
            from .explain import explain

            for record, (index, _, image, _) in zip(records, pending, strict=True):
                if not record.error and record.label != "refused":
                    with self.inference_lock:  # as for one photo; other requests may predict between two maps
                        results[index]["cam_png_base64"] = png_base64(explain(classifier, image))
        pending.clear()


def create_app(run: str | Path | Sequence[str | Path] | Classifier, max_upload_mb: float = 20.0,
               engine: str = "auto", max_batch: int = 32, tta: int | None = None) -> FastAPI:
    """The web app over a trained run (folder or loaded Classifier), or an ensemble of runs (a list of folders:
    probabilities averaged, threshold re-chosen on their validation predictions, as `evaluate` does).
    `max_upload_mb`: per file; `max_batch`: files per POST /api/predict/batch; `tta`: views averaged for
    every prediction (None: each model's own setting)."""
    if isinstance(run, Classifier):
        classifier = run
    else:
        classifier = load_models([run] if isinstance(run, (str, Path)) else list(run), engine=engine)
    card = model_card(classifier)
    if tta is not None:  # every prediction averages these views, whatever the runs' own setting
        for member in card["members"]:
            member["tta"] = tta
    card["tta"] = tta if tta is not None else None if card["members"] else classifier.meta.get("tta", 1)
    file_limit = int(max_upload_mb * MB)

    # /docs with Swagger UI served from the package, not a CDN: works offline and sends nothing elsewhere
    app = FastAPIOffline(title="skincancer", version=__version__,
                         description=f"Melanoma vs benign dermoscopy classifier. {NOTICE}")
    app.add_middleware(UploadLimit, file_limit=file_limit, files={BATCH_PATH: max_batch})
    metrics = Metrics(["/", "/api/predict", BATCH_PATH, "/api/health", "/api/model", "/metrics", "/docs"], card)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: it also logs the uploads UploadLimit refuses
    app.state.classifier = classifier
    app.state.service = Service(classifier, card, render_page(card, file_limit, max_batch), file_limit, max_batch,
                                tta, metrics)
    app.include_router(api_router(max_batch))
    app.add_exception_handler(RequestValidationError, validation_error)
    return app


async def service(request: Request) -> Service:
    """The routes' dependency: what create_app put in the app's state (async: no worker thread to fetch it)."""
    return request.app.state.service


def api_router(max_batch: int) -> APIRouter:
    """The service's routes; `max_batch` goes into the batch endpoint's documented request body."""
    router = APIRouter()
    router.add_api_route("/", index, response_class=HTMLResponse, include_in_schema=False)
    router.add_api_route("/api/health", health)
    router.add_api_route("/api/model", model)
    router.add_api_route("/metrics", prometheus, include_in_schema=False)
    router.add_api_route("/api/predict", predict, methods=["POST"], dependencies=[Depends(one_file)],
                         responses=ERRORS)
    router.add_api_route(BATCH_PATH, predict_batch, methods=["POST"], openapi_extra=batch_request_schema(max_batch),
                         responses=ERRORS)
    return router


def index(served: Service = Depends(service)) -> HTMLResponse:
    return HTMLResponse(served.page)


def health(served: Service = Depends(service)) -> dict:
    health = {"status": "ok", "engine": served.classifier.engine_name, "model": served.card["name"]}
    if served.card["unfinished"]:
        health["warning"] = UNFINISHED
    return health


def model(served: Service = Depends(service)) -> dict:
    return served.card


def prometheus(served: Service = Depends(service)) -> Response:
    """Prometheus' text format: requests by route and status, latency, photos answered and failed."""
    return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)


async def one_file(request: Request) -> None:
    """/api/predict answers one photo: several `file` parts are refused, not all but the last dropped."""
    form = await request.form()  # parsed once: FastAPI reads its fields from the same form
    sent = len(form.getlist("file"))
    if sent > 1:
        raise HTTPException(422, f"file: {sent} parts named 'file'; /api/predict takes one photo (send several "
                                 f"to {BATCH_PATH} as parts named 'files')")


def predict(file: UploadFile = File(..., description="a dermoscopy photograph (JPEG, PNG, ...)"),
            cam: bool = Query(False, description="also return the Grad-CAM overlay as a base64 PNG"),
            age: str | None = Form(None, description="patient's age in years (optional; models with metadata)"),
            sex: str | None = Form(None, description="male | female (optional; models with metadata)"),
            guard: bool = Query(True, description=(
                "false: keep the verdict for an image the guard refuses (research only); the guard's fields are "
                "filled either way")),
            served: Service = Depends(service)) -> dict:
    """Probabilities per class, the malignant probability and the label at the model's threshold; for an image
    the model cannot judge (not like its dermoscopy training images, or a blank/black frame), label 'refused',
    the reason, and no verdict in the sentence."""
    started = time.perf_counter()
    name = file.filename or "upload"
    classifier = served.classifier
    try:
        try:
            patient = {"age": parse_age(age, "age", typed=True), "sex": parse_sex(sex, "sex")}
        except MetadataError as err:
            raise HTTPException(422, str(err)) from None
        use_metadata = classifier.fuses(patient)
        image = read_upload(file, served.file_limit, name)
        with served.inference_lock:
            judged = classifier.judge([image], batch_size=1, num_workers=0, tta=served.tta,
                                      metadata=[patient] if use_metadata else None, refuse=guard)
        if judged.errors:
            raise HTTPException(422, f"{name}: {judged.errors[0][1]}")
    except HTTPException:
        served.metrics.count_images(0, 1)
        raise
    served.metrics.count_images(1, 0)
    record = classifier.records([image], judged, [patient] if use_metadata else None, sources=[name])[0]
    reply = answer(record, classifier.class_names)
    if cam and record.label != "refused":  # no map of a score that means nothing for the image
        from .explain import explain

        with served.inference_lock:  # Grad-CAM hooks the PyTorch model, which the torch engine also predicts with
            picture = explain(classifier, image)
        reply["cam_png_base64"] = png_base64(picture)
    return served.answered(reply, started)


async def predict_batch(request: Request, cam: bool = Query(
        False, description="also return each photo's Grad-CAM overlay as a base64 PNG (slower: one backward "
                           "pass per photo and member)"),
        guard: bool = Query(True, description="false: keep the verdicts of images the guard refuses (research)")
        ) -> dict:
    """Several images in one request (multipart `files`, repeated; optional `age` and `sex` once per file, in
    order, empty where unknown), predicted in batches: one result per file, in order. A file that cannot be
    read, or whose age/sex is invalid, gets its own `error` and `status`; the others are still answered."""
    served: Service = request.app.state.service
    max_batch = served.max_batch
    # the form is parsed here, not by FastAPI, to stop at max_batch files and keep text parts small: a
    # request of 1000 parts, or of large text parts, is refused while it arrives rather than held in memory
    try:  # fields: age and sex per file, and text parts sent as `files` (each answered with an error)
        form = await request.form(max_files=max_batch, max_fields=3 * max_batch + 8, max_part_size=1024)
    except StarletteHTTPException as err:  # the parser's 400s: malformed, too many parts, a text part too long
        if str(err.detail).startswith("Too many files"):
            raise HTTPException(413, f"more than {max_batch} files: at most {max_batch} per request") from None
        raise
    files = form.getlist("files")
    if not files:
        raise HTTPException(422, "files: no files (send each photo as a multipart part named 'files')")
    if len(files) > max_batch:  # text parts named `files` count as fields, not files, in the parser's limit
        raise HTTPException(413, f"{len(files)} files: at most {max_batch} per request")
    if cam and len(files) > BATCH_CAM_LIMIT:
        raise HTTPException(413, f"{len(files)} files with cam=true: at most {BATCH_CAM_LIMIT} Grad-CAM maps per "
                                 "request")
    ages, sexes = form.getlist("age") or None, form.getlist("sex") or None
    for field_name, values in (("age", ages), ("sex", sexes)):
        if values is not None and len(values) != len(files):
            raise HTTPException(422, f"{field_name}: {len(values)} values for {len(files)} files (give one per file, "
                                     "in order, empty where unknown)")
    try:
        return await run_in_threadpool(served.answer_batch, files, ages, sexes, cam, guard)
    finally:
        await form.close()  # the parts Starlette spooled to disk go now, not at garbage collection


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without the `input` it echoes: a text part sent where a file belongs came back whole."""
    detail = [{k: v for k, v in e.items() if k != "input"} for e in error.errors()]
    return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)


def batch_request_schema(max_batch: int) -> dict:
    """The OpenAPI request body of POST /api/predict/batch, whose form the endpoint parses itself."""
    one_per_file = {"type": "array", "items": {"type": "string"},
                    "description": "optional: one per file, in order, empty where unknown (models with metadata)"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "maxItems": max_batch,
                                 "items": {"type": "string", "format": "binary"},
                                 "description": f"up to {max_batch} dermoscopy photographs"},
                       "age": one_per_file, "sex": one_per_file}}}}}}


def read_upload(file: UploadFile, file_limit: int, name: str) -> Image.Image:
    """An uploaded file -> RGB image; 413 over the limit, 415 not an image, 422 empty or unreadable."""
    data = file.file.read(file_limit + 1)
    if len(data) > file_limit:
        raise HTTPException(413, f"{name}: {UploadTooLarge(file_limit).detail}")
    if not data:
        raise HTTPException(422, f"{name}: empty file (0 bytes)")
    return decode_upload(data, name)


def answer(record: Prediction, class_names: Sequence[str]) -> dict:
    """One image's answer, as the API gives it: Classifier.records' Prediction (probabilities per class, the
    malignant probability, the label at the threshold, the guard's word and the sentence) in JSON's types, null
    where there is nothing to say (no guard, no refusal)."""
    return {
        "filename": record.source,
        "probabilities": {c: float(p) for c, p in zip(class_names, record.probabilities, strict=True)},
        "malignant_probability": float(record.malignant),
        "label": record.label,
        "ood_score": float(record.ood_score) if np.isfinite(record.ood_score) else None,
        "in_distribution": record.in_distribution,
        "refusal": record.refusal or None,
        "metadata_used": record.metadata_used,
        "sentence": record.sentence,
    }


def render_page(card: dict, file_limit: int, max_batch: int = 32) -> str:
    """The single upload page (templates/page.html, autoescaped); the model's facts are filled in here, the
    prediction by the page's script."""
    from jinja2 import Environment, PackageLoader, select_autoescape
    from markupsafe import Markup

    validation = card["validation"] or {}
    figures = [(FIGURE_NAMES.get(k, str(k).replace("_", " ")), f"{v:.3f}" if isinstance(v, float) else str(v))
               for k, v in validation.items()]
    if card["members"]:
        architecture = f"an ensemble of {len(card['members'])} runs, their probabilities averaged (" + "; ".join(
            f"{m['name']}: {m['backbone']} at {m['image_size']} px, {m['tta']} view(s)" for m in card["members"]) + ")"
    else:
        architecture = f"{card['backbone']} at {card['image_size']} px"
    environment = Environment(loader=PackageLoader("skincancer", "templates"), autoescape=select_autoescape(),
                              keep_trailing_newline=True)
    return environment.get_template("page.html").render(
        notice=NOTICE, name=card["name"], architecture=architecture, version=str(card["version"]),
        engine=card["engine"], threshold=f"{card['threshold']:.4g}", policy=str(card["threshold_policy"]),
        classes=", ".join(card["class_names"]), positive=card["positive_name"], figures=figures,
        # a JS string, safe inside <script>: JSON with "<" escaped, not HTML-escaped
        positive_js=Markup(json.dumps(card["positive_name"]).replace("<", "\\u003c")),
        limit_mb=f"{file_limit / MB:g}", patient="" if card["metadata"] else " hidden", max_batch=max_batch,
        source=("out-of-fold predictions over the training and validation images"
                if str(card["validation_source"]).startswith("out-of-fold") else "the validation split"),
        sources=("; ".join(f"{x['name']} ({x['train_images']} training images, {x['licence']})"
                           for x in card["sources"]) if card["sources"] else "not recorded (a run saved before runs "
                 "recorded their data sources)"),
        licence=card["licence"],
        guard_note=("Photos that do not look like the dermoscopy images this model was trained on, and blank, black "
                    "or washed-out frames, get no verdict." if card["guard"] else
                    "This model has no out-of-distribution guard: any photo gets a verdict, except blank, black or "
                    "washed-out frames. Use dermoscopy images only."),
    )

