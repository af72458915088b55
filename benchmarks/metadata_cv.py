"""What age/sex fusion adds, by cross-validation on train+valid (the test split has no metadata).

Out-of-fold image probabilities come from the linear probe on cached features (as benchmarks/linear_search.py);
within each fold a MetadataModel is fitted on the kept images' age/sex and fused with the held-out image
probabilities exactly as `predict` does. Prints pooled out-of-fold melanoma and SK AUCs, image only and fused, and
for the metadata model alone. --extra adds another source's images of the same classes (e.g. HAM10000's manifest,
which carries age and sex) to every fold's metadata fit, never to the held-out images.

    python benchmarks/metadata_cv.py --train runs/data/train.csv --valid runs/data/valid.csv
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
from linear_search import CLASSES, features
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from skincancer import load_manifest
from skincancer.metadata import MetadataModel, attach, read_metadata_csv, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--metadata", nargs="+", default=[
        "../shared/data/isic2017/ISIC-2017_Training_Data_metadata.csv",
        "../shared/data/isic2017/ISIC-2017_Validation_Data_metadata.csv"])
    parser.add_argument("--features", default="tf_efficientnet_lite0:224:multiscale")
    parser.add_argument("--c", type=float, default=1e-3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--extra", help="a manifest with age/sex columns whose melanoma/nevus/keratosis rows join "
                                        "every fold's metadata model (another source)")
    args = parser.parse_args()

    data = pd.concat([load_manifest(args.train), load_manifest(args.valid)], ignore_index=True)
    data = attach(data, pd.concat([read_metadata_csv(p) for p in args.metadata]))
    rows = records(data)
    y = data["diagnosis"].map({name: i for i, name in enumerate(CLASSES)}).to_numpy()
    x = np.concatenate([features(part, data, args.cache_dir) for part in args.features.split("+")], axis=-1)
    extra_rows, extra_y = [], np.zeros(0, int)
    if args.extra:
        extra = load_manifest(args.extra)
        extra = extra[extra["diagnosis"].isin(CLASSES)].reset_index(drop=True)
        extra_rows, extra_y = records(extra), extra["diagnosis"].map(CLASSES.index).to_numpy()
    results: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        image, fused, alone = (np.zeros((len(y), 3)) for _ in range(3))
        for kept, held in StratifiedKFold(args.folds, shuffle=True, random_state=repeat).split(y, y):
            mean, std = x[0, kept].mean(0), x[0, kept].std(0) + 1e-6
            clf = LogisticRegression(C=args.c, class_weight="balanced", max_iter=3000)
            clf.fit(((x[:, kept] - mean) / std).reshape(-1, x.shape[-1]), np.tile(y[kept], len(x)))
            image[held] = clf.predict_proba((x[0, held] - mean) / std)
            meta = MetadataModel.fit([rows[i] for i in kept] + extra_rows, np.r_[y[kept], extra_y], 3)
            fused[held] = meta.fuse(image[held], [rows[i] for i in held])
            alone[held] = [meta.proba(r["age"], r["sex"]) if meta.covers(r) else meta.prior
                           for r in (rows[i] for i in held)]
        for name, probs in (("image", image), ("image+metadata", fused), ("metadata only", alone)):
            for c, task in ((0, "melanoma"), (2, "seborrheic_keratosis")):
                results.setdefault(f"{name} {task}", []).append(roc_auc_score(y == c, probs[:, c]))
    known = sum(r is not None for r in rows)
    print(json.dumps({"features": args.features, "C": args.c, "n": len(y), "n_with_metadata": known,
                      "extra": args.extra, "n_extra_with_metadata": sum(r is not None for r in extra_rows),
                      "folds": args.folds, "repeats": args.repeats,
                      "auc": {k: round(float(np.mean(v)), 4) for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
