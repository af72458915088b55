"""Web service: the API's answers, and a JSON 4xx (never a 500, never a dead server) for every kind of bad upload."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from live_server import serving
from PIL import Image

from skincancer import NOTICE
from skincancer.ensemble import load_models
from skincancer.export import export_onnx
from skincancer.middleware import Metrics
from skincancer.predict import load_model
from skincancer.serve import create_app

pytestmark = pytest.mark.slow
LIMIT_MB = 1


@pytest.fixture(scope="module")
def served_run(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(Path(tiny_run) / "model", run / "model")
    shutil.copy(Path(tiny_run) / "valid_predictions.csv", run)  # an ensemble's threshold is chosen on it
    export_onnx(run)
    return run


@pytest.fixture(scope="module")
def client(served_run) -> TestClient:
    with TestClient(create_app(served_run, max_upload_mb=LIMIT_MB)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def lesion(data_dir) -> Path:
    return sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0]


def upload(client, data: bytes, name: str = "lesion.jpg", **params) -> httpx.Response:
    return client.post("/api/predict", files={"file": (name, data, "image/jpeg")}, params=params)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_refused(response: httpx.Response, status: int | tuple[int, ...], *words: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    for word in words:
        assert word in str(detail), detail


def test_predict_answers_like_the_library(client, served_run, lesion):
    response = upload(client, lesion.read_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = load_model(served_run, engine="torch").predict([str(lesion)]).iloc[0]
    assert set(answer["probabilities"]) == {"melanoma", "nevus", "seborrheic_keratosis"}
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    for name, p in answer["probabilities"].items():
        assert p == pytest.approx(expected[name], abs=1e-4)
    assert answer["malignant_probability"] == pytest.approx(answer["probabilities"]["melanoma"])
    assert answer["label"] == ("malignant" if answer["malignant_probability"] >= answer["threshold"] else "benign")
    assert answer["label"] == expected["label"]
    assert answer["model"] == {"name": "run", "backbone": "tf_efficientnet_lite0", "version": "0.1.0",
                               "engine": "onnx"}
    assert answer["notice"] == NOTICE and "cam_png_base64" not in answer


def test_predict_with_cam_returns_an_overlay_png(client, lesion):
    response = upload(client, lesion.read_bytes(), cam="true")
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(base64.b64decode(response.json()["cam_png_base64"]))) as overlay:
        assert overlay.format == "PNG" and overlay.size == (256, 256)


def test_several_files_to_the_single_endpoint_are_refused(client, lesion):
    two = client.post("/api/predict", files=[("file", ("a.jpg", lesion.read_bytes(), "image/jpeg")),
                                             ("file", ("b.jpg", lesion.read_bytes(), "image/jpeg"))])
    assert_refused(two, 422, "2 parts named 'file'", "/api/predict/batch")


def test_serve_can_average_more_views_than_the_model_does(cli, served_run, lesion):
    with TestClient(create_app(served_run, tta=8)) as eight:
        answer = upload(eight, lesion.read_bytes()).json()
        assert eight.get("/api/model").json()["tta"] == 8
    expected, _ = load_model(served_run, engine="torch").predict_proba([str(lesion)], tta=8)
    single, _ = load_model(served_run, engine="torch").predict_proba([str(lesion)], tta=1)
    assert answer["probabilities"]["melanoma"] == pytest.approx(expected[0, 0], abs=1e-4)
    assert abs(expected[0, 0] - single[0, 0]) > 1e-4  # eight views are not the model's one
    refused = cli("serve", "--model", str(served_run), "--tta", "3")
    assert refused.returncode == 2 and "--tta: must be 1, 2, 4, 8 or a multiple of 8 up to 64" in refused.output


def test_metrics_count_requests_latency_and_photos(served_run, lesion):
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(create_app(served_run, max_upload_mb=LIMIT_MB)) as fresh:  # counters of its own
        good = lesion.read_bytes()
        for _ in range(2):
            assert upload(fresh, good).status_code == 200
        assert upload(fresh, b"not a photo", "notes.jpg").status_code == 415
        assert batch(fresh, [("a.jpg", good), ("b.jpg", b""), ("c.jpg", good)]).status_code == 200
        for path in ("/api/health", "/wp-login.php", "/.env"):
            fresh.get(path)
        response = fresh.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}

    def value(metric: str, **labels) -> float:
        return samples.get((metric, tuple(sorted(labels.items()))), 0.0)

    assert value("skincancer_requests_total", route="/api/predict", status="200") == 2
    assert value("skincancer_requests_total", route="/api/predict", status="415") == 1
    assert value("skincancer_requests_total", route="/api/predict/batch", status="200") == 1
    assert value("skincancer_requests_total", route="other", status="404") == 2  # unknown paths share one label
    assert value("skincancer_request_seconds_count", route="/api/predict") == 3
    assert value("skincancer_request_seconds_bucket", route="/api/predict", le="+Inf") == 3
    assert 0 < value("skincancer_request_seconds_sum", route="/api/predict") < 60
    assert value("skincancer_images_total", outcome="answered") == 4  # 2 single, 2 in the batch
    assert value("skincancer_images_total", outcome="failed") == 2  # the text file, the empty file
    assert value("skincancer_model_info", name="run", engine="onnx", version="0.1.0") == 1


def test_two_apps_in_one_process_count_apart():
    from prometheus_client import generate_latest

    card = {"name": "run", "engine": "onnx", "version": "0.1.0"}
    first, second = Metrics(["/api/predict"], card), Metrics(["/api/predict"], {**card, "name": "other"})
    first.observe("/api/predict", 200, 0.3)
    first.observe("/.env", 404, 0.01)
    first.count_images(1, 0)
    assert first.registry.get_sample_value("skincancer_requests_total", {"route": "/api/predict", "status": "200"}) == 1
    assert first.registry.get_sample_value("skincancer_requests_total", {"route": "other", "status": "404"}) == 1
    assert second.registry.get_sample_value("skincancer_requests_total",
                                            {"route": "/api/predict", "status": "200"}) is None
    assert second.registry.get_sample_value("skincancer_images_total", {"outcome": "answered"}) == 0
    assert 'skincancer_model_info{engine="onnx",name="other",version="0.1.0"} 1.0' in generate_latest(
        second.registry).decode()


def test_health_model_page_and_docs(client, served_run):
    assert client.get("/api/health").json()["status"] == "ok"
    card = client.get("/api/model").json()
    assert card["backbone"] == "tf_efficientnet_lite0" and card["engine"] == "onnx"
    assert set(card["validation"]) >= {"auc", "sensitivity", "specificity"} and card["notice"] == NOTICE
    recorded = json.loads((served_run / "model" / "model.json").read_text())["environment"]
    assert card["trained"] == {"at": recorded["at"], "skincancer": recorded["skincancer"], "git": recorded["git"]}
    assert card["validation_source"] == "valid"  # the page and card say where the figures come from
    page = client.get("/")
    assert "Validation figures (the validation split)" in page.text
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert NOTICE in page.text and f"{card['validation']['auc']:.3f}" in page.text
    assert 'id="file"' in page.text and 'id="overlay"' in page.text
    assert client.get("/docs").status_code == 200
    assert {"/api/predict", "/api/health", "/api/model"} <= set(client.get("/openapi.json").json()["paths"])


def test_not_an_image_is_415(client):
    assert_refused(upload(client, b"hello, I am a text file\n" * 20, name="notes.jpg"), 415, "notes.jpg",
                   "not an image")
    assert_refused(upload(client, b"%PDF-1.4\n" + bytes(range(256)) * 4, name="scan.pdf"), 415, "scan.pdf")


def test_truncated_and_corrupt_images_are_422(client, lesion):
    data = lesion.read_bytes()
    assert_refused(upload(client, data[: len(data) // 2], name="half.jpg"), 422, "half.jpg", "truncated")
    good_png = png_bytes(Image.new("RGB", (64, 64), (120, 60, 30)))
    data_at = good_png.index(b"IDAT") + 4  # the compressed pixels start here with a 2-byte zlib header
    broken_png = good_png[:data_at] + b"\x00\x00" + good_png[data_at + 2:]
    assert_refused(upload(client, broken_png, name="garbled.png"), 422, "garbled.png", "corrupt")
    assert_refused(upload(client, png_bytes(Image.new("RGB", (3, 3))), name="dot.png"), 422, "too small")
    assert_refused(upload(client, b"", name="empty.jpg"), 422, "empty")


def test_decompression_bombs_are_422(client):
    header_only = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                   + png_chunk(b"IDAT", zlib.compress(b"\x00" * 9001)) + png_chunk(b"IEND", b""))
    assert_refused(upload(client, header_only, name="header.png"), 422, "decompression bomb")
    bomb = png_bytes(Image.new("1", (12000, 12000)))  # a valid file: ~20 kB that decodes to 144 megapixels
    assert len(bomb) < 100_000
    assert_refused(upload(client, bomb, name="bomb.png"), 422, "decompression bomb")


def test_uploads_over_the_limit_are_413(client, lesion):
    limit = LIMIT_MB * 1024 * 1024
    assert_refused(upload(client, b"\xff" * (2 * limit)), 413, "limit")  # Content-Length says so up front
    assert_refused(upload(client, b"\xff" * (limit + 10)), 413, "limit")  # just over: counted after parsing

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(40):
            yield b"\xff" * 65536
    response = client.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; "
                                                                                     "boundary=xyz"})
    assert_refused(response, 413, "limit")
    assert upload(client, lesion.read_bytes()).status_code == 200  # and the next good upload still works


def batch(client, files: list[tuple[str, bytes]], params: dict | None = None, **data) -> httpx.Response:
    return client.post("/api/predict/batch", files=[("files", (name, raw, "image/jpeg")) for name, raw in files],
                       data=data, params=params)


def test_batch_answers_each_file_like_a_single_upload(client, data_dir, monkeypatch):
    from skincancer import serve

    monkeypatch.setattr(serve, "BATCH_CHUNK", 2)  # 5 files: predicted in chunks of 2, 2 and 1
    images = sorted((data_dir / "test").rglob("*.jpg"))[:4]
    files = [(p.name, p.read_bytes()) for p in images] + [("again.jpg", images[0].read_bytes())]
    response = batch(client, files)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["n"] == 5 and answer["n_failed"] == 0 and answer["notice"] == NOTICE
    assert [r["filename"] for r in answer["results"]] == [name for name, _ in files]  # in order
    for (name, raw), result in zip(files, answer["results"], strict=True):
        single = upload(client, raw, name).json()
        assert result["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)
        assert (result["label"], result["sentence"]) == (single["label"], single["sentence"])
    assert answer["results"][0]["probabilities"] == pytest.approx(answer["results"][4]["probabilities"], abs=1e-6)


def test_batch_holds_a_bounded_number_of_decoded_pixels(client, data_dir, monkeypatch):
    from skincancer import serve

    classifier, sizes = client.app.state.classifier, []
    judge = classifier.judge
    monkeypatch.setattr(classifier, "judge", lambda images, **kw: (sizes.append(len(images)), judge(images, **kw))[1])
    images = sorted((data_dir / "test").rglob("*.jpg"))[:5]  # 256 x 256 photos
    monkeypatch.setattr(serve, "BATCH_PIXELS", 2 * 256 * 256)
    answer = batch(client, [(p.name, p.read_bytes()) for p in images]).json()
    assert answer["n_failed"] == 0 and sizes == [2, 2, 1]
    sizes.clear()
    monkeypatch.setattr(serve, "BATCH_PIXELS", 256 * 256 - 1)  # a photo over the budget is still answered, alone
    assert batch(client, [(p.name, p.read_bytes()) for p in images[:2]]).json()["n_failed"] == 0
    assert sizes == [1, 1]


def test_batch_answers_the_good_files_beside_the_bad(client, lesion):
    good = lesion.read_bytes()
    files = [("a.jpg", good), ("notes.txt", b"hello"), ("empty.jpg", b""), ("cut.jpg", good[: len(good) // 3]),
             ("b.jpg", good)]
    answer = batch(client, files).json()
    assert answer["n"] == 5 and answer["n_failed"] == 3
    results = answer["results"]
    assert "error" not in results[0] and results[0]["probabilities"] == results[4]["probabilities"]
    assert (results[1]["status"], results[2]["status"], results[3]["status"]) == (415, 422, 422)
    assert results[1]["error"].startswith("notes.txt: not an image") and "empty file" in results[2]["error"]
    assert results[3]["error"].startswith("cut.jpg:")


def test_batch_with_cam_gives_each_readable_photo_the_single_uploads_overlay(client, data_dir, monkeypatch):
    from skincancer import serve

    monkeypatch.setattr(serve, "BATCH_CHUNK", 2)  # the overlays of every chunk, not of the last one only
    images = sorted((data_dir / "test").rglob("*.jpg"))[:3]
    files = [(images[0].name, images[0].read_bytes()), ("notes.jpg", b"no photo"),
             *((p.name, p.read_bytes()) for p in images[1:])]
    results = batch(client, files, params={"cam": "true"}).json()["results"]
    assert [("cam_png_base64" in r, "error" in r) for r in results] == [(True, False), (False, True), (True, False),
                                                                         (True, False)]
    for (name, raw), result in zip(files, results, strict=True):
        if "error" not in result:
            assert result["cam_png_base64"] == upload(client, raw, name, cam="true").json()["cam_png_base64"]
    assert all("cam_png_base64" not in r for r in batch(client, files[:1]).json()["results"])
    monkeypatch.setattr(serve, "BATCH_CAM_LIMIT", 2)  # maps cost a backward pass each: capped per request
    assert_refused(batch(client, files, params={"cam": "true"}), 413, "at most 2 Grad-CAM maps")
    assert batch(client, files).status_code == 200  # the same photos without maps


def test_batch_limits_and_form_fields(client, lesion):
    good = lesion.read_bytes()
    limit = LIMIT_MB * 1024 * 1024
    over = batch(client, [("big.jpg", b"\xff" * (limit + 10)), ("ok.jpg", good)])  # under the request's limit
    assert over.status_code == 200 and over.json()["results"][0]["status"] == 413
    assert "error" not in over.json()["results"][1]
    assert_refused(batch(client, [("a.jpg", good)] * 33), 413, "at most 32 per request")
    assert over.json()["results"][0]["error"].startswith("big.jpg: upload larger than the limit of 1 MB")
    assert_refused(batch(client, [("a.jpg", b"\xff" * limit)] * 40), 413, "per file, 32 files per request")
    assert_refused(batch(client, [("a.jpg", good)] * 2, age=["50"]), 422, "age: 1 values for 2 files")
    answer = batch(client, [("a.jpg", good)] * 2, age=["50", "old"], sex=["", "female"]).json()
    assert "error" not in answer["results"][0]  # the model has no metadata model: age/sex checked, not used
    assert answer["results"][0]["metadata_used"] is False
    assert answer["results"][1]["status"] == 422 and "age of a.jpg: 'old'" in answer["results"][1]["error"]
    assert_refused(client.post("/api/predict/batch"), 422)
    text_part = client.post("/api/predict/batch", files=[("files", (None, "not a file")), ("files", ("a.jpg", good))])
    assert [r.get("status") for r in text_part.json()["results"]] == [422, None]
    assert "file 1: a form field, not a file" in text_part.json()["results"][0]["error"]
    assert_refused(client.post("/api/predict/batch", files=[("files", (None, "x" * 5000))]), 400, "maximum size")
    assert_refused(client.post("/api/predict/batch", files=[("files", (None, "x"))] * 33), 413, "at most 32")


def test_a_text_part_where_a_file_belongs_is_not_echoed_back(client):
    response = client.post("/api/predict", files={"file": (None, "x" * 200_000)})
    assert_refused(response, 422)
    assert len(response.content) < 2000 and "xxxx" not in response.text


def test_malformed_requests_are_4xx(client):
    assert_refused(client.post("/api/predict"), 422)
    assert_refused(client.post("/api/predict", files={"photo": ("a.jpg", b"abc", "image/jpeg")}), 422)
    assert_refused(client.post("/api/predict", content=b"--nope\r\ngarbage",
                               headers={"content-type": "multipart/form-data; boundary=nope"}), (400, 422))


def test_each_request_gets_one_access_log_line(client, lesion, caplog):
    """A service operator sees every request (client, method, path, status, time), refused uploads included; health
    polls stay at DEBUG, and query strings (which may name a patient) never reach the log."""
    with caplog.at_level(logging.INFO, logger="skincancer"):
        assert upload(client, lesion.read_bytes(), patient="jane-doe").status_code == 200
        assert upload(client, b"\xff" * (2 * LIMIT_MB * 1024 * 1024)).status_code == 413
        assert client.get("/api/health").status_code == 200
    lines = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert [re.sub(r"\d+ ms$", "N ms", line) for line in lines if '"' in line] == [
        'testclient "POST /api/predict" 200 N ms', 'testclient "POST /api/predict" 413 N ms']
    assert not any("jane" in line for line in lines)


def test_live_server_binds_loopback_and_survives_bad_uploads(served_run, lesion):
    with serving(served_run, "--max-upload-mb", str(LIMIT_MB)) as (url, process):
        with httpx.Client(base_url=url, timeout=30) as http:
            bad = [
                ("big.jpg", b"\x00" * (3 * 1024 * 1024), 413),
                ("text.jpg", b"plain text, not a photo", 415),
                ("half.jpg", lesion.read_bytes()[:3000], 422),
            ]
            for name, data, status in bad:
                try:
                    response = http.post("/api/predict", files={"file": (name, data, "image/jpeg")})
                except httpx.HTTPError:  # a server may close a connection that sends too much: allowed
                    assert status == 413
                    continue
                assert response.status_code == status, response.text
            good = http.post("/api/predict", files={"file": (lesion.name, lesion.read_bytes(), "image/jpeg")})
            assert good.status_code == 200 and 0 <= good.json()["malignant_probability"] <= 1
            assert process.poll() is None
    output = process.stdout.read()
    assert "http://127.0.0.1:" in output and "Research aid only" in output
    assert '127.0.0.1 "POST /api/predict" 200' in output and '"POST /api/predict" 415' in output  # access lines


def test_probabilities_are_finite(client, data_dir):
    for path in sorted((data_dir / "test" / "nevus").glob("*.jpg"))[:3]:
        answer = upload(client, path.read_bytes()).json()
        assert np.isfinite(list(answer["probabilities"].values())).all()


def test_an_ensemble_is_served_like_evaluate_scores_it(served_run, finetune_run, lesion):
    """Several runs: probabilities averaged and the threshold re-chosen, as `predict`/`evaluate` do; the card and
    the page name every member."""
    ensemble = load_models([served_run, finetune_run], engine="torch")
    expected = ensemble.predict([str(lesion)]).iloc[0]
    with TestClient(create_app([served_run, finetune_run], engine="torch")) as client:
        card = client.get("/api/model").json()
        assert card["mode"] == "ensemble" and card["name"] == f"run + {Path(finetune_run).name}"
        assert [m["backbone"] for m in card["members"]] == ["tf_efficientnet_lite0"] * 2
        assert [m["image_size"] for m in card["members"]] == [224, 96]
        trained = json.loads((Path(finetune_run) / "model" / "model.json").read_text())["environment"]["at"]
        assert card["members"][1]["trained"]["at"] == trained and card["trained"] is None
        assert card["threshold"] == pytest.approx(ensemble.threshold) and card["engine"] == "torch"
        assert "an ensemble of 2 runs" in client.get("/").text
        answer = upload(client, lesion.read_bytes(), cam="true").json()
    for name, p in answer["probabilities"].items():
        assert p == pytest.approx(expected[name], abs=1e-5)
    assert answer["threshold"] == pytest.approx(ensemble.threshold) and answer["label"] == expected["label"]
    assert answer["model"]["name"] == card["name"] and answer["cam_png_base64"]


def test_serve_cli_takes_several_models(served_run, finetune_run, lesion):
    with serving([served_run, finetune_run], "--engine", "torch") as (url, process):
        with httpx.Client(base_url=url, timeout=60) as http:
            assert len(http.get("/api/model").json()["members"]) == 2
            good = http.post("/api/predict", files={"file": (lesion.name, lesion.read_bytes(), "image/jpeg")})
            assert good.status_code == 200 and 0 <= good.json()["malignant_probability"] <= 1
    output = process.stdout.read()
    assert f"serving {served_run / 'model'}, {Path(finetune_run) / 'model'} (torch)" in output


def test_uploads_are_decoded_two_at_a_time_and_kept_at_most_4096_px(monkeypatch):
    """A few hundred kB can decode to hundreds of MB: concurrent requests must not all decode at once."""
    import threading
    import time as clock

    from skincancer import serve

    buffer = io.BytesIO()
    Image.new("RGB", (5000, 40), (120, 60, 30)).save(buffer, format="PNG")
    image = serve.decode_upload(buffer.getvalue(), "wide.png")
    assert image.size == (4096, 33) and image.mode == "RGB"

    busy, most, lock = [0], [0], threading.Lock()
    real = serve.load_image

    def slow_load(path):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        clock.sleep(0.2)
        with lock:
            busy[0] -= 1
        return real(path)

    monkeypatch.setattr(serve, "load_image", slow_load)
    small = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 30)).save(small, format="PNG")
    threads = [threading.Thread(target=serve.decode_upload, args=(small.getvalue(), f"{i}.png")) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 2
