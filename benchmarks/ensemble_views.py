"""Do more test-time views add on top of an ensemble? cv_search recipes averaged at 8 views and at 8 x (1 + draws)
fixed views, out of fold, from the draws tta_views.py saved beside each fold (run it first for every recipe), with a
paired DeLong test of the two. Never reads the test split.

    python benchmarks/ensemble_views.py --cv runs/cv-ham --recipes l0_ema_192_joint05 l0_ema_192_joint05_crop --draws 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import roc_auc_score

from skincancer import load_manifest
from skincancer.images import TTA_SEED
from skincancer.metrics import delong_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, help="cv_search.py's --out (or --work): <recipe>/fold<k>/")
    parser.add_argument("--recipes", nargs="+", required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=2, help="fixed augmented draws after the plain image")
    args = parser.parse_args()
    few, many, labels = {r: [] for r in args.recipes}, {r: [] for r in args.recipes}, []
    for k in range(args.folds):
        ids = None
        for recipe in args.recipes:
            fold = f"{args.cv}/{recipe}/fold{k}"
            frame = load_manifest(f"{fold}/held.csv")
            if ids is not None and list(frame["image_id"]) != ids:
                raise SystemExit(f"{fold}: not the held-out images of {args.recipes[0]}'s fold {k}")
            ids = list(frame["image_id"])
            with np.load(f"{fold}/held_probs.npz") as saved:
                draws = [saved["8"]]  # melanoma, nevus, seborrheic_keratosis
            draws += [np.load(f"{fold}/tta_fixed{TTA_SEED}_{d}.npy") for d in range(1, args.draws + 1)]
            few[recipe].append(draws[0][:, 0])
            many[recipe].append(np.mean(draws, axis=0)[:, 0])
        labels.append((frame["diagnosis"] == "melanoma").to_numpy().astype(int))
    y = np.concatenate(labels)
    views = 8 * (args.draws + 1)
    for recipe in args.recipes:
        print(json.dumps({"recipe": recipe, "melanoma_auc_8": round(roc_auc_score(y, np.concatenate(few[recipe])), 4),
                          f"melanoma_auc_{views}": round(roc_auc_score(y, np.concatenate(many[recipe])), 4)}))
    ensemble_few = np.mean([np.concatenate(few[r]) for r in args.recipes], axis=0)
    ensemble_many = np.mean([np.concatenate(many[r]) for r in args.recipes], axis=0)
    test = delong_test(y, ensemble_many, ensemble_few)
    print(json.dumps({"ensemble": args.recipes, "compare": f"{views} views - 8 views",
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in test.items()}}))


if __name__ == "__main__":
    main()
