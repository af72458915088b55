"""Names that matplotlib could read as mathtext ($...$) or HTML (<b>) are drawn and shown as written."""

import html

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skincancer.metrics import calibration
from skincancer.report import html_report, plot_calibration, plot_confusion, plot_roc, preview_grid

NAMES = ["tiny_$1_$2", "<b>bold</b>", "_^{x}"]


def written(path) -> bool:
    return path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize("name", NAMES)
def test_plots_and_report_with_odd_names(tmp_path, name, monkeypatch):
    from skincancer import report

    figures, save = [], report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    roc = plot_roc({name: (labels, scores, 0.9), f"{name} vs rest": (1 - labels, 1 - scores, 0.9)}, (0.3, 0.6),
                   tmp_path / "roc.png", title=f"ROC on {name} (n=6)")
    legend = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    shown = name.replace("$", r"\$")  # drawn as a literal $
    assert legend == [f"{shown} (AUC 0.900)", f"{shown} vs rest (AUC 0.900)", "chosen threshold"]  # none dropped
    confusion = plot_confusion({"tn": 2, "fp": 1, "fn": 0, "tp": 3}, (f"not {name}", name),
                               tmp_path / "confusion_matrix.png")
    reliability = plot_calibration(calibration(labels, scores), tmp_path / "calibration.png",
                                   title=f"Calibration on {name} (n=6)")
    assert figures[-1].axes[0].get_title() == f"Calibration on {shown} (n=6)"
    assert written(roc) and written(confusion) and written(reliability)

    metrics = {"n": 6, "auc": 0.9, "data": f"/data/{name}", "class_auc": {name: 0.9},
               "model": {"backbone": "b", "mode": "linear", "class_names": [name, "nevus"]}}
    photo = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (120, 80, 60)).save(photo)
    examples = {"missed": [{"image_id": name, "diagnosis": name, "probability": 0.0123, "filepath": str(photo)},
                           {"image_id": "gone", "diagnosis": name, "probability": 0.02,
                            "filepath": str(tmp_path / "gone.jpg")}], "false_alarms": []}
    page = html_report(metrics, [roc, confusion], tmp_path / "report.html", examples=examples).read_text()
    assert html.escape(name) in page
    assert "<b>bold</b>" not in page
    assert page.count("data:image/png;base64,") == 2
    assert f"<figcaption>{html.escape(name)}, {html.escape(name)}: 1.23%</figcaption>" in page
    assert page.count("data:image/jpeg;base64,") == 1 and "unreadable now: file not found" in page
    assert "none: every benign image is below the threshold" in page  # no false alarm to show


def test_preview_grid_with_odd_names(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (200, 100, 50)).save(image)
    manifest = pd.DataFrame({"image_id": NAMES, "filepath": [str(image)] * 2 + [str(tmp_path / "$1_$2.jpg")],
                             "diagnosis": NAMES, "label": [1, 0, 0]})
    assert written(preview_grid(manifest, tmp_path / "grid.png"))


def test_report_escapes_hostile_names(tmp_path):
    """A run folder, a data path, a file name or a class name with markup in it shows as text, never as markup."""
    hostile = "<script>alert(1)</script>"
    escaped = html.escape(hostile)
    breakout = '" onerror="alert(2)'  # in an alt attribute: would close it and add a handler
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (120, 80, 60)).save(photo)
    metrics = {"n": 6, "auc": 0.9, "threshold": 0.3, "data": f"/data/{hostile}", "class_auc": {hostile: 0.9},
               "model": {"backbone": "b", "mode": "linear", "class_names": [hostile, "nevus"],
                         "threshold_policy": hostile, "trained_with": {f"runs/{hostile}": None}},
               "environment": {"data": {"images": 6, "fingerprint": "f" * 64}, "at": "now"},
               "skipped": [{"path": f"/data/{hostile}.jpg", "reason": hostile}],
               "subgroups": {"site": {hostile: {"n": 3, "n_positive": 1, "auc": 0.5, "sensitivity": 1.0,
                                                "sensitivity_ci95": [0.2, 1.0], "specificity": 0.5,
                                                "specificity_ci95": [0.1, 0.9]}}},
               "guard": {"guarded": True, "n_refused": 1, "n_out_of_distribution": 1, "n_frame_problems": 0,
                         "refused": [{"image_id": hostile, "reason": hostile}]}}
    examples = {"missed": [{"image_id": hostile, "diagnosis": hostile, "probability": 0.01, "filepath": str(photo)}],
                "false_alarms": [{"image_id": breakout, "diagnosis": "nevus", "probability": 0.9,
                                  "filepath": str(photo)}]}
    page = html_report(metrics, [], tmp_path / "report.html", title=f"evaluation of {hostile}",
                       examples=examples).read_text()
    assert "<script>" not in page and "</script>" not in page
    assert f"<title>evaluation of {escaped}</title>" in page and f"<h1>evaluation of {escaped}</h1>" in page
    assert f"data: /data/{escaped}." in page and f"<li>runs/{escaped}: saved before runs recorded" in page
    assert f"<tr><th>AUC {escaped} vs rest</th>" in page and f"<td>site: {escaped}</td>" in page
    assert f"<li>/data/{escaped}.jpg: {escaped}</li>" in page and f"<li>{escaped}: {escaped}</li>" in page
    assert f'alt="{escaped}, {escaped}: 1.00%"><figcaption>{escaped}, {escaped}: 1.00%</figcaption>' in page
    assert 'onerror="alert(2)' not in page and "onerror=&#34;alert(2)" in page
