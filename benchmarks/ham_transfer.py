"""A transfer set for distillation (`skincancer distill --extra`): 2000 HAM10000 images of the model's own diagnoses,
one per lesion: every melanoma and benign keratosis lesion, and nevus lesions drawn at random (seed 0) to make up the
number. The teacher labels them; their own labels are not used.

    skincancer index --isic-csv ../shared/data/ham10000/HAM10000_metadata.csv --images ../shared/data/ham10000/images \\
        -o runs/benchmark/data/ham10000.csv
    python benchmarks/ham_transfer.py runs/benchmark/data/ham10000.csv -o runs/benchmark/data/ham-transfer.csv
"""

from __future__ import annotations

import argparse

import pandas as pd

from skincancer.data import DataError, read_csv_checked

OWN = ["melanoma", "nevus", "seborrheic_keratosis"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="the HAM10000 manifest (skincancer index)")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()

    try:  # a missing file or column is named, not a traceback
        frame = read_csv_checked(args.manifest, ["image_id", "diagnosis", "group"])
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    lesions = frame[frame["diagnosis"].isin(OWN)].groupby("group", sort=True).head(1)
    rare = lesions[lesions["diagnosis"] != "nevus"]
    if len(rare) > args.n:
        raise SystemExit(f"--n {args.n}: fewer than the {len(rare)} melanoma and keratosis lesions")
    nevi = lesions[lesions["diagnosis"] == "nevus"].sample(args.n - len(rare), random_state=0)
    chosen = pd.concat([rare, nevi]).sort_values("image_id")
    chosen.to_csv(args.out, index=False)
    print(f"wrote {args.out}: {len(chosen)} images, {chosen['diagnosis'].value_counts().to_dict()}")


if __name__ == "__main__":
    main()
