"""Interrupted training loses nothing: SIGKILL mid-epoch, `train --resume`, same result as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from skincancer.checkpoint import read_weights


def train_args(small_data, out: Path) -> list[str]:
    return ["train", "--train", str(small_data["train"]), "--valid", str(small_data["valid"]), "--out", str(out),
            "--mode", "finetune", "--image-size", "64", "--epochs", "4", "--batch-size", "6",
            "--max-steps-per-epoch", "5", "--num-workers", "0", "--seed", "7"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(cli, small_data, cache_dir, tmp_path):
    cache = {"SKINCANCER_CACHE": str(cache_dir)}
    reference = tmp_path / "reference"
    cli(*train_args(small_data, reference), env=cache, check=True)

    # a real process: SIGKILL is the point
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "skincancer", *train_args(small_data, killed)],
                               env={**os.environ, **cache}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "last.json"
    deadline = time.time() + 300
    while time.time() < deadline and not pointer.is_file():
        time.sleep(0.05)
    assert pointer.is_file(), "no checkpoint was written"
    time.sleep(0.1)  # into epoch 2 (an epoch decodes 30 images, trains 5 steps, validates 15 and saves its state)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads(pointer.read_text())["epoch"] < 4, "the run finished before it could be killed"
    assert not (killed / "valid_metrics.json").exists()

    result = cli("train", "--resume", killed, env=cache)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch" in result.stderr
    env = json.loads((killed / "model" / "model.json").read_text())["environment"]
    assert len(env["resumed"]) == 1 and env["resumed"][0]["at"] >= env["at"]  # the first start's record, kept
    assert "data" not in env["resumed"][0]  # the same images: not repeated

    done, again = pd.read_csv(reference / "summary.csv"), pd.read_csv(killed / "summary.csv")
    assert list(again["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(done.drop(columns="seconds"), again.drop(columns="seconds"), atol=1e-5)
    first = json.loads((reference / "valid_metrics.json").read_text())
    second = json.loads((killed / "valid_metrics.json").read_text())
    assert second["auc"] == pytest.approx(first["auc"], abs=1e-6)
    a, b = read_weights(reference / "model"), read_weights(killed / "model")
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5


def test_resume_refuses_extra_flags_and_non_runs(cli, tmp_path):
    result = cli("train", "--resume", tmp_path, "--epochs", "3")
    assert result.returncode == 2 and "--epochs" in result.stderr
    result = cli("train", "--resume", tmp_path)
    assert result.returncode == 2 and "not a run folder" in result.stderr


@pytest.fixture(scope="module")
def finished_finetune(finetune_run) -> Path:
    """A finished fine-tuning run of two epochs: the session's (the tests copy it before changing anything)."""
    return Path(finetune_run)


def copy_run(run: Path, dest: Path, interrupted: bool = True) -> Path:
    """A copy of a finished run; interrupted=True makes it look killed after its last epoch (model.json marked
    unfinished, as the per-epoch save writes it)."""
    import shutil

    shutil.copytree(run, dest)
    if interrupted:
        card = dest / "model" / "model.json"
        card.write_text(json.dumps({**json.loads(card.read_text()), "unfinished": True}))
    return dest


def test_resume_continues_the_folder_named_not_the_one_in_its_config(finished_finetune, tmp_path):
    from skincancer import train
    from skincancer.resume import resume_config

    before = (finished_finetune / "model" / "model.safetensors").stat().st_mtime_ns
    moved = copy_run(finished_finetune, tmp_path / "moved")
    config = resume_config(moved)
    assert Path(config.out) == moved
    assert train(config, resume=True) == moved
    assert (finished_finetune / "model" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["truncate_state", "garbage_pointer", "no_pointer"])
def test_damaged_checkpoint_is_named_not_a_traceback(finished_finetune, tmp_path, damage):
    from skincancer import train
    from skincancer.checkpoint import CheckpointError
    from skincancer.resume import resume_config

    run = copy_run(finished_finetune, tmp_path / "damaged")
    checkpoints = run / "checkpoints"
    epoch = next(checkpoints.glob("epoch-*"))
    if damage == "truncate_state":
        (epoch / "state.safetensors").write_bytes((epoch / "state.safetensors").read_bytes()[:1000])
    elif damage == "garbage_pointer":
        (checkpoints / "last.json").write_text("[]")
    else:
        (checkpoints / "last.json").unlink()
    with pytest.raises(CheckpointError, match="damaged|missing") as caught:
        train(resume_config(run), resume=True)
    assert str(checkpoints) in str(caught.value)


def test_resume_refuses_changed_data_and_overwrite_checks_inputs_first(finished_finetune, small_data, tmp_path):
    from skincancer import train
    from skincancer.data import DataError
    from skincancer.resume import resume_config

    run = copy_run(finished_finetune, tmp_path / "changed")
    fewer = tmp_path / "fewer.csv"
    frame = pd.read_csv(small_data["train"])
    frame["filepath"] = [str(Path(small_data["train"]).parent / f) for f in frame["filepath"]]
    frame.iloc[::2].to_csv(fewer, index=False)
    with pytest.raises(DataError, match="changed since this run started"):
        train(resume_config(run).replace(train=str(fewer)), resume=True)

    weights = (run / "model" / "model.safetensors").read_bytes()
    config = (run / "config.yaml").read_text()
    with pytest.raises(DataError, match="nonexistent"):
        train(resume_config(run).replace(train=str(tmp_path / "nonexistent.csv")), overwrite=True)
    assert (run / "model" / "model.safetensors").read_bytes() == weights  # the old run is still whole
    assert (run / "config.yaml").read_text() == config


def test_resuming_a_finished_run_changes_nothing(finished_finetune, tmp_path):
    from skincancer import train
    from skincancer.resume import resume_config

    run = copy_run(finished_finetune, tmp_path / "done", interrupted=False)
    card = (run / "model" / "model.json").read_bytes()
    assert train(resume_config(run), resume=True) == run
    assert (run / "model" / "model.json").read_bytes() == card


def test_resume_refuses_another_number_of_processes(cli, finished_finetune, tmp_path):
    """A run resumed with another process count would change its global batch and its schedule midway."""
    from skincancer import train
    from skincancer.data import DataError
    from skincancer.resume import resume_config

    run = copy_run(finished_finetune, tmp_path / "one")
    result = cli("train", "--resume", run, "--nproc", "2")
    assert result.returncode != 0
    assert "trained with 1 process, not 2" in result.stderr and "without --nproc" in result.stderr
    assert "launching" not in result.stderr and "Traceback" not in result.stderr  # refused before torchrun

    # a run whose checkpoint says two processes, resumed in one (the Python API, or torchrun started by hand)
    run = copy_run(finished_finetune, tmp_path / "two")
    pointer = json.loads((run / "checkpoints" / "last.json").read_text())
    state = run / "checkpoints" / pointer["path"] / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "processes": 2}))
    weights = (run / "model" / "model.safetensors").read_bytes()
    with pytest.raises(DataError, match=r"trained with 2 processes, not 1; resume it with --nproc 2"):
        train(resume_config(run), resume=True)
    assert (run / "model" / "model.safetensors").read_bytes() == weights
