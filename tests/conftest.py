"""Shared fixtures: small real subsets of ../shared/data/isic2017 and tiny trained runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from skincancer import index_folder, load_config, save_manifest, train
from skincancer.config import DEFAULT_LABELS

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "isic2017").resolve()

if not DATA.is_dir():
    pytest.exit(f"test data not found at {DATA} (see README: the ISIC 2017 copy lives in ../shared/data)", returncode=2)


def subset(split: str, per_class: int, seed: int = 0) -> pd.DataFrame:
    frame = index_folder(DATA / split, DEFAULT_LABELS)
    return frame.groupby("diagnosis").sample(per_class, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
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
                         mode="linear", cache_dir=str(cache_dir), linear_c=[0.1, 1.0], num_workers=0)
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
def guarded_run(cache_dir, tmp_path_factory) -> Path:
    """A linear probe on 150 real images (40 train and 10 valid per class): enough for an out-of-distribution guard
    that tells photographs and screenshots from dermoscopy, as the demo's does (its 45-image sibling tiny_run is
    too small to)."""
    root = tmp_path_factory.mktemp("guarded")
    train_csv = save_manifest(subset("train", 40, seed=1), root / "train.csv")
    valid_csv = save_manifest(subset("valid", 10, seed=1), root / "valid.csv")
    config = load_config(None, train=str(train_csv), valid=str(valid_csv), out=str(root / "run"), mode="linear",
                         pooling="multiscale", feature_views=1, cache_dir=str(cache_dir), linear_c=[0.001],
                         num_workers=0)
    return train(config)
