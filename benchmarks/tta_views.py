"""More test-time views than the 8 dihedral ones, out of fold: does averaging over augmented copies of each image
(Perez et al. 2018 averaged 64) lift the melanoma AUC of the folds that cv_search.py trained?

For each fold of a cv_search recipe, its held-out images are predicted again through each draw: by default the
fixed augmentations that `--tta 16 ... 64` uses (images.AugmentedView, the product's path), or with --augment
random draws of a training augmentation set, each image its own; each draw with its 8 dihedral views. Draw 0 is
the plain image (the fold's saved 8-view predictions). Prints the pooled out-of-fold melanoma and SK AUCs after 1,
2, ... draws (8, 16, ... views), and a paired DeLong test of the last against 8 views. Each draw of each fold is
saved beside the fold (tta_<fixed2017|augment>_<draw>.npy), so an interrupted run goes on where it stopped. With
several recipes (the same folds), their average is scored too: do more views add on top of an ensemble? Never
reads the test split.

    python benchmarks/tta_views.py --cv runs/cv-ham --recipe l0_ema_192 --draws 3
    python benchmarks/tta_views.py --cv runs/cv-ham --recipe l0_ema_192_joint05 l0_ema_192_joint05_crop --draws 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from skincancer import load_manifest, load_model
from skincancer.datasets import ImageDataset, build_transform
from skincancer.engine import run_inference
from skincancer.images import TTA_SEED
from skincancer.metrics import delong_test

CLASSES = ("melanoma", "nevus", "seborrheic_keratosis")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, help="cv_search.py's --out (or --work): <recipe>/fold<k>/")
    parser.add_argument("--recipe", nargs="+", required=True,
                        help="one recipe, or several: each on its own, then averaged (an ensemble) at 8 and most views")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=4, help="augmented draws after the plain image (8 views each)")
    parser.add_argument("--augment", help="random draws of this training set instead: standard | strong | perez")
    parser.add_argument("--threads", type=int, help="torch threads (e.g. 1 beside a training run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tic, pooled, images = time.time(), {}, None
    for recipe in args.recipe:
        held, draws = recipe_draws(args, recipe)
        if images is not None and [list(f["image_id"]) for f in held] != images:
            raise SystemExit(f"{recipe}: its folds hold other images than {args.recipe[0]}'s")
        images = [list(f["image_id"]) for f in held]
        labels = {c: np.concatenate([(f["diagnosis"] == c).to_numpy() for f in held]) for c in CLASSES}
        pooled[recipe] = [np.concatenate([np.mean(d[: n + 1], axis=0) for d in draws]) for n in range(args.draws + 1)]
        report(args, recipe, pooled[recipe], labels)
    if len(args.recipe) > 1:  # the ensemble: the recipes' probabilities averaged, at each number of views
        report(args, "+".join(args.recipe), [np.mean([pooled[r][n] for r in args.recipe], axis=0)
                                             for n in range(args.draws + 1)], labels)
    print(json.dumps({"seconds": round(time.time() - tic)}))


def recipe_draws(args: argparse.Namespace, recipe: str) -> tuple[list, list]:
    """Per fold: its held-out manifest, and [draw] -> [images, 3] probabilities (made and saved where missing)."""
    held, draws = [], []
    augment = args.augment or "fixed"
    for k in range(args.folds):
        fold = Path(args.cv) / recipe / f"fold{k}"
        frame = load_manifest(fold / "held.csv")
        with np.load(fold / "held_probs.npz") as saved:
            fold_draws = [saved["8"]]
        model = None
        for d in range(1, args.draws + 1):
            path = fold / f"tta_{augment}{TTA_SEED if augment == 'fixed' else ''}_{d}.npy"  # a new seed: new copies
            if not path.is_file():
                model = model or load_model(fold / "run", engine="torch")
                order = [model.class_names.index(c) for c in CLASSES]
                transform = model.transform(d) if augment == "fixed" else build_transform(
                    model.meta["image_size"], model.meta["mean"], model.meta["std"], augment, model.resize)
                torch.manual_seed(1000 * k + d)  # a random set's draws (one process: no loader workers)
                probs, errors = run_inference(model.model, ImageDataset(list(frame["filepath"]), None, transform),
                                              batch_size=32, num_workers=0, tta=8, desc=f"fold {k} draw {d}")
                if errors:
                    raise SystemExit(f"{fold}: unreadable images: {errors[:3]}")
                np.save(path, probs[:, order])
            fold_draws.append(np.load(path))
        held.append(frame)
        draws.append(fold_draws)
    return held, draws


def report(args: argparse.Namespace, name: str, pooled: list, labels: dict) -> None:
    """The pooled AUCs after 1, 2, ... draws, and a paired DeLong test of the last against 8 views."""
    for n, probs in enumerate(pooled):
        print(json.dumps({"recipe": name, "augment": args.augment or "fixed", "views": 8 * (n + 1),
                          "melanoma_auc": round(roc_auc_score(labels["melanoma"], probs[:, 0]), 4),
                          "sk_auc": round(roc_auc_score(labels["seborrheic_keratosis"], probs[:, 2]), 4)}))
    for column, dx in ((0, "melanoma"), (2, "seborrheic_keratosis")):
        test = delong_test(labels[dx].astype(int), pooled[-1][:, column], pooled[0][:, column])
        print(json.dumps({"recipe": name, "compare": f"{8 * (args.draws + 1)} views - 8 views", "class": dx,
                          **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in test.items()}}))


if __name__ == "__main__":
    main()
