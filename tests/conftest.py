"""Shared fixtures: small real subsets of ../shared/data/isic2017 and tiny trained runs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from skincancer import index_folder, load_config, save_manifest, train
from skincancer.config import DEFAULT_LABELS

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers (pytest-xdist) on this 2-core machine: one thread each, here and in the
    # processes the tests start (5 min 34 s; one process with torch's two threads, 8 min 20 s; two workers with two
    # threads each ran slower than one process).
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "isic2017").resolve()
NO_DATA = f"test data not found at {DATA} (see README: the ISIC 2017 copy lives in ../shared/data)"

# Python's own warning filters in a fresh process (no -W, no PYTHONWARNINGS): what a user of the command sees
PROCESS_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                           ("ignore", ResourceWarning, "")]


class CliResult(subprocess.CompletedProcess):
    """What `subprocess.run(..., capture_output=True, text=True)` returns, and `output`: both streams (stdout, then
    stderr) for a message that may be on either."""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args, check: bool = False, env: Mapping[str, str | None] | None = None,
            cwd: Path | None = None) -> CliResult:
    """`skincancer ARGS...` in this process, through skincancer.cli.main (its "error: ..." lines and exit codes),
    without paying a second start of torch: the exit code, stdout and stderr as `subprocess.run` gives them.

    What main() sets up as a fresh process would have it, and is put back afterwards: logging (main's basicConfig
    on stderr; pytest's handlers on the root logger would make it a no-op), Python's default warning filters with
    warnings printed on stderr (pytest's would record them instead), sys.argv (train logs its command line; --nproc
    re-runs it under torchrun), the signal handlers --nproc installs, the excepthook typer installs, the current
    folder. An exception main() lets through is printed as the interpreter would (traceback, exit code 1).
    `env`: variables to set (None: unset) for the call. C-level writes to file descriptors 1 and 2 are not
    captured: a test about them needs a real process."""
    argv = ["skincancer", *map(str, args)]
    root = logging.getLogger()
    saved_logging = root.handlers[:], root.level
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    saved_argv, saved_hook, saved_cwd = sys.argv, sys.excepthook, os.getcwd()
    code = 0
    try:
        root.handlers = []
        with CliRunner().isolation(env=env) as (stdout, stderr, _), warnings.catch_warnings():
            sys.argv = argv
            if cwd is not None:
                os.chdir(cwd)
            warnings.resetwarnings()
            for action, category, module in reversed(PROCESS_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            from skincancer.cli import main

            try:
                main()
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                if exit.code is not None and not isinstance(exit.code, int):
                    sys.stderr.write(f"{exit.code}\n")
            except Exception:
                traceback.print_exc()  # to the captured stderr
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    finally:
        for handler in root.handlers:
            if handler not in saved_logging[0]:
                handler.close()
        root.handlers, root.level = saved_logging[0], saved_logging[1]
        for number, handler in saved_signals.items():
            signal.signal(number, handler)
        sys.argv, sys.excepthook = saved_argv, saved_hook
        os.chdir(saved_cwd)
    result = CliResult(argv, code, out, err)
    if check and code != 0:
        raise AssertionError(f"{' '.join(argv)} failed with exit code {code}:\n{out}\n{err}")
    return result


@pytest.fixture(scope="session")
def cli():
    """run_cli: the command line in this process (see there)."""
    return run_cli


def subset(split: str, per_class: int, seed: int = 0) -> pd.DataFrame:
    frame = index_folder(DATA / split, DEFAULT_LABELS)
    return frame.groupby("diagnosis").sample(per_class, random_state=seed).reset_index(drop=True)


# The probe as the tests train it unless they test the recipe: last-layer features, C chosen on train and the
# threshold on valid, class-weighted. The defaults (the demo's recipe: multiscale features, fitted on train+valid,
# unweighted) took 108 s against 33 s for tiny_run's 45 images on the 2-core test machine (cached features).
CHEAP_PROBE = {"pooling": "final", "linear_fit": "train", "class_balance": "weighted_loss"}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The ISIC 2017 copy; the tests that need it are skipped where there is none."""
    if not DATA.is_dir():
        pytest.skip(NO_DATA)
    return DATA


@pytest.fixture(scope="session")
def small_data(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Manifests of a small real subset: 10 train and 5 valid images per class, 6 test images per class."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": save_manifest(subset("train", 10), root / "train.csv"),
        "valid": save_manifest(subset("valid", 5), root / "valid.csv"),
        "test": save_manifest(subset("test", 6), root / "test.csv"),
    }


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_run(small_data, cache_dir, tmp_path_factory) -> Path:
    """A linear-probe run on the small subset (frozen ImageNet Lite0, 224 px)."""
    out = tmp_path_factory.mktemp("runs") / "linear"
    config = load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]), out=str(out),
                         mode="linear", cache_dir=str(cache_dir), linear_c=[0.1, 1.0], num_workers=0, **CHEAP_PROBE)
    return train(config)


@pytest.fixture(scope="session")
def finetune_run(small_data, cache_dir, tmp_path_factory) -> Path:
    """A fine-tuning run of two epochs of two steps each at 96 px: enough to exercise the whole loop."""
    out = tmp_path_factory.mktemp("runs") / "finetune"
    config = load_config(None, train=str(small_data["train"]), valid=str(small_data["valid"]), out=str(out),
                         mode="finetune", image_size=96, epochs=2, max_steps_per_epoch=2, batch_size=8,
                         num_workers=0, cache_dir=str(cache_dir))
    return train(config)


@pytest.fixture(scope="session")
def guarded_run(data_dir, cache_dir, tmp_path_factory) -> Path:
    """A linear probe on 150 real images (40 train and 10 valid per class): enough for an out-of-distribution guard
    that tells photographs and screenshots from dermoscopy, as the demo's does (its 45-image sibling tiny_run is
    too small to)."""
    root = tmp_path_factory.mktemp("guarded")
    train_csv = save_manifest(subset("train", 40, seed=1), root / "train.csv")
    valid_csv = save_manifest(subset("valid", 10, seed=1), root / "valid.csv")
    config = load_config(None, train=str(train_csv), valid=str(valid_csv), out=str(root / "run"), mode="linear",
                         pooling="multiscale", feature_views=1, cache_dir=str(cache_dir), linear_c=[0.001],
                         num_workers=0, linear_fit="train", class_balance="weighted_loss")
    return train(config)
