"""Does a frozen-backbone guard refuse the share of new dermoscopy images it was set to? Nested cross-validation on
the run's own train + valid images, never the test split: each outer fold (lesion-grouped) is held out, the guard is
fitted on the rest exactly as training fits it (the Gaussian on all of them, the threshold out of fold at the stated
false-rejection rate), and the held-out fold is scored. The pooled share refused is what the procedure really gives
images it never saw; it is compared for several numbers of inner folds (`guard.fit_guard(folds=...)`).

    python benchmarks/guard_calibration.py --model runs/demo [--inner 5 10 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from skincancer.checkpoint import CheckpointError
from skincancer.config import ConfigError
from skincancer.data import DataError
from skincancer.guard import FALSE_REJECTION, GuardError, fit_guard, image_features
from skincancer.guard_refit import held_in_images
from skincancer.metrics import wilson_interval
from skincancer.predict import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "guard"


def held_in_features(run: str) -> tuple[np.ndarray, np.ndarray]:
    """The features the guard is fitted on (train + valid of the run's config.yaml, the mean of its views) and the
    lesion group of each row; cached in /tmp by the run's weights."""
    classifier = load_model(run, engine="torch", guard=False)
    meta = classifier.meta
    if meta.get("mode") != "linear":
        sys.exit(f"{run}: not a linear probe: a fine-tuned run's threshold comes from its validation images, which "
                 "this nested cross-validation does not model")
    _, frames, groups = held_in_images(run)
    both = pd.concat(frames, ignore_index=True)
    key = hashlib.sha256(json.dumps([meta.get("weights_sha256", ""), list(both.filepath)]).encode()).hexdigest()[:12]
    cache = Path(f"/tmp/guard_calibration_{key}.npz")
    if cache.is_file():
        saved = np.load(cache)
        return saved["features"], saved["groups"]
    features = image_features(classifier.model, both.filepath, classifier.transform(), int(meta.get("tta", 1)))
    finite = np.isfinite(features).all(1)
    features, groups = features[finite].astype(np.float64), groups[finite]
    np.savez(cache, features=features, groups=groups)
    return features, groups


def nested(features: np.ndarray, groups: np.ndarray, inner: int, repeats: int, false_rejection: float) -> dict:
    refused, n, thresholds = 0, 0, []
    for repeat in range(repeats):
        for kept, out in GroupKFold(5, shuffle=True, random_state=100 + repeat).split(features, groups=groups):
            guard, _ = fit_guard(features[kept], false_rejection=false_rejection, seed=repeat, groups=groups[kept],
                                 folds=inner)
            refused += int((guard.score(features[out]) > 1).sum())
            n += len(out)
            thresholds.append(guard.threshold)
    return {"inner_folds": inner, "refused": refused, "n": n, "share": refused / n,
            "ci95": wilson_interval(refused, n), "threshold_mean": float(np.mean(thresholds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a linear-probe run folder")
    parser.add_argument("--inner", type=int, nargs="+", default=[5, 10, 20], help="inner folds for the threshold")
    parser.add_argument("--repeats", type=int, default=3, help="outer 5-fold splits, each with another shuffle")
    parser.add_argument("--false-rejection", type=float, default=FALSE_REJECTION)
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        features, groups = held_in_features(args.model)
    except (CheckpointError, ConfigError, DataError, GuardError, OSError) as err:
        sys.exit(str(err))
    print(f"{len(features)} held-in images, {features.shape[1]} features, {len(set(groups))} lesion groups")
    rows = []
    for inner in args.inner:
        row = nested(features, groups, inner, args.repeats, args.false_rejection)
        rows.append(row)
        low, high = row["ci95"]
        print(f"inner {inner:>2} folds: {row['refused']}/{row['n']} refused = {row['share']:.2%} "
              f"({low:.2%}-{high:.2%}); mean threshold {row['threshold_mean']:.4f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{Path(args.model).name}.json"
    out.write_text(json.dumps({"command": "python benchmarks/guard_calibration.py " + " ".join(sys.argv[1:]),
                               "target": args.false_rejection, "rows": rows,
                               "seconds": round(time.perf_counter() - start)}, indent=1) + "\n")
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
