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


def test_two_process_gloo_training(small_data, cache_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "SKINCANCER_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "skincancer", "train", "--nproc", "2", "--train", str(small_data["train"]),
         "--valid", str(small_data["valid"]), "--out", str(out), "--mode", "finetune", "--image-size", "64",
         "--epochs", "2", "--batch-size", "4", "--max-steps-per-epoch", "3", "--num-workers", "0",
         "--threshold-policy", "youden"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["epoch"]) == [1, 2]
    meta = json.loads((out / "model" / "model.json").read_text())
    logged = summary.loc[summary["epoch"] == meta["epoch"], "valid_auc"].item()

    valid = pd.read_csv(small_data["valid"])
    paths = [str((Path(small_data["valid"]).parent / p).resolve()) for p in valid["filepath"]]
    table = load_model(out, engine="torch").predict(paths)
    assert table["error"].eq("").all()
    assert roc_auc(valid["label"], table["malignant"]) == pytest.approx(logged, abs=1e-5)


def test_two_process_training_on_unreadable_data_ends_in_one_clear_error(small_data, data_dir, tmp_path):
    import shutil

    from skincancer import index_folder, save_manifest
    from skincancer.config import DEFAULT_LABELS

    root = tmp_path / "train"
    for diagnosis in DEFAULT_LABELS:
        (root / diagnosis).mkdir(parents=True)
        for src in sorted((data_dir / "train" / diagnosis).glob("*.jpg"))[:2]:
            shutil.copy(src, root / diagnosis / src.name)
    manifest = save_manifest(index_folder(root, DEFAULT_LABELS), tmp_path / "train.csv")
    for path in sorted(root.rglob("*.jpg")):
        path.write_text("<html>gone</html>")  # every training image unreadable (after indexing)
    result = subprocess.run(
        [sys.executable, "-m", "skincancer", "train", "--nproc", "2", "--train", str(manifest),
         "--valid", str(small_data["valid"]), "--out", str(tmp_path / "ddp"), "--mode", "finetune",
         "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "1",
         "--num-workers", "0"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {manifest}: none of the 6 train images can be read" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
