"""What a predictions.csv's ROC curve allows at all: the best specificity at a sensitivity floor and the best
sensitivity at a specificity floor. Read after the fact on a test split, it chooses nothing; it says whether any
threshold could have met an operating-point goal.

    python benchmarks/roc_points.py runs/benchmark/test/predictions.csv --sensitivity 0.80 --specificity 0.73
"""

from __future__ import annotations

import argparse
import json

import pandas as pd
from sklearn.metrics import roc_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="+", help="predictions.csv files written by `skincancer evaluate`")
    parser.add_argument("--sensitivity", type=float, default=0.80)
    parser.add_argument("--specificity", type=float, default=0.73)
    parser.add_argument("--score", default="malignant", help="the column holding the malignant probability")
    args = parser.parse_args()
    for path in args.predictions:
        table = pd.read_csv(path)
        table = table[table["error"].isna() | (table["error"] == "")] if "error" in table else table
        fpr, tpr, _ = roc_curve(table["label"], table[args.score])
        print(json.dumps({
            "predictions": path, "n": len(table),
            f"best_specificity_at_sensitivity>={args.sensitivity}": round(1 - fpr[tpr >= args.sensitivity].min(), 3),
            f"best_sensitivity_at_specificity>={args.specificity}": round(tpr[1 - fpr >= args.specificity].max(), 3),
        }))


if __name__ == "__main__":
    main()
