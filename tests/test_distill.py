"""skincancer distill: a student network learns a teacher's probabilities (on extra, unlabelled images too) and is an
ordinary run folder that names its teacher."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CHEAP_PROBE

from skincancer import load_config, load_manifest
from skincancer.card import markdown_card
from skincancer.config import ConfigError
from skincancer.predict import Classifier, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student(cli, tiny_run, small_data, cache_dir, data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """A student (Lite0 at 96 px, one epoch of two steps) distilled from tiny_run over the small training subset and
    four unlabelled test images."""
    root = tmp_path_factory.mktemp("distill")
    extra = root / "unlabelled"
    extra.mkdir()
    for path in sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[:2] + \
            sorted((data_dir / "test" / "nevus").glob("*.jpg"))[:2]:
        shutil.copy(path, extra / path.name)
    out = root / "student"
    result = cli("distill", "--teacher", tiny_run, "--train", small_data["train"], "--valid", small_data["valid"],
                 "--extra", extra, "--out", out, "--image-size", "96", "--epochs", "1", "--max-steps-per-epoch", "2",
                 "--batch-size", "8", "--num-workers", "0", "--source-weight", "unlabelled=2",
                 env={"SKINCANCER_CACHE": str(cache_dir)})
    assert result.returncode == 0, result.output
    return out, sorted(str(p) for p in extra.glob("*.jpg"))


def test_the_student_is_a_run_that_predicts_and_names_its_teacher(student, tiny_run, small_data):
    out, extra = student
    meta = json.loads((out / "model" / "model.json").read_text())
    record = meta["distilled_from"]
    teacher_meta = json.loads((Path(tiny_run) / "model" / "model.json").read_text())
    assert record["teachers"][0]["weights_sha256"] == teacher_meta["weights_sha256"]
    assert record["labelled_images"] == 30 and record["extra_images"] == 4 and record["alpha"] == 0.7
    assert record["label_smoothing"] == 0.0
    # the extra images' own source can be weighted: each drawn twice an epoch
    assert meta["source_weights"] == {"unlabelled": 2.0}
    assert "unlabelled 8 (weight 2)" in (out / "train.log").read_text()
    assert meta["mode"] == "finetune" and meta["class_names"] == teacher_meta["class_names"]
    assert 0 < meta["threshold"] < 1 and meta["validation_source"] == "valid"  # chosen on validation, as any run
    # the teacher's data travels on with its licence; the extra images are listed as a source of their own
    names = [s["name"] for s in meta["sources"]]
    assert "unlabelled" in names and any("through the teacher linear" in n for n in names)
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert "distilled from the teacher linear (tf_efficientnet_lite0, 1 view)" in card
    assert "4 extra images at the teacher's alone." in card and "smoothed" not in card
    classifier = load_model(out)
    classifier.meta["distilled_from"]["label_smoothing"] = 0.1  # the card says when the targets were smoothed too
    assert "these targets then smoothed\n  by 0.1 (label_smoothing)" in markdown_card(classifier)
    classifier.meta["distilled_from"]["extra_images"] = 0  # no extra images: none mentioned
    assert "extra images" not in markdown_card(classifier)
    table = classifier.predict(extra)
    assert (table["error"] == "").all() and table["label"].isin(["malignant", "benign", "refused"]).all()


def test_the_targets_are_the_teachers_and_a_resume_reads_them_back(student, tiny_run, small_data, monkeypatch):
    from safetensors.numpy import load_file

    from skincancer.distill import TARGETS_FILE, teacher_targets

    out, extra = student
    train = load_manifest(small_data["train"])
    saved = load_file(str(out / TARGETS_FILE))["probabilities"]
    expected, _ = load_model(tiny_run).predict_proba([*train["filepath"], *extra])
    np.testing.assert_allclose(saved, expected, atol=1e-5)

    def never(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(Classifier, "predict_proba", never)
    config = load_config(out / "config.yaml")
    class_names = json.loads((out / "model" / "model.json").read_text())["class_names"]
    targets = train["diagnosis"].map({n: i for i, n in enumerate(class_names)}).to_numpy()
    taught = teacher_targets(config, class_names, train, targets, out)
    assert len(taught.train_df) == 34 and (taught.train_df["label"].to_numpy()[30:] == -1).all()
    onehot = np.eye(len(class_names))[targets]
    np.testing.assert_allclose(taught.soft[:30], 0.7 * expected[:30] + 0.3 * onehot, atol=1e-5)
    np.testing.assert_allclose(taught.soft[30:], expected[30:], atol=1e-5)
    np.testing.assert_allclose(taught.soft.sum(1), 1.0, atol=1e-5)


def test_distillation_settings_are_checked():
    with pytest.raises(ConfigError, match="mode: finetune"):
        load_config(None, mode="linear", teacher=["runs/t"])
    with pytest.raises(ConfigError, match="need a teacher"):
        load_config(None, mode="finetune", extra=["images/"])
    with pytest.raises(ConfigError, match="distill_alpha"):
        load_config(None, mode="finetune", teacher=["runs/t"], distill_alpha=1.5)
    with pytest.raises(ConfigError, match="distill_out_of_fold: .* add teacher"):
        load_config(None, mode="finetune", distill_out_of_fold=True)


def test_without_extra_images_and_with_extras_that_are_held_out_images(tiny_run, small_data, tmp_path):
    from skincancer.data import DataError
    from skincancer.distill import teacher_targets

    train, valid = load_manifest(small_data["train"]), load_manifest(small_data["valid"])
    class_names = json.loads((Path(tiny_run) / "model" / "model.json").read_text())["class_names"]
    targets = train["diagnosis"].map({n: i for i, n in enumerate(class_names)}).to_numpy()
    config = load_config(None, mode="finetune", teacher=[str(tiny_run)])
    alone = teacher_targets(config, class_names, train, targets, tmp_path / "a", valid)
    assert len(alone.train_df) == 30 and alone.record["extra_images"] == 0
    # extra images that are validation or training images (same bytes, other names) teach nothing: left out
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, path in enumerate([*valid["filepath"][:2], *train["filepath"][:1]]):
        shutil.copy(path, copies / f"copy_{i}.jpg")
    held = teacher_targets(config.replace(extra=[str(copies)]), class_names, train, targets, tmp_path / "b", valid)
    assert len(held.train_df) == 30 and held.record["extra_images"] == 0
    with pytest.raises(DataError, match="no such file or folder"):
        teacher_targets(config.replace(extra=[str(tmp_path / "typo")]), class_names, train, targets, tmp_path, valid)


def test_a_teacher_with_another_label_map_is_refused_before_the_run_folder_is_touched(tiny_run, small_data,
                                                                                     tmp_path):
    from skincancer import train
    from skincancer.data import DataError

    out = tmp_path / "student"
    config = load_config(None, mode="finetune", teacher=[str(tiny_run)], train=str(small_data["train"]),
                         valid=str(small_data["valid"]), out=str(out),
                         labels={"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 1})
    with pytest.raises(DataError, match="teacher: classes"):
        train(config)
    assert not out.exists()


def test_out_of_fold_targets_come_from_the_runs_never_fitted_on_each_image(cli, tiny_run, small_data, cache_dir,
                                                                           tmp_path):
    """Two probes fitted on the two halves of the training images: each image's target is the other half's probe;
    an extra image neither saw has their mean; a teacher fitted on every image, or without a record, is refused."""
    from skincancer import save_manifest, train
    from skincancer.checkpoint import FITTED_IMAGES_FILE
    from skincancer.config import config_to_dict
    from skincancer.data import DataError
    from skincancer.distill import TARGETS_FILE, FoldTeachers, _cached, check_teacher, teacher_targets

    train_df = load_manifest(small_data["train"])
    halves = [train_df.iloc[0::2], train_df.iloc[1::2]]
    manifests = [save_manifest(half.reset_index(drop=True), tmp_path / f"half{k}.csv") for k, half in enumerate(halves)]
    runs = []
    for k in (0, 1):  # as benchmarks/cv_search.py's folds: each validated on the half it holds out
        config = load_config(None, train=str(manifests[k]), valid=str(manifests[1 - k]), out=str(tmp_path / f"f{k}"),
                             mode="linear", cache_dir=str(cache_dir), linear_c=[1.0], num_workers=0, **CHEAP_PROBE)
        runs.append(train(config))
    class_names = json.loads((Path(tiny_run) / "model" / "model.json").read_text())["class_names"]
    targets = train_df["diagnosis"].map({n: i for i, n in enumerate(class_names)}).to_numpy()
    extra = load_manifest(small_data["test"])["filepath"][:2].tolist()
    config = load_config(None, mode="finetune", teacher=[str(r) for r in runs], distill_out_of_fold=True,
                         distill_alpha=1.0, extra=extra, num_workers=0)
    # the fold runs validated on disjoint halves are no ensemble (no shared threshold): a resume builds them so too
    assert isinstance(check_teacher(load_config(None, **config_to_dict(config))), FoldTeachers)
    taught = teacher_targets(config, class_names, train_df, targets, tmp_path / "student")
    first, second = (load_model(r).predict_proba([*train_df["filepath"], *extra])[0] for r in runs)
    even = (np.arange(len(train_df)) % 2 == 0)[:, None]  # half 0: fitted by the first probe, held out by the second
    expected = np.concatenate([np.where(even, second[:30], first[:30]), (first[30:] + second[30:]) / 2])
    np.testing.assert_allclose(taught.soft, expected, atol=1e-5)
    assert taught.record["out_of_fold"] is True and len(taught.record["teachers"]) == 2
    # saved for these teachers out of fold: not read back as the same teachers' in-sample targets
    digests = [t["weights_sha256"] for t in taught.record["teachers"]]
    target_file = tmp_path / "student" / TARGETS_FILE
    assert _cached(target_file, taught.keys, [*digests, "out-of-fold"]) is not None
    assert _cached(target_file, taught.keys, digests) is None
    # the card says how the targets were made, and tells the fold runs apart by their paths
    student = load_model(tiny_run)
    student.meta["distilled_from"] = taught.record
    assert "distilled out of fold from the teacher runs f0 (tf_efficientnet_lite0, 1 view) + f1" in \
        markdown_card(student).replace("\n  ", " ")
    with pytest.raises(DataError, match="every teacher run was fitted on 15 of the images, e.g. "):
        teacher_targets(config.replace(teacher=[str(runs[0]), str(tiny_run)], extra=[]), class_names, train_df,
                        targets, tmp_path / "other")
    # through the command line: a run without the record of its images is refused before the student's folder is made
    (Path(runs[1]) / "model" / FITTED_IMAGES_FILE).unlink()
    out = tmp_path / "third"
    result = cli("distill", "--out-of-fold", "--teacher", runs[0], "--teacher", runs[1], "--train",
                 small_data["train"], "--valid", small_data["valid"], "--out", out, "--image-size", "96",
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--num-workers", "0")
    assert result.returncode != 0 and f"{FITTED_IMAGES_FILE}: missing; a run without the record" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_teacher_names_tell_fold_runs_apart(tmp_path):
    from skincancer.card import teacher_names

    folds = {"teachers": [{"run": f"runs/oof/{m}/fold{k}/run"} for k in (0, 1) for m in ("lite0", "linear")]}
    assert teacher_names(folds) == ["lite0/fold0/run", "linear/fold0/run", "lite0/fold1/run", "linear/fold1/run"]
    assert teacher_names({"teachers": [{"run": "runs/b/lite0"}, {"run": "runs/b/linear"}]}) == ["lite0", "linear"]
    # one relative and one absolute path, and the same run twice: still names, never an error
    mixed = {"teachers": [{"run": "runs/a/run"}, {"run": str(tmp_path / "b" / "run")}, {"run": "runs/a/run"}]}
    names = teacher_names(mixed)
    assert names[0].endswith("runs/a/run") and names[1].endswith("b/run") and names[0] == names[2]


def test_fold_runs_of_other_classes_are_refused_by_name(tiny_run, small_data, cache_dir, tmp_path):
    from skincancer import train
    from skincancer.checkpoint import CheckpointError
    from skincancer.distill import FoldTeachers

    config = load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]), out=str(tmp_path / "b"),
                         mode="linear", head="binary", cache_dir=str(cache_dir), linear_c=[1.0], num_workers=0,
                         **CHEAP_PROBE)
    binary = train(config)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(binary))}.*: classes .* differ from .*; the fold runs"):
        FoldTeachers([str(tiny_run), str(binary)])


def test_serve_without_model_serves_the_benchmark_ensemble_else_the_demo(tmp_path: Path, monkeypatch, capsys):
    import typer

    from skincancer.cli.service import default_served

    def finish(run: str, done: bool = True) -> None:  # a run still training keeps a placeholder: passed over
        (tmp_path / run / "model").mkdir(parents=True, exist_ok=True)
        (tmp_path / run / "model" / "model.json").write_text('{"train_seconds": 60}' if done else '{"unfinished": 1}')

    monkeypatch.chdir(tmp_path)
    finish("runs/benchmark/student")  # the distilled student is never the default (less accurate than the probe)
    finish("runs/demo", done=False)
    with pytest.raises(typer.Exit):
        default_served()
    assert "runs/benchmark/lite0, runs/benchmark/lite2, runs/benchmark/linear" in capsys.readouterr().err
    for run in ("runs/demo", "runs/benchmark/lite0", "runs/benchmark/linear"):
        finish(run)
    finish("runs/benchmark/lite2", done=False)  # an ensemble with a member in training: not yet
    assert default_served() == [Path("runs/demo")]
    finish("runs/benchmark/lite2")
    assert default_served() == [Path(f"runs/benchmark/{m}") for m in ("lite0", "lite2", "linear")]
