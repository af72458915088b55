"""Which ensemble? Score every subset of models by their pooled out-of-fold predictions on train+valid (never test).

Reads the out-of-fold predictions that benchmarks/cv_search.py writes (<recipe>_oof.npy with oof_index.csv) and,
optionally, the `valid_predictions.csv` of linear runs fitted with `linear_fit: train+valid` (their out-of-fold
predictions over the same 2150 images). Members are averaged as `skincancer evaluate --model A --model B` averages
them (probabilities), with the 8-view TTA predictions of fine-tuned recipes unless --tta 1. Prints one JSON line per
subset, best melanoma AUC first.

    python benchmarks/oof_ensemble.py --cv runs/cv --linear runs/demo
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.metrics import roc_auc_score

CLASSES = ("melanoma", "nevus", "seborrheic_keratosis")
COMBINE = {
    "prob": lambda p: p,
    "logit": lambda p: logit(np.clip(p, 1e-6, 1 - 1e-6)),
    "rank": lambda p: np.argsort(np.argsort(p, axis=0), axis=0) / len(p),  # per class column
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, help="cv_search.py --out folder")
    parser.add_argument("--linear", nargs="*", default=[], help="runs fitted with linear_fit: train+valid")
    parser.add_argument("--tta", type=int, choices=(1, 8), default=8)
    parser.add_argument("--eval-size", type=int, help="use the fine-tunes' 8-view predictions at this size "
                        "(<recipe>_oof_size<N>.npy from cv_search.py --eval-sizes N) instead")
    parser.add_argument("--combine", choices=("prob", "logit", "rank"), default="prob",
                        help="average probabilities (what evaluate does), their logits, or their ranks")
    args = parser.parse_args()

    cv = Path(args.cv)
    if not (cv / "oof_index.csv").is_file():
        raise SystemExit(f"{cv}: no oof_index.csv here; pass the --out folder of a finished cv_search.py run")
    index = pd.read_csv(cv / "oof_index.csv")
    members: dict[str, np.ndarray] = {}
    for path in sorted(cv.glob("*_oof.npy")):
        name = path.name.removesuffix("_oof.npy")
        if args.eval_size:
            members[name] = np.load(cv / f"{name}_oof_size{args.eval_size}.npy")
        else:
            members[name] = np.load(path)[0 if args.tta == 1 else 1]
    for run in args.linear:
        if not (Path(run) / "valid_predictions.csv").is_file():
            raise SystemExit(f"{run}: no valid_predictions.csv here; pass a finished linear run's folder")
        table = pd.read_csv(Path(run) / "valid_predictions.csv").set_index("image_id")
        missing = set(index["image_id"]) - set(table.index)
        if missing:
            raise SystemExit(f"{run}/valid_predictions.csv: no out-of-fold prediction for {len(missing)} images "
                             f"(e.g. {sorted(missing)[0]}); fit it with linear_fit: train+valid")
        members[f"linear:{Path(run).name}"] = table.loc[index["image_id"], list(CLASSES)].to_numpy()

    if not members:
        raise SystemExit(f"{cv}: no *_oof.npy predictions and no --linear run: nothing to ensemble")
    melanoma = (index["diagnosis"] == "melanoma").to_numpy()
    keratosis = (index["diagnosis"] == "seborrheic_keratosis").to_numpy()
    rows = []
    for size in range(1, len(members) + 1):
        for names in itertools.combinations(members, size):
            p = np.mean([COMBINE[args.combine](members[n]) for n in names], axis=0)
            mel, sk = roc_auc_score(melanoma, p[:, 0]), roc_auc_score(keratosis, p[:, 2])
            rows.append({"members": list(names), "melanoma_auc": round(mel, 4), "sk_auc": round(sk, 4),
                         "mean": round((mel + sk) / 2, 4)})
    for row in sorted(rows, key=lambda r: -r["melanoma_auc"]):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
