"""Tests: Ray Data batch prediction gives the single-process probabilities, one row per image, errors named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray  # in the dev extra: CI runs this module, never skips it

from skincancer.checkpoint import CheckpointError
from skincancer.ensemble import load_models
from skincancer.images import expand_inputs
from skincancer.predict import load_model
from skincancer.ray_predict import RayPredictError, predict_with_ray, ray_data_console_handlers

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray at a time: make test runs pytest -n 2 --dist loadgroup


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (predict_with_ray leaves a Ray it did not start running)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_folder(data_dir, tmp_path_factory) -> Path:
    """Eight real test images (four melanoma, four nevus, one in a subfolder) and one truncated JPEG."""
    root = tmp_path_factory.mktemp("ray_images")
    (root / "more").mkdir()
    for diagnosis in ("melanoma", "nevus"):
        for i, path in enumerate(sorted((data_dir / "test" / diagnosis).glob("*.jpg"))[:4]):
            shutil.copy(path, (root / "more" if i == 0 else root) / path.name)
    first = sorted(root.glob("*.jpg"))[0]
    (root / "broken.jpg").write_bytes(first.read_bytes()[:2000])
    return root


def _console_levels() -> list[int]:
    return [handler.level for handler in ray_data_console_handlers()]


@pytest.mark.slow
def test_ray_predict_matches_the_single_process_path(local_ray, tiny_run, image_folder, tmp_path):
    # a model whose own default is 2 views: predict_with_ray uses it, as `predict` and `predict --ray` do
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    card = run / "model" / "model.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "tta": 2}))
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "predictions.parquet"
    failures = []
    levels = _console_levels()
    rows, failed = predict_with_ray(run, [image_folder], out, batch_size=3, progress=False,
                                    on_error=lambda source, reason: failures.append((source, reason)))
    classifier = load_model(run)
    expected = classifier.predict(expand_inputs([image_folder]))
    table = pd.read_parquet(out)

    assert (rows, failed) == (9, 1)
    assert list(table.columns) == list(expected.columns)
    assert list(table["source"]) == list(expected["source"])  # one row per image, in `predict`'s order
    columns = [*classifier.class_names, classifier.positive_name]
    np.testing.assert_allclose(table[columns].to_numpy(float), expected[columns].to_numpy(float), atol=1e-5)
    assert list(table["label"]) == list(expected["label"])
    broken = str(image_folder / "broken.jpg")
    assert table.loc[table["source"] == broken, "error"].item().startswith("corrupt or truncated image")
    assert table.loc[table["source"] == broken, columns].isna().all(axis=None)
    assert (table.loc[table["source"] != broken, "error"] == "").all()
    assert failures == [(broken, table.loc[table["source"] == broken, "error"].item())]
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.parquet"]  # no temp file left behind
    # Ray Data's console lines are quieted while predicting only: a Python caller gets its INFO lines back
    assert levels and _console_levels() == levels


@pytest.mark.slow
def test_cli_predict_ray_writes_csv_and_names_unreadable_files(cli, local_ray, tiny_run, image_folder, tmp_path):
    out = tmp_path / "out.csv"
    files = sorted(image_folder.glob("*.jpg"))
    missing = tmp_path / "missing.jpg"
    result = cli("predict", "--model", str(tiny_run), "--ray", str(files[0]),
                 str(image_folder / "more"), str(missing), "-o", str(out))
    assert result.returncode == 1, result.output  # like `predict`: unreadable files make the exit status 1
    assert f"error: {missing}: file not found" in result.output
    table = pd.read_csv(out, keep_default_na=False)
    expected = load_model(tiny_run).predict([str(files[0]), *expand_inputs([image_folder / "more"]), str(missing)])
    assert list(table["source"]) == list(expected["source"])
    assert list(table["error"]) == ["", "", "", "file not found"]
    np.testing.assert_allclose(table["malignant"].to_numpy()[:3].astype(float),
                               expected["malignant"].to_numpy()[:3], atol=1e-5)


def test_bad_arguments_fail_before_ray_starts(tiny_run, image_folder, tmp_path):
    with pytest.raises(RayPredictError, match=r"out\.xlsx: the output must end in \.parquet or \.csv"):
        predict_with_ray(tiny_run, [image_folder], tmp_path / "out.xlsx")
    with pytest.raises(RayPredictError, match="engine must be one of"):
        predict_with_ray(tiny_run, [image_folder], tmp_path / "out.csv", engine="tensorrt")
    with pytest.raises(CheckpointError, match="no-run: no such run or model folder"):
        predict_with_ray(tmp_path / "no-run", [image_folder], tmp_path / "out.csv")


def test_ray_cli_checks_its_output_and_options_before_ray_starts(cli, tiny_run, image_folder, tmp_path):
    """Found by review: --ray -o replaced any CSV (a manifest), ran the whole job before finding -o was a folder
    (leaving .NAME.part behind), and ignored --cam and --format json."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image_id,filepath,diagnosis,label\nISIC_1,a.jpg,nevus,0\n")
    folder = tmp_path / "d.csv"
    folder.mkdir()
    base = ["predict", str(image_folder), "--model", str(tiny_run), "--ray", "--tta", "1"]
    for extra, message in ((["-o", str(manifest)], "not a table this command wrote"),
                           (["-o", str(folder)], "is a folder"),
                           (["-o", str(tmp_path / "p.csv"), "--cam", str(tmp_path / "cams")], "--cam without --ray"),
                           (["--format", "json"], "drop --format json"),
                           (["--format", "csv", "-o", str(tmp_path / "p.parquet")], "drop --format csv")):
        result = cli(*base, *extra)
        assert result.returncode == 2 and message in result.output, result.output
    assert manifest.read_text().startswith("image_id,filepath")
    assert sorted(tmp_path.iterdir()) == sorted([manifest, folder])  # nothing written, no .part left


def test_unreachable_cluster_and_missing_ray_are_named(tiny_run, image_folder, tmp_path, monkeypatch):
    from skincancer.ray_predict import _check_reachable

    with pytest.raises(RayPredictError, match="cannot reach a Ray cluster at 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1", timeout=5)  # Ray itself retried such an address for minutes
    for address in ("ray://127.0.0.1:1", "[::1]:1"):
        with pytest.raises(RayPredictError, match="cannot reach a Ray cluster"):
            _check_reachable(address, timeout=5)
    for address in (None, "auto", "local"):  # a Ray started here, or Ray's own lookup: nothing to probe
        _check_reachable(address)
    with pytest.raises(RayPredictError, match="expected HOST:PORT"):
        _check_reachable("my-cluster")
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as without the [ray] extra
    with pytest.raises(RayPredictError, match=r"pip install 'skincancer\[ray\]'"):
        predict_with_ray(tiny_run, [image_folder], tmp_path / "out.csv")


def test_a_stream_that_fails_midway_leaves_no_file(tmp_path):
    from skincancer.ray_predict import write_stream

    def batches():
        yield pd.DataFrame({"source": ["a.jpg"], "malignant": [0.5], "error": [""]})
        raise RuntimeError("worker died")

    for name in ("out.csv", "out.parquet"):
        with pytest.raises(RuntimeError, match="worker died"):
            write_stream(batches(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_ray_cli_num_workers_sets_the_model_actors(cli, tiny_run, image_folder, tmp_path, monkeypatch):
    """--num-workers was silently ignored under --ray; there it sets the number of model actors (0 is refused)."""
    import skincancer.ray_predict

    asked = {}

    def fake(run, inputs, out, **kwargs):
        asked.update(kwargs)
        return 1, 0

    monkeypatch.setattr(skincancer.ray_predict, "predict_with_ray", fake)
    base = ["predict", str(image_folder), "--model", str(tiny_run), "--ray", "-o", str(tmp_path / "p.csv")]
    assert cli(*base, "--num-workers", "3").returncode == 0
    assert asked["actors"] == 3
    assert cli(*base).returncode == 0
    assert asked["actors"] is None  # Ray sizes the pool
    result = cli(*base, "--num-workers", "0")
    assert result.returncode == 2 and "counts model actors" in result.output


@pytest.mark.slow
def test_ray_cli_keeps_ray_data_info_lines_off_stderr(tiny_run, image_folder, tmp_path):
    """A run from a script (stderr not a terminal) printed ~200 lines of Ray Data execution plans and progress
    tables for one image; stderr now carries the command's own lines (and Ray's warnings), the file the rows."""
    import subprocess
    import sys

    # a real process: Ray Data's console handlers and its own processes write to the real stderr (file descriptor
    # 2, which an in-process runner does not capture); what reaches a script's stderr is the point
    out = tmp_path / "p.csv"
    images = sorted(image_folder.glob("*.jpg"))[1:4]
    # --num-workers 2 on a 2-CPU machine: a fixed pool of 2 one-CPU actors left the folder-listing task no CPU and
    # the run hung (found by review); the pool now grows from one actor up to 2
    done = subprocess.run([sys.executable, "-m", "skincancer", "predict", *map(str, images), "--model", str(tiny_run),
                           "--ray", "--num-workers", "2", "--tta", "1", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(pd.read_csv(out)["source"]) == list(map(str, images))
    noise = [line for line in done.stderr.splitlines()
             if " INFO " in line or "Running Dataset" in line or "Progress bars" in line]
    assert noise == [], "\n".join(noise[:10])
    assert f"wrote {out}: 3 predicted, 0 failed" in done.stderr


@pytest.mark.slow
def test_ray_predicts_an_ensemble_as_predict_does(cli, local_ray, tiny_run, finetune_run, image_folder, tmp_path):
    """Several --model under --ray: each actor holds every member; the rows are `predict`'s ensemble rows."""
    out = tmp_path / "ensemble.csv"
    result = cli("predict", "--model", str(tiny_run), "--model", str(finetune_run), "--ray",
                 str(image_folder / "more"), "--engine", "torch", "-o", str(out))
    assert result.returncode == 0, result.output
    expected = load_models([tiny_run, finetune_run], engine="torch").predict(expand_inputs([image_folder / "more"]))
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table["source"]) == [str(Path(s).absolute()) for s in expected["source"]] and len(table) == 2
    np.testing.assert_allclose(table["malignant"], expected["malignant"], atol=1e-5)
    assert list(table["label"]) == list(expected["label"])


@pytest.mark.slow
def test_ray_predict_reports_the_guard(local_ray, guarded_run, data_dir, tmp_path):
    from PIL import Image
    from skimage import data

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg")
    shutil.copy(sorted((data_dir / "test" / "nevus").glob("*.jpg"))[0], folder / "lesion.jpg")
    out = tmp_path / "guarded.parquet"
    predict_with_ray(guarded_run, [folder], out, batch_size=2, progress=False)
    table = pd.read_parquet(out).set_index("source")
    expected = load_model(guarded_run).predict(expand_inputs([folder])).set_index("source")
    astronaut = str(folder / "astronaut.jpg")
    assert table.loc[astronaut, "label"] == "refused" and not table.loc[astronaut, "in_distribution"]
    assert table.loc[astronaut, "refusal"].startswith("the image does not look like")
    np.testing.assert_allclose(table["ood_score"], expected.loc[table.index, "ood_score"], rtol=1e-4)
    assert list(table["label"]) == list(expected.loc[table.index, "label"])
    research = tmp_path / "research.csv"
    predict_with_ray(guarded_run, [folder], research, batch_size=2, progress=False, refuse=False)
    assert "refused" not in set(pd.read_csv(research)["label"])
