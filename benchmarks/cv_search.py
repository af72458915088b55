"""Cross-validated comparison of training recipes on train+valid (never the test split).

For each named recipe (overrides of a base config) and each of K stratified folds of the training manifest (joined
with the validation manifest when given; a lesion's images, or copies of one image, stay in one fold), train on K-1
folds and predict the held-out fold (with 1 and 8 dihedral TTA views, and with 8 views at each resolution of
--eval-sizes). Prints one JSON line per fold and per recipe with the pooled out-of-fold melanoma-vs-rest and
seborrheic-keratosis-vs-rest AUCs, then the same for the averages (ensembles) of recipe pairs. Out-of-fold
predictions are written to --out. Each fold's held-out predictions are also kept in its folder (held_probs.npz, with
a fingerprint of the recipe, the fold's images and its starting weights): a later search reads them back instead of
training that fold again when all of these are the same (--fresh trains it again), so the folds of a slow recipe can
be run one at a time (--fold K) and pooled when the last is done; a fold whose fine-tune was interrupted goes on
from its last complete epoch. A recipe's `extra_train` (manifests, e.g. another
source) joins every fold's training images and is never held out.

    python benchmarks/cv_search.py --train runs/data/train.csv --valid runs/data/valid.csv \
        --recipes benchmarks/recipes.yaml --folds 3 --out runs/cv
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from skincancer import load_config, load_manifest, load_model, save_manifest, train
from skincancer.checkpoint import CheckpointError, atomic_write, find_model_dir, read_meta
from skincancer.config import ConfigError, TrainConfig, config_to_dict
from skincancer.data import DataError, content_keys
from skincancer.runfolder import is_finished
from skincancer.sources import fold_groups

LATER_KEYS = ("source_weights", "resize", "distill_out_of_fold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", help="validation manifest, joined to --train before the folds are cut (leave it out "
                        "for folds of the training images alone, e.g. a teacher's out-of-fold targets)")
    parser.add_argument("--recipes", required=True, help="YAML: {name: {config overrides}}; key 'base' = shared")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these recipes")
    parser.add_argument("--out", default="runs/cv", help="out-of-fold predictions (<recipe>_oof.npy, oof_index.csv)")
    parser.add_argument("--work", help="where the fold runs go (default: --out)")
    parser.add_argument("--eval-sizes", type=int, nargs="*", default=[],
                        help="also predict the held-out folds at these sizes (8 views; the eval_image_size lever)")
    parser.add_argument("--num-workers", type=int, help="override the recipes' num_workers (e.g. 2 on this CPU)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="train each fold on this stratified fraction of its training images (a learning curve); "
                             "the held-out fold stays whole")
    parser.add_argument("--fold", type=int, nargs="*",
                        help="run only these folds (0-based) and print their lines; pooled scores and *_oof.npy come "
                             "once every fold is done (folds done by earlier runs are read back)")
    parser.add_argument("--fresh", action="store_true",
                        help="train every fold again (default: a fold whose held_probs.npz matches is read back)")
    args = parser.parse_args()

    recipes = yaml.safe_load(Path(args.recipes).read_text())
    base = recipes.pop("base", {})
    if args.only:
        recipes = {k: v for k, v in recipes.items() if k in args.only}
    data = pd.concat([load_manifest(path) for path in (args.train, args.valid) if path], ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or args.out)
    # rows of every <recipe>_oof.npy: [1-view, 8-view] x image x (melanoma, nevus, seborrheic_keratosis)
    data[["image_id", "diagnosis"]].to_csv(out / "oof_index.csv", index=False)  # manifests carry image_id
    groups = fold_groups(data, content_keys(data["filepath"]))  # a lesion's images (or copies) on one side
    if len(set(groups)) < len(data):
        folds = list(StratifiedGroupKFold(args.folds, shuffle=True, random_state=0).split(data, data["diagnosis"],
                                                                                          groups))
    else:  # every image its own lesion: the folds as before groups were kept (saved folds stay valid)
        folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(data, data["diagnosis"]))
    if args.fold and not set(args.fold) <= set(range(args.folds)):
        parser.error(f"--fold: each fold must be between 0 and {args.folds - 1}, got {args.fold}")
    oof: dict[str, dict[int | str, np.ndarray]] = {}
    pooled: dict[str, dict[int | str, np.ndarray]] = {}
    views = [1, 8, *(f"8@{size}" for size in args.eval_sizes)]  # what each fold predicts: 1 and 8 views, 8 at each size
    for name, overrides in recipes.items():
        tic = time.time()
        oof[name] = {view: np.zeros((len(data), 3)) for view in views}
        finished: set[int] = set()
        for k, (kept, held) in enumerate(folds):
            fold_dir = work / name / f"fold{k}"
            if args.train_fraction < 1:
                kept, _ = train_test_split(kept, train_size=args.train_fraction, stratify=data["diagnosis"].iloc[kept],
                                           random_state=0)
            workers = {} if args.num_workers is None else {"num_workers": args.num_workers}
            recipe = {**base, **overrides}
            extra = recipe.pop("extra_train", [])  # other sources: training images in every fold, never held out
            if not isinstance(extra, list) or not all(isinstance(p, str) for p in extra):
                parser.error(f"recipe {name}: extra_train must be a list of manifest paths, got {extra!r}")
            for path in extra:
                if not Path(path).is_file():
                    parser.error(f"recipe {name}: extra_train: {path}: no such manifest")
            settings = {**recipe, **workers, "train": [str(fold_dir / "train.csv"), *extra],
                        "valid": str(fold_dir / "held.csv"), "out": str(fold_dir / "run")}
            stamp = fold_fingerprint(load_config(None, **settings), data, kept, held, extra)
            saved = fold_dir / "held_probs.npz"  # a fold done before (by an earlier, perhaps interrupted, search)
            done = None if args.fresh else read_fold(saved, stamp, views)
            if done is not None:
                for view in views:
                    oof[name][view][held] = done[str(view)]
                print(json.dumps({"recipe": name, "fold": k, "from": str(saved),
                                  **scores(data.iloc[held], {t: p[held] for t, p in oof[name].items()})}), flush=True)
                finished.add(k)
                continue
            if args.fold and k not in args.fold:
                continue
            save_manifest(data.iloc[kept], fold_dir / "train.csv")
            save_manifest(data.iloc[held], fold_dir / "held.csv")
            config = load_config(None, **settings)
            run = resume_fold(config)
            classifier = load_model(run)
            if torch.cuda.is_available():
                classifier.model.cuda()
            for tta in (1, 8):
                probs, _ = classifier.predict_proba(list(data["filepath"].iloc[held]), num_workers=config.num_workers,
                                                    batch_size=64, tta=tta)
                order = [classifier.class_names.index(c) for c in ("melanoma", "nevus", "seborrheic_keratosis")]
                oof[name][tta][held] = probs[:, order]
            for size in args.eval_sizes:  # the same weights, images resized to `size` (what eval_image_size sets)
                sized = load_model(run)
                sized.meta["image_size"] = size
                if torch.cuda.is_available():
                    sized.model.cuda()
                probs, _ = sized.predict_proba(list(data["filepath"].iloc[held]), num_workers=config.num_workers,
                                               batch_size=64, tta=8)
                order = [sized.class_names.index(c) for c in ("melanoma", "nevus", "seborrheic_keratosis")]
                oof[name][f"8@{size}"][held] = probs[:, order]
            fold = {t: p[held] for t, p in oof[name].items()}
            save_fold(saved, stamp, fold)
            finished.add(k)
            print(json.dumps({"recipe": name, "fold": k, "train_images": len(kept), **scores(data.iloc[held], fold),
                              "seconds_since_recipe_start": round(time.time() - tic)}), flush=True)
        if len(finished) < args.folds:
            continue
        pooled[name] = oof[name]
        np.save(out / f"{name}_oof.npy", np.stack([oof[name][1], oof[name][8]]))
        for size in args.eval_sizes:
            np.save(out / f"{name}_oof_size{size}.npy", oof[name][f"8@{size}"])
        print(json.dumps({"recipe": name, **scores(data, oof[name]), "seconds": round(time.time() - tic)}),
              flush=True)
    oof = pooled  # recipes with every fold done
    for a, b in itertools.combinations(oof, 2):
        mean = {t: (oof[a][t] + oof[b][t]) / 2 for t in oof[a]}
        print(json.dumps({"recipe": f"{a}+{b}", **scores(data, mean)}), flush=True)
    if len(oof) > 2:
        mean = {t: np.mean([oof[n][t] for n in oof], axis=0) for t in oof[next(iter(oof))]}
        print(json.dumps({"recipe": "all", **scores(data, mean)}), flush=True)


def resume_fold(config) -> Path:
    """Train a fold's run; one left unfinished by an interrupted search (a fine-tune of these very settings, on
    the same images: `train --resume` refuses other data) goes on from its last complete epoch instead of starting
    again, and one that finished (on the same images) before its predictions were saved is used as it is. Any other run
    in the fold's folder is replaced."""
    run = Path(config.out)
    if config.mode == "finetune" and (run / "config.yaml").is_file():
        try:
            saved = load_config(run / "config.yaml")
        except ConfigError:
            saved = None
        same = saved is not None and _settings(saved) == _settings(config)
        if same and is_finished(run) and _fitted(run) == set(content_keys(load_manifest(config.train)["filepath"])):
            print(json.dumps({"finished_before": str(run)}), flush=True)  # stopped before its predictions
            return run
        if same and not is_finished(run):
            try:
                print(json.dumps({"resuming": str(run)}), flush=True)
                return train(config, resume=True)
            except (CheckpointError, DataError) as err:
                print(json.dumps({"not_resumed": str(run), "why": str(err)}), flush=True)
    return train(config, overwrite=True)


def _fitted(run: Path) -> set | None:
    """The content keys of the images a finished run was fitted on (None: no readable record)."""
    try:
        return set(json.loads((run / "model" / "fitted_images.json").read_text())["train"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _settings(config) -> dict:
    """A recipe's settings, not where it runs or with how many loader processes."""
    return {k: v for k, v in config_to_dict(config).items()
            if k not in ("train", "valid", "out", "num_workers", "cache_dir")}


def fold_fingerprint(config, data: pd.DataFrame, kept: np.ndarray, held: np.ndarray, extra: list[str]) -> str:
    """What a fold's predictions depend on: the recipe's settings (not where it runs or with how many loader
    processes), the images on each side, the extra training manifests, and the weights it starts from
    (`init_from`)."""
    settings = _settings(config)
    for key in LATER_KEYS:  # config keys newer than folds saved before: left out at their default, so those match
        if settings.get(key) == TrainConfig.model_fields[key].get_default(call_default_factory=True):
            settings.pop(key, None)
    if extra:
        settings["extra_train"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in extra]
    if config.init_from:
        settings["init_from_weights"] = read_meta(find_model_dir(config.init_from)).get("weights_sha256")
    ids = {"kept": sorted(data["image_id"].iloc[kept].astype(str)), "held": list(data["image_id"].iloc[held])}
    return hashlib.sha256(json.dumps([settings, ids], sort_keys=True, default=str).encode()).hexdigest()


def read_fold(path: Path, stamp: str, views: list) -> dict | None:
    """A fold's saved held-out predictions if they were made by this recipe on these images, with these views;
    else None (the fold is trained again)."""
    try:
        with np.load(path) as saved:
            if str(saved["fingerprint"]) != stamp or not {str(v) for v in views} <= set(saved.files):
                return None
            return {str(v): saved[str(v)] for v in views}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent, from an older search, or cut short
        return None


def save_fold(path: Path, stamp: str, fold: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, fingerprint=np.array(stamp), **{str(t): p for t, p in fold.items()})

    atomic_write(path, write)


def scores(data: pd.DataFrame, probs: dict[int | str, np.ndarray]) -> dict:
    melanoma = (data["diagnosis"] == "melanoma").to_numpy()
    keratosis = (data["diagnosis"] == "seborrheic_keratosis").to_numpy()
    result = {}
    for tta, p in probs.items():
        mel, sk = roc_auc_score(melanoma, p[:, 0]), roc_auc_score(keratosis, p[:, 2])
        result[f"tta{tta}"] = {"melanoma_auc": round(mel, 4), "sk_auc": round(sk, 4), "mean": round((mel + sk) / 2, 4)}
    return result


if __name__ == "__main__":
    main()
