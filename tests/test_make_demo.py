"""The README's main job, `make demo`, run as written on a small copy of the ISIC 2017 layout.

A session once broke `make demo` on fresh clones (train refused the folder the Makefile indexed into) and no test
noticed: the tests called the package, never the Makefile. This runs the real target, with DATA pointing at a tree
of the same shape (folder-per-class splits, the official metadata and test ground-truth CSVs) holding a few images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA, subset

REPO = Path(__file__).resolve().parents[1]


def small_isic_tree(root: Path) -> Path:
    """DATA's layout with 6 train, 4 valid and 3 test images per class (links to the real files)."""
    for split, per_class in (("train", 6), ("valid", 4), ("test", 3)):
        frame = subset(split, per_class)
        for path, diagnosis in zip(frame["filepath"], frame["diagnosis"], strict=True):
            target = root / split / diagnosis / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(path).resolve())
    for name in ("ISIC-2017_Training_Data_metadata.csv", "ISIC-2017_Validation_Data_metadata.csv"):
        shutil.copy(DATA / name, root / name)
    truth = pd.read_csv(DATA / "ISIC-2017_Test_v2_Part3_GroundTruth.csv", dtype=str)
    kept = {p.stem for p in (root / "test").rglob("*.jpg")}
    truth[truth["image_id"].isin(kept)].to_csv(root / "ISIC-2017_Test_v2_Part3_GroundTruth.csv", index=False)
    return root


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_end_to_end_on_a_fresh_run_folder(data_dir, tmp_path):
    data = small_isic_tree(tmp_path / "isic2017")
    run = tmp_path / "runs" / "demo"
    env = {**os.environ, "SKINCANCER_CACHE": str(tmp_path / "cache")}
    # -o setup: the environment running this test is the one to use (BIN), so nothing is installed
    command = ["make", "-C", str(REPO), "-o", "setup", "demo", f"DATA={data}", f"RUN={run}",
               f"BIN={Path(sys.executable).parent}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["n"] == 9
    assert 0.0 <= metrics["auc"] <= 1.0
    assert (run / "model").is_dir() and (run / "test" / "report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "demo-data").iterdir()) == ["test.csv", "train.csv",
                                                                                   "valid.csv"]
    # the run reads the age/sex columns the Makefile joins in
    assert {"age_approximate", "sex"} <= set(pd.read_csv(tmp_path / "runs" / "demo-data" / "train.csv").columns)

    # a second `make demo` (the README's command run again) replaces the run rather than refusing it
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
