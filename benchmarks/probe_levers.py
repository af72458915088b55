"""More linear-probe levers, cross-validated on train+valid (never test): colour constancy, more dihedral views,
other heads. Same protocol as linear_search.py (Lite0 224 multiscale features, 3-class head, standardisation per
fold, pooled out-of-fold melanoma AUC, mean of 2 repeats of 5 folds). One JSON line per option.

    python benchmarks/probe_levers.py --train runs/benchmark/data/train.csv --valid runs/benchmark/data/valid.csv

Features of the plain images come from the cache `skincancer train --mode linear` uses; colour-constancy features
are computed here (about 3 minutes on 2 cores) and kept in --work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from linear_search import CLASSES, features
from PIL import Image
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from skincancer import load_config, load_manifest
from skincancer.backbones import build_model, preprocessing
from skincancer.data import content_keys, load_image
from skincancer.datasets import build_transform
from skincancer.engines import DIHEDRAL
from skincancer.features import cached_features

SPEC = "tf_efficientnet_lite0:224:multiscale"


def shades_of_gray(image: Image.Image, p: int = 6) -> Image.Image:
    """Shades-of-gray colour constancy (Finlayson & Trezzi 2004), as ISIC 2018-2019 entries used it: each channel
    scaled so that the image's Minkowski p-norm illuminant becomes grey."""
    a = np.asarray(image, dtype=np.float32)
    illuminant = np.power(np.mean(np.power(a, p), axis=(0, 1)), 1 / p)
    illuminant /= np.sqrt((illuminant ** 2).sum())
    return Image.fromarray(np.clip(a / (illuminant * np.sqrt(3)), 0, 255).astype(np.uint8))


def colour_constant_features(data: pd.DataFrame, work: Path) -> np.ndarray:
    path = work / "colour_constancy_lite0_224_multiscale.npy"
    if path.is_file():
        return np.load(path)
    model = build_model("tf_efficientnet_lite0", 3, pooling="multiscale").eval()
    prep = preprocessing(model)
    transform = build_transform(224, prep["mean"], prep["std"])
    views = []
    for view in (0, 1):
        rows = []
        for start in range(0, len(data), 64):
            batch = torch.stack([transform(shades_of_gray(load_image(p)))
                                 for p in data["filepath"].iloc[start:start + 64]])
            with torch.no_grad():
                rows.append(model.forward_features(DIHEDRAL[view](batch)).numpy())
        views.append(np.concatenate(rows))
    x = np.stack(views)
    work.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    return x


def all_views(data: pd.DataFrame, cache_dir: str) -> np.ndarray:
    """[8, N, D]: features of the 8 dihedral views (the cache `train` fills holds views 0 and 1 already)."""
    config = load_config(None, backbone="tf_efficientnet_lite0", image_size=224, pooling="multiscale",
                         cache_dir=cache_dir)
    model = build_model("tf_efficientnet_lite0", 3, pooling="multiscale").eval()
    prep, keys = preprocessing(model), content_keys(data["filepath"])
    return np.stack([cached_features(model, data["filepath"], config, prep, v, SPEC, keys)[0] for v in range(8)])


def cv_auc(x: np.ndarray, diagnosis: np.ndarray, make, score, train_views: int = 2, test_views: int = 1,
           repeats: int = 2) -> float:
    melanoma = (diagnosis == 0).astype(int)
    aucs = []
    for repeat in range(repeats):
        oof = np.zeros(len(diagnosis))
        for kept, held in StratifiedKFold(5, shuffle=True, random_state=repeat).split(diagnosis, diagnosis):
            mean, std = x[0, kept].mean(0), x[0, kept].std(0) + 1e-6
            clf = make().fit(((x[:train_views, kept] - mean) / std).reshape(-1, x.shape[-1]),
                             np.tile(diagnosis[kept], train_views))
            oof[held] = np.mean([score(clf, (x[v, held] - mean) / std) for v in range(test_views)], axis=0)
        aucs.append(roc_auc_score(melanoma, oof))
    return round(float(np.mean(aucs)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--levers", nargs="+", default=["colour", "views", "heads"])
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--work", default="runs/probe_levers")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = pd.concat([load_manifest(args.train), load_manifest(args.valid)], ignore_index=True)
    diagnosis = data["diagnosis"].map({name: i for i, name in enumerate(CLASSES)}).to_numpy()
    logistic = lambda c: (lambda: LogisticRegression(C=c, max_iter=3000))  # noqa: E731
    proba = lambda clf, z: clf.predict_proba(z)[:, 0]  # noqa: E731
    margin = lambda clf, z: clf.decision_function(z)[:, 0]  # noqa: E731

    def emit(lever: str, option: str, auc: float) -> None:
        print(json.dumps({"lever": lever, "option": option, "melanoma_auc": auc}), flush=True)

    plain = features(SPEC, data, args.cache_dir)
    emit("baseline", "plain images, logistic C=1e-3, train on 2 views, score 1", cv_auc(plain, diagnosis,
                                                                                         logistic(1e-3), proba))
    if "colour" in args.levers:
        constant = colour_constant_features(data, Path(args.work))
        for c in (3e-4, 1e-3, 3e-3):
            emit("colour", f"shades of gray p=6, logistic C={c:g}", cv_auc(constant, diagnosis, logistic(c), proba))
        emit("colour", "plain + shades of gray concatenated, logistic C=3e-4",
             cv_auc(np.concatenate([plain, constant], -1), diagnosis, logistic(3e-4), proba))
    if "views" in args.levers:
        eight = all_views(data, args.cache_dir)
        for train_views, test_views in ((2, 8), (8, 1), (8, 8)):
            emit("views", f"train on {train_views} dihedral views, score the mean of {test_views}",
                 cv_auc(eight, diagnosis, logistic(1e-3), proba, train_views, test_views))
    if "heads" in args.levers:
        emit("heads", "LDA, automatic shrinkage",
             cv_auc(plain, diagnosis, lambda: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"), proba))
        for c in (0.3, 1.0, 3.0):
            emit("heads", f"RBF SVM C={c:g}", cv_auc(plain, diagnosis, lambda c=c: SVC(C=c), margin))


if __name__ == "__main__":
    main()
