"""DDP: a 2-process gloo run on CPU writes one run folder whose model predicts in a single process, and the
validation AUC it logged (gathered over both ranks' shards) equals the AUC of the saved model's predictions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skincancer import load_model
from skincancer.distributed import ShardedSampler, World
from skincancer.metrics import roc_auc


def test_sharded_sampler_splits_one_epoch_without_overlap():
    ranks = [list(ShardedSampler(10, World(r, 2), seed=3)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    single = list(ShardedSampler(10, World(), seed=3))
    assert sorted(single) == list(range(10)) and single[::2] == ranks[0]
    weighted = ShardedSampler(1000, World(), seed=0, weights=np.r_[np.full(900, 1.0), np.full(100, 9.0)])
    assert 0.4 < np.mean(np.array(list(weighted)) >= 900) < 0.6  # classes drawn about equally


def test_source_draws_set_the_epoch_length_and_cycle_through_a_down_weighted_source():
    draws = np.r_[np.ones(100), np.full(401, 0.25)]  # a source weighted 1, and one weighted 0.25 (sum not whole)
    sampler = ShardedSampler(501, World(), seed=1, draws=draws)
    seen = []
    for epoch in (1, 2, 3, 4):
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))
        assert len(order) == len(sampler) == 200
        assert sorted(order[order < 100]) == list(range(100))  # weight 1: every image once, every epoch
        assert len(order[order >= 100]) == 100  # weight 0.25: a quarter of them
        seen.append(set(order[order >= 100]))
    assert len(seen[0] & seen[1]) == 0 and len(set().union(*seen)) == 400  # the next quarter of one shuffle
    sampler.set_epoch(5)
    assert len(set().union(*seen, set(np.array(list(sampler))[np.array(list(sampler)) >= 100]))) == 401
    twice = ShardedSampler(4, World(), seed=0, draws=np.full(4, 2.5))
    twice.set_epoch(1)
    assert sorted(np.bincount(list(twice))) == [2, 2, 3, 3]  # above 1: whole passes, then the fraction
    odd = np.r_[np.ones(3), np.full(8, 0.25)]  # 5 an epoch, over 2 ranks: padded to 3 each
    ranks = [list(ShardedSampler(11, World(r, 2), seed=1, draws=odd)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and set(ranks[0] + ranks[1]) == set(
        ShardedSampler(11, World(), seed=1, draws=odd))
    balanced = ShardedSampler(501, World(), seed=0, draws=draws, weights=np.ones(501))
    assert len(list(balanced)) == 200 and 0.35 < np.mean(np.array(list(balanced)) < 100) < 0.65


@pytest.mark.slow
def test_two_process_gloo_training(cli, small_data, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    # keep: last, so the saved model is the final epoch's; whole epochs, so BatchNorm statistics drift per rank
    config = tmp_path / "ddp.yaml"
    config.write_text("mode: finetune\nimage_size: 64\nepochs: 2\nbatch_size: 4\nnum_workers: 0\nkeep: last\n"
                      "patience: 0\n")
    # the command in this process; it starts torchrun, whose two workers are real processes (stderr a pipe)
    result = cli("train", "--nproc", "2", "--config", config, "--train", small_data["train"], "--valid",
                 small_data["valid"], "--out", out, "--threshold-policy", "youden",
                 env={"SKINCANCER_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run" in result.stderr
    # a worker's stderr is a pipe: its progress comes as timed lines (the log format), not a redrawn bar
    assert "epoch 1: 0/4 [" in result.stderr and "epoch 1: 4/4 [" in result.stderr and "%|" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.yaml"]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["epoch"]) == [1, 2]
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["epoch"] == 2
    logged = summary.iloc[-1]

    # Each rank validated half the images; together they must have validated the model rank 0 saved (before,
    # each rank's BatchNorm running statistics were its own: the logged AUC was 0.43 where the model gave 0.49)
    valid = pd.read_csv(small_data["valid"])
    paths = [str((Path(small_data["valid"]).parent / p).resolve()) for p in valid["filepath"]]
    table = load_model(out, engine="torch").predict(paths)
    assert table["error"].eq("").all()
    assert roc_auc(valid["label"], table["malignant"]) == pytest.approx(logged["valid_auc"], abs=1e-5)
    classes = ["melanoma", "nevus", "seborrheic_keratosis"]
    truth = valid["diagnosis"].map(classes.index).to_numpy()
    nll = -np.log(table[classes].to_numpy()[np.arange(len(truth)), truth]).mean()
    assert nll == pytest.approx(logged["valid_loss"], abs=1e-4)


@pytest.mark.slow
def test_two_process_training_on_unreadable_data_ends_in_one_clear_error(cli, small_data, data_dir, tmp_path):
    import shutil

    from skincancer import index_folder, save_manifest
    from skincancer.config import ISIC2017_LABELS

    root = tmp_path / "train"
    for diagnosis in ISIC2017_LABELS:
        (root / diagnosis).mkdir(parents=True)
        for src in sorted((data_dir / "train" / diagnosis).glob("*.jpg"))[:2]:
            shutil.copy(src, root / diagnosis / src.name)
    manifest = save_manifest(index_folder(root, ISIC2017_LABELS), tmp_path / "train.csv")
    for path in sorted(root.rglob("*.jpg")):
        path.write_text("<html>gone</html>")  # every training image unreadable (after indexing)
    result = cli("train", "--nproc", "2", "--train", manifest, "--valid", small_data["valid"], "--out",
                 tmp_path / "ddp", "--mode", "finetune", "--image-size", "64", "--epochs", "1", "--batch-size", "4",
                 "--max-steps-per-epoch", "1", "--num-workers", "0", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {manifest}: none of the 6 train images can be read" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]


WORKER = '''
import datetime, json, sys
import torch, torch.distributed as dist
from torch import nn
from skincancer.engine import train_one_epoch

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
generator = torch.Generator().manual_seed(rank)

def batch(bad):
    if bad:  # every file of this batch turned unreadable mid-run, on this rank only
        return {"image": None, "target": None, "index": torch.empty(0), "errors": [(0, "truncated")]}
    return {"image": torch.randn(3, 4, generator=generator), "target": torch.tensor([0, 1, 0]),
            "index": torch.arange(3), "errors": []}

loader = [batch(rank == 1 and step == 1) for step in range(4)]
loss, errors = train_one_epoch(model, loader, optimizer, scheduler, nn.CrossEntropyLoss(), epoch=1)
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(weights) for _ in range(2)]
dist.all_gather(gathered, weights)
json.dump({"steps": scheduler.last_epoch, "errors": len(errors), "same": bool(torch.equal(*gathered))},
          open(sys.argv[1] + f".{rank}", "w"))
del model, optimizer  # a DDP model still alive at destroy_process_group aborts the process (gloo)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_a_bad_batch_on_one_rank_does_not_desynchronise_ddp(tmp_path):
    """A batch whose files all fail on one rank only: every rank skips that step (before, the other rank's gradient
    all-reduce paired with the next step's and the run hung)."""
    # real processes: torchrun and its two ranks are the point
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [3, 3]  # 4 batches, the bad one skipped on both ranks
    assert [r["errors"] for r in ranks] == [0, 1]
    assert all(r["same"] for r in ranks)  # both ranks hold the same weights


def test_nproc_checks_the_config_and_data_paths_before_torchrun_starts(cli, small_data, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("mode: finetune\nbogus_key: 1\n")
    base = ["train", "--nproc", "2", "--out", str(tmp_path / "run")]
    result = cli(*base, "--config", config, "--train", small_data["train"], "--valid", small_data["valid"])
    assert result.returncode == 2 and f"unknown config key(s) in {config}: bogus_key" in result.stderr
    assert "launching" not in result.stderr
    result = cli(*base, "--train", tmp_path / "nope.csv", "--valid", small_data["valid"])
    assert result.returncode == 2 and f"{tmp_path / 'nope.csv'}: no such file or folder" in result.stderr
    assert "launching" not in result.stderr and not (tmp_path / "run").exists()
    result = cli(*base, "--valid", small_data["valid"])
    assert result.returncode == 2 and "train, valid and out are all required" in result.stderr
    assert "launching" not in result.stderr
    taken = tmp_path / "taken"  # a folder holding an interrupted run, without --overwrite
    (taken / "checkpoints" / "epoch-1").mkdir(parents=True)
    (taken / "train.log").write_text("")
    result = cli(*base[:-1], taken, "--train", small_data["train"], "--valid", small_data["valid"])
    assert result.returncode == 2 and f"{taken}: already holds an interrupted run" in result.stderr
    assert "launching" not in result.stderr


def test_a_stopped_multi_process_run_says_how_to_go_on(tmp_path):
    """--resume only where the folder holds a checkpoint of this very run; otherwise the command again."""
    import yaml

    from skincancer import load_config
    from skincancer.config import config_to_dict
    from skincancer.launch import how_to_go_on

    out = tmp_path / "run"
    config = load_config(None, train="t.csv", valid="v.csv", out=str(out), mode="finetune")
    again = "nothing was kept to resume: run the command again"
    assert how_to_go_on(config, 2, resume=False, overwrite=False) == again
    (out / "checkpoints" / "epoch-1").mkdir(parents=True)
    (out / "train.log").write_text("")
    (out / "checkpoints" / "last.json").write_text('{"path": "epoch-1"}')
    (out / "checkpoints" / "epoch-1" / "state.json").write_text('{"epoch": 1, "processes": 2}')
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    assert how_to_go_on(config, 2, resume=False, overwrite=False).startswith(
        f"`skincancer train --resume {out} --nproc 2` continues it")
    # an --overwrite start stopped before it cleared the old run: the checkpoint there is the old run's
    other = load_config(None, train="t.csv", valid="v.csv", out=str(out), mode="finetune", epochs=3)
    assert how_to_go_on(other, 2, resume=False, overwrite=True) == again
    (out / "checkpoints" / "last.json").unlink()  # stopped before its first epoch
    assert how_to_go_on(config, 2, resume=False, overwrite=False).endswith(
        f"run the command again with --overwrite (it replaces what it had written in {out})")


@pytest.mark.slow
def test_sigterm_to_nproc_stops_torchrun_and_its_workers(small_data, cache_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "SKINCANCER_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    # a real process: the SIGTERM goes to the command itself, which must stop torchrun and its workers
    process = subprocess.Popen(
        [sys.executable, "-m", "skincancer", "train", "--nproc", "2", "--train", str(small_data["train"]),
         "--valid", str(small_data["valid"]), "--out", str(out), "--mode", "finetune", "--image-size", "64",
         "--epochs", "50", "--batch-size", "4", "--num-workers", "0"],
        stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "last.json").is_file():  # an epoch is kept
        time.sleep(0.1)
    assert (out / "checkpoints" / "last.json").is_file(), "no epoch was completed"
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 2
    assert (f"error: training stopped by SIGTERM; `skincancer train --resume {out} --nproc 2` continues it from its "
            "last complete epoch") in stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], "torchrun or a worker outlived the command"
