"""Pre-train a fine-tune on HAM10000 alone, to start ISIC fine-tunes from (`init_from`; recipe l0_ema_192_hampre in
benchmarks/recipes.yaml). HAM's lesions are split 90/10 (lesion-grouped, stratified by diagnosis, seed 0); the tenth
only reports the run's progress. Resumes an interrupted run.

    python benchmarks/ham_pretrain.py runs/benchmark/data/ham10000.csv --out runs/ham-pre
"""

from __future__ import annotations

import argparse
from pathlib import Path

from skincancer import load_config, load_manifest, save_manifest, train
from skincancer.data import DataError
from skincancer.resume import resume_config
from skincancer.runfolder import is_finished
from skincancer.sources import fold_groups, grouped_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="the HAM10000 manifest (skincancer index)")
    parser.add_argument("--out", default="runs/ham-pre", help="the split (train.csv, valid.csv) and the run (run/)")
    parser.add_argument("--config", default=str(Path(__file__).with_name("ham-pretrain.yaml")))
    args = parser.parse_args()

    out = Path(args.out)
    try:
        frame = load_manifest(args.manifest)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    kept, held = grouped_folds(frame["diagnosis"].to_numpy(), fold_groups(frame), 10, seed=0)[0]
    train_csv = save_manifest(frame.iloc[kept], out / "train.csv")
    valid_csv = save_manifest(frame.iloc[held], out / "valid.csv")
    run = out / "run"
    if is_finished(run):
        print(f"{run}: finished already")
        return
    if run.is_dir():  # an interrupted run goes on with its own config.yaml
        print(f"trained {train(resume_config(run), resume=True)}")
        return
    config = load_config(args.config, train=str(train_csv), valid=str(valid_csv), out=str(run))
    print(f"trained {train(config)}")


if __name__ == "__main__":
    main()
