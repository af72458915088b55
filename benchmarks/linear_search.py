"""Cross-validated search over linear-probe options on train+valid features (never the test split).

Features come from the same on-disk cache `skincancer train --mode linear` uses (computed on first use). For each
feature set (backbone, image size, pooling) and each head option (3-class or binary, class weights, C), repeated
stratified K-fold CV over the union of train and valid gives the pooled out-of-fold melanoma-vs-rest AUC (mean over
repeats). The head is trained on each image and its mirror, as `train` does. One JSON line per option.

    python benchmarks/linear_search.py --train runs/data/train.csv --valid runs/data/valid.csv \
        --features tf_efficientnet_lite0:224:multiscale tf_efficientnet_lite0:224:final --out runs/linear_search.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from skincancer import load_config, load_manifest
from skincancer.backbones import build_model, preprocessing
from skincancer.data import content_keys
from skincancer.features import cached_features

CLASSES = ["melanoma", "nevus", "seborrheic_keratosis"]


def features(spec: str, data: pd.DataFrame, cache_dir: str) -> np.ndarray:
    """[2 views, N, D] features for 'backbone:size:pooling' (identity and mirror)."""
    backbone, size, pooling = spec.split(":")
    config = load_config(None, backbone=backbone, image_size=int(size), pooling=pooling, cache_dir=cache_dir)
    model = build_model(backbone, 3, pooling=pooling).eval()
    prep = preprocessing(model)
    keys = content_keys(data["filepath"])
    views = []
    for view in (0, 1):
        x, ok = cached_features(model, data["filepath"], config, prep, view, spec, keys)
        if not ok.all():
            raise SystemExit(f"{spec}: {int((~ok).sum())} unreadable images")
        views.append(x)
    return np.stack(views)


def cv_auc(x: np.ndarray, diagnosis: np.ndarray, head: str, c: float, weight: str | None, folds: int,
           repeats: int) -> float:
    melanoma = (diagnosis == 0).astype(int)
    y = diagnosis if head == "diagnosis" else melanoma
    aucs = []
    for repeat in range(repeats):
        oof = np.zeros(len(y))
        for kept, held in StratifiedKFold(folds, shuffle=True, random_state=repeat).split(y, diagnosis):
            mean, std = x[0, kept].mean(0), x[0, kept].std(0) + 1e-6
            train_x = ((x[:, kept] - mean) / std).reshape(-1, x.shape[-1])
            clf = LogisticRegression(C=c, class_weight=weight, max_iter=3000)
            clf.fit(train_x, np.tile(y[kept], len(x)))
            probs = clf.predict_proba((x[0, held] - mean) / std)
            oof[held] = probs[:, 0] if head == "diagnosis" else probs[:, 1]
        aucs.append(roc_auc_score(melanoma, oof))
    return float(np.mean(aucs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--features", nargs="+", default=["tf_efficientnet_lite0:224:multiscale"],
                        help="backbone:image_size:pooling; several joined by '+' are concatenated")
    parser.add_argument("--heads", nargs="+", default=["diagnosis", "binary"])
    parser.add_argument("--c", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--weights", nargs="+", default=["balanced", "none"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--out", default="runs/linear_search.jsonl")
    args = parser.parse_args()

    data = pd.concat([load_manifest(args.train), load_manifest(args.valid)], ignore_index=True)
    diagnosis = data["diagnosis"].map({name: i for i, name in enumerate(CLASSES)}).to_numpy()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as log:
        for spec in args.features:
            x = np.concatenate([features(part, data, args.cache_dir) for part in spec.split("+")], axis=-1)
            for head, weight, c in itertools.product(args.heads, args.weights, args.c):
                tic = time.time()
                auc = cv_auc(x, diagnosis, head, c, None if weight == "none" else weight, args.folds, args.repeats)
                row = {"features": spec, "head": head, "class_weight": weight, "C": c, "cv_auc": round(auc, 4),
                       "n": len(data), "folds": args.folds, "repeats": args.repeats,
                       "seconds": round(time.time() - tic, 1)}
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
