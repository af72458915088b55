"""Browser: Debian's chromium, driven by Playwright, uploads a real ISIC photo and sees the probability and overlay."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from live_server import serving

from skincancer import NOTICE
from skincancer.export import export_onnx

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def test_page_uploads_a_photo_and_shows_probability_and_overlay(browser, tiny_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(Path(tiny_run) / "model", run / "model")
    export_onnx(run)
    photo = sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[1]
    with serving(run) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        assert NOTICE in page.inner_text("#notice")
        assert "auc" in page.inner_text("#validation").lower()
        assert page.is_hidden("#result")

        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=60_000)
        assert page.inner_text("#error") == ""
        probability = page.inner_text("#probability")
        assert re.fullmatch(r"\d{1,3}\.\d%", probability), probability
        assert page.inner_text("#label") in ("malignant", "benign")
        assert page.inner_text("#metadata-note") == ""  # a model without metadata: no age/sex fields, no note
        assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
        assert page.evaluate("document.getElementById('overlay').naturalWidth") == 256

        api = page.request.post(url + "/api/predict", multipart={
            "file": {"name": photo.name, "mimeType": "image/jpeg", "buffer": photo.read_bytes()}}).json()
        assert probability == f"{api['malignant_probability'] * 100:.1f}%"  # the page shows the API's number

        page.set_input_files("#file", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"no photo"}])
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "415" in page.inner_text("#error") and "not an image" in page.inner_text("#error")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        others = sorted((data_dir / "test" / "nevus").glob("*.jpg"))[:2]
        sent = [{"name": p.name, "mimeType": "image/jpeg", "buffer": p.read_bytes()} for p in (photo, *others)]
        page.set_input_files("#file", files=[*sent, {"name": "<b>notes</b>.jpg", "mimeType": "image/jpeg",
                                                      "buffer": b"no photo"}])
        page.wait_for_selector("#batch", state="visible", timeout=60_000)
        assert page.is_hidden("#result") and page.inner_text("#error") == ""
        rows = [row.split("\t") for row in page.inner_text("#batch-table tbody").splitlines()]
        assert [row[0] for row in rows] == [photo.name, others[0].name, others[1].name, "<b>notes</b>.jpg"]
        assert page.locator("#batch-table b").count() == 0  # a file name is shown as text, never as markup
        assert rows[0][1:] == [probability, page.inner_text("#label")]  # as the single upload showed it
        assert "Error 415" in rows[3][1] and "not an image" in rows[3][1]
        assert page.inner_text("#batch-summary").startswith("4 photos, 1 failed")
        page.screenshot(path=str(tmp_path / "batch.png"), full_page=True)

        assert page.is_hidden("#batch-cam-head")
        page.check("#batch-cam")  # Grad-CAM for every photo of the batch: a thumbnail in a fourth column
        page.set_input_files("#file", files=sent[:2])
        page.wait_for_function("(() => { const pictures = document.querySelectorAll('#batch-table tbody img'); "
                               "return pictures.length === 2 && [...pictures].every((p) => p.naturalWidth > 0); })()",
                               timeout=60_000)
        assert page.is_visible("#batch-cam-head") and page.inner_text("#error") == ""
        page.screenshot(path=str(tmp_path / "batch-cam.png"), full_page=True)

        page.goto(url + "/docs")  # Swagger UI from the package's own static files: no CDN needed
        page.locator(".opblock").filter(has_text="/api/predict").first.wait_for(timeout=30_000)
        page.close()


def test_page_gives_no_verdict_for_a_photo_that_is_not_dermoscopy(browser, guarded_run, tmp_path):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo)
    with serving(guarded_run) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert page.inner_text("#error") == ""
        assert page.is_visible("#refusal")
        assert page.inner_text("#refusal").startswith("No verdict for this image")
        assert page.is_hidden("#verdict") and page.is_hidden("#overlay-figure")
        assert "%" not in page.inner_text("#result")  # no probability shown anywhere
        page.close()
