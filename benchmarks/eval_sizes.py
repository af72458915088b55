"""Melanoma and SK AUC of trained runs when images are resized to other sizes (the eval_image_size lever).

A quick look on the validation split; the decision rests on cross-validation (cv_search.py --eval-sizes).

    python benchmarks/eval_sizes.py --data runs/benchmark/data/valid.csv --sizes 256 288 320 \
        --model runs/benchmark/lite0 --model runs/benchmark/lite2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from skincancer import load_manifest, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="manifest (use validation, not test, to choose)")
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    data = load_manifest(args.data)
    for run in args.model:
        model = load_model(run, engine="torch")
        for size in args.sizes:
            model.meta["image_size"] = size  # what eval_image_size makes the saved model do
            tic = time.time()
            probs, _ = model.predict_proba(list(data["filepath"]), tta=args.tta, num_workers=args.num_workers)
            ok = ~np.isnan(probs).any(1)  # unreadable files are left out
            aucs = {name: round(roc_auc_score(data["diagnosis"][ok] == name,
                                              probs[ok, model.class_names.index(name)]), 4)
                    for name in ("melanoma", "seborrheic_keratosis")}
            print(json.dumps({"model": run, "size": size, "tta": args.tta, **aucs,
                              "seconds": round(time.time() - tic)}), flush=True)


if __name__ == "__main__":
    main()
