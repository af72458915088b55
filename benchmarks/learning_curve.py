"""How the linear probe's cross-validated melanoma AUC grows with the number of training images (never test).

Repeated stratified 5-fold CV over train+valid, as benchmarks/linear_search.py; in each fold the head is fitted on a
stratified fraction of the kept images (the held-out fold stays whole), with the shipped probe's features
(Lite0 224 multiscale, image and mirror) and head (3-class, no class weights, C=1e-3). One JSON line per fraction:
the pooled out-of-fold AUC (mean over repeats) and the mean number of training images it was fitted on.

    python benchmarks/learning_curve.py --train runs/benchmark/data/train.csv --valid runs/benchmark/data/valid.csv
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
from linear_search import CLASSES, features
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from skincancer import load_manifest


def curve_point(x: np.ndarray, diagnosis: np.ndarray, fraction: float, c: float, folds: int,
                repeats: int) -> tuple[float, float]:
    melanoma = (diagnosis == 0).astype(int)
    aucs, sizes = [], []
    for repeat in range(repeats):
        oof = np.zeros(len(diagnosis))
        for kept, held in StratifiedKFold(folds, shuffle=True, random_state=repeat).split(diagnosis, diagnosis):
            if fraction < 1:
                kept, _ = train_test_split(kept, train_size=fraction, stratify=diagnosis[kept], random_state=repeat)
            sizes.append(len(kept))
            mean, std = x[0, kept].mean(0), x[0, kept].std(0)
            std = np.maximum(std, 0.1 * np.median(std))  # the spread floor `train` uses
            clf = LogisticRegression(C=c, max_iter=3000)
            clf.fit(((x[:, kept] - mean) / std).reshape(-1, x.shape[-1]), np.tile(diagnosis[kept], len(x)))
            oof[held] = clf.predict_proba((x[0, held] - mean) / std)[:, 0]
        aucs.append(roc_auc_score(melanoma, oof))
    return float(np.mean(aucs)), float(np.mean(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--features", default="tf_efficientnet_lite0:224:multiscale")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.125, 0.25, 0.5, 1.0])
    parser.add_argument("--c", type=float, default=1e-3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()

    data = pd.concat([load_manifest(args.train), load_manifest(args.valid)], ignore_index=True)
    diagnosis = data["diagnosis"].map({name: i for i, name in enumerate(CLASSES)}).to_numpy()
    x = features(args.features, data, args.cache_dir)
    for fraction in args.fractions:
        tic = time.time()
        auc, size = curve_point(x, diagnosis, fraction, args.c, args.folds, args.repeats)
        print(json.dumps({"fraction": fraction, "train_images": round(size), "cv_auc": round(auc, 4), "C": args.c,
                          "seconds": round(time.time() - tic, 1)}), flush=True)


if __name__ == "__main__":
    main()
