"""Issue 21's with/without-HAM ablation: one recipe trained on ISIC 2017 alone and with HAM10000 added, each
chosen and judged out of fold on the ISIC 2017 train+valid images alone (`--select-on isic2017`: the same ISIC
folds in every variant, HAM training data in every fold). Never reads the test split.

    python benchmarks/sources.py --config configs/linear.yaml            # the demo's probe
    python benchmarks/sources.py --config configs/linear.yaml --variants isic2017 isic2017+ham3

Writes runs/sources/<config>-<variant>/ (ordinary, resumable run folders), benchmarks/results/sources/*.json and the
table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "sources"
CLI = [sys.executable, "-m", "skincancer"]
VARIANTS = {  # name -> the HAM10000 diagnoses added to the training images
    "isic2017": None,
    "isic2017+ham3": ("melanoma", "nevus", "seborrheic_keratosis"),  # ISIC 2017's own classes
    "isic2017+ham7": "all",  # all seven: the head spans the union
}


def manifests(out: Path) -> dict[str, Path]:
    """The ISIC 2017 train/valid and HAM10000 manifests, indexed once with the tool itself."""
    isic, paths = DATA / "isic2017", {"train": out / "isic-train.csv", "valid": out / "isic-valid.csv",
                                      "ham": out / "ham10000.csv"}
    commands = {
        "train": ["index", isic / "train", "--source", "isic2017", "--metadata",
                  isic / "ISIC-2017_Training_Data_metadata.csv"],
        "valid": ["index", isic / "valid", "--source", "isic2017", "--metadata",
                  isic / "ISIC-2017_Validation_Data_metadata.csv"],
        "ham": ["index", "--isic-csv", DATA / "ham10000" / "HAM10000_metadata.csv", "--images",
                DATA / "ham10000" / "images"],
    }
    for name, path in paths.items():
        if not path.is_file():
            subprocess.run([*CLI, *map(str, commands[name]), "-o", str(path)], check=True)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/linear.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/sources")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    paths = manifests(out)
    ham = pd.read_csv(paths["ham"], dtype=str)
    for variant in args.variants:
        train = [paths["train"]]
        added = VARIANTS[variant]
        if added is not None:
            subset = out / f"ham-{variant}.csv"
            kept = ham if added == "all" else ham[ham["diagnosis"].isin(added)]
            kept.to_csv(subset, index=False)  # filepaths stay relative to the same folder
            train.append(subset)
        run = out / f"{Path(args.config).stem}-{variant}"
        command = [*CLI, "train", "--config", args.config, *[a for p in train for a in ("--train", str(p))],
                   "--valid", str(paths["valid"]), "--select-on", "isic2017", "--out", str(run), "--overwrite"]
        subprocess.run(command, check=True, cwd=ROOT)
        record = collect(run, variant, args.config, " ".join(map(str, command)).replace(str(ROOT) + "/", ""), paths)
        (RESULTS / f"{Path(args.config).stem}-{variant}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    write_table()


def collect(run: Path, variant: str, config: str, command: str, paths: dict[str, Path]) -> dict:
    """The ablation's figures from a finished run folder: out of fold, on the ISIC 2017 images alone."""
    meta = json.loads((run / "model" / "model.json").read_text())
    predictions = pd.read_csv(run / "valid_predictions.csv")
    isic = predictions[predictions["source"] == "isic2017"].dropna(subset=["malignant"])
    record = {
        "variant": variant, "config": config, "command": command, "train_seconds": meta["train_seconds"],
        "images": {s["name"]: s["train_images"] + s["valid_images"] for s in meta["sources"]},
        "validation_source": meta["validation_source"], "n_judged": int(len(isic)),
        "melanoma_auc": float(roc_auc_score(isic["label"], isic["malignant"])),
        "sensitivity": meta["validation"]["sensitivity"], "specificity": meta["validation"]["specificity"],
        "classes": meta["class_names"],
    }
    if "seborrheic_keratosis" in isic:
        keratosis = set()
        for split in ("train", "valid"):
            frame = pd.read_csv(paths[split], dtype=str)
            keratosis |= set(frame.loc[frame["diagnosis"] == "seborrheic_keratosis", "image_id"])
        is_sk = isic["image_id"].astype(str).isin(keratosis).to_numpy().astype(int)
        record["sk_auc"] = float(roc_auc_score(is_sk, isic["seborrheic_keratosis"]))
    return record


def write_table() -> None:
    rows = ["| recipe | images (train+valid) | ISIC 2017 out-of-fold melanoma AUC | SK AUC | sens / spec at its "
            "threshold | train time | command |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        images = " + ".join(f"{name} {n}" for name, n in r["images"].items())
        sk = f"{r['sk_auc']:.4f}" if "sk_auc" in r else "—"
        rows.append(f"| {r['config']}, {r['variant']} | {images} | {r['melanoma_auc']:.4f} ({r['n_judged']} images) | "
                    f"{sk} | {r['sensitivity']:.3f} / {r['specificity']:.3f} | {r['train_seconds'] / 60:.0f} min | "
                    f"`{r['command']}` |")
    write_block("sources", "benchmarks/sources.py", rows, "Extra data: HAM10000 (issue 21)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
