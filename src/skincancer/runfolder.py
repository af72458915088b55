"""The run folder's life cycle: claiming, clearing and finishing it, its log, and the checks made before training."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from .checkpoint import FITTED_IMAGES_FILE, write_json
from .config import TrainConfig
from .data import (
    DataError,
    check_files,
    content_keys,
    same_key,
)
from .provenance import ENVIRONMENT_FILE

log = logging.getLogger("skincancer")


RUN_RESULTS = ("model", "checkpoints", "tensorboard", "summary.csv", "valid_predictions.csv", "valid_metrics.json")


def is_finished(out: Path) -> bool:
    """A saved, complete model (not the placeholder an interrupted run keeps)."""
    try:
        meta = json.loads((out / "model" / "model.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and not meta.get("unfinished") and "train_seconds" in meta


def check_start(config: TrainConfig, overwrite: bool = False, resume: bool = False) -> None:
    """What `train` refuses at once, checked without writing anything: the CLI runs it before torchrun starts N
    processes that would each fail on it."""
    if not config.train or not config.valid or not config.out:
        raise DataError("train, valid and out are all required")
    for path in (*config.train_paths, config.valid):
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or folder")
    if not resume:
        claim_out(Path(config.out), overwrite)
        if config.init_from:
            from .checkpoint import check_starting_run

            check_starting_run(config.init_from, config)  # refused as train would refuse it (weights read there)


def claim_out(out: Path, overwrite: bool) -> bool:
    """Refuse to train into a folder that holds a run (unless `overwrite`) or anything that is not a run: a finished
    model or an interrupted one's checkpoints are never replaced silently. True: a run there is to be replaced
    (by clear_run, once the new run's inputs have been checked)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not (out / "train.log").is_file():  # every run keeps its train.log (a refused start leaves no folder)
        raise DataError(f"{out}: not empty and not a run folder; train into a new or empty folder")
    finished = is_finished(out)
    interrupted = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if (interrupted or (out / "model" / "model.json").is_file()) and not overwrite:  # finished: model.json too
        what = ("a trained run (model/)" if finished else
                "an interrupted run (checkpoints/; `--resume` continues it)" if interrupted else
                "an unfinished run's model (model/)")
        raise DataError(f"{out}: already holds {what}; pass --overwrite to replace it, or choose another --out")
    return True


def first_missing(path: Path) -> Path | None:
    made = None
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path, made = path.parent, path
    return made


def remove_start(out: Path, made: Path | None) -> None:
    """Undo a start refused on its inputs: its train.log, and the folders it made if they are empty; never hide the
    refusal behind an error of this clean-up."""
    with contextlib.suppress(OSError):
        (out / "train.log").unlink(missing_ok=True)
        if made is None:
            return
        for folder in [out, *out.parents]:
            if any(folder.iterdir()):
                return
            folder.rmdir()
            if folder == made:
                return


def clear_run(out: Path) -> None:
    """Delete a previous run's results (config.yaml and train.log are being rewritten by the new run). Evaluations
    saved inside the run folder are the user's: they stay, with a warning that they describe the old model."""
    for name in RUN_RESULTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in sorted(out.iterdir()):
        if path.is_dir() and (path / "metrics.json").is_file():
            log.warning("%s: an evaluation of the replaced run; its figures do not describe the new one", path)


def drop_log_head(handler: logging.Handler, path: Path, start: int) -> None:
    """Keep only the bytes of train.log from `start` on (this run's lines): a replaced run's log goes with it.
    The handler appends, so its next lines follow what is kept."""
    if not start or path.is_symlink():  # a linked log may be shared with other runs: leave it whole
        return
    handler.flush()
    with open(path, "r+b") as f:
        f.seek(start)
        kept = f.read()
        f.seek(0)
        f.write(kept)
        f.truncate()


def run_environment(out: Path, env: dict, resume: bool) -> dict:
    """model.json's `environment`: this call's, or for a resumed run the first call's (model/environment.json,
    written when the run began) with this one appended to `resumed` (the code or libraries may have changed)."""
    if not resume:
        return env
    try:
        first = json.loads((out / "model" / ENVIRONMENT_FILE).read_text())
    except (OSError, ValueError):
        first = None  # a run started before runs recorded it
    if not isinstance(first, dict):
        return env
    later = {k: env[k] for k in ("at", "skincancer", "git", "packages", "device") if k in env}
    if env.get("data") != first.get("data"):
        later["data"] = env.get("data")
    return {**first, "resumed": [*first.get("resumed", []), later]}


def write_fitted_images(model_dir: Path, train_keys: list, valid_keys: list, fitted_on_valid: bool = False,
                        inherited: dict | None = None) -> None:
    """model/fitted_images.json: the SHA-1 of every training and validation image's bytes, so that `evaluate` can
    say when it is scoring images this model was fitted or tuned on (whatever their names or folders).

    "train": the images the weights were fitted on (validation images too for a probe fitted on train+valid);
    "valid": the images only used to choose the threshold, epoch or regularisation; "inherited": the same two for
    the run its weights started from (`init_from`), kept when the file is written again (a resume, distillation)."""
    fitted, tuned = (train_keys + valid_keys, []) if fitted_on_valid else (train_keys, valid_keys)
    keys = {split: sorted({k for k in chosen if k is not None}) for split, chosen in (("train", fitted),
                                                                                      ("valid", tuned))}
    path = model_dir / FITTED_IMAGES_FILE
    if inherited is None:
        try:
            inherited = json.loads(path.read_text()).get("inherited")
        except (OSError, ValueError, AttributeError):
            inherited = None
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {"hash": "sha1", **keys, **({"inherited": inherited} if inherited else {})})


def warn_shared_images(train_df: pd.DataFrame, valid_df: pd.DataFrame, keys: list | None = None,
                        valid_source: str = "valid") -> None:
    """Images in both splits (identical bytes, whatever their names) make validation optimistic: name them (the
    first ten). Validation made only of training images would choose nothing honestly: an error.
    keys: content_keys of the training then the validation files (computed when not given)."""
    paths = [*train_df["filepath"], *valid_df["filepath"]]
    keys = content_keys(paths) if keys is None else keys
    n = len(train_df)
    shared = [g for g in same_key(keys) if min(g) < n <= max(g)]
    in_train = {i for group in shared for i in group if i >= n}  # validation images with a training twin
    if len(in_train) == len(valid_df):
        raise DataError(f"{valid_source}: every validation image is also a training image (identical bytes); "
                        "validation needs images the model is not trained on")
    for group in shared[:10]:
        log.warning("valid: %s is also in train as %s (identical bytes)", ", ".join(paths[i] for i in group if i >= n),
                    ", ".join(paths[i] for i in group if i < n))
    if shared:
        more = f" (those of {len(shared) - 10} more groups not listed)" if len(shared) > 10 else ""
        log.warning("%d validation image(s) are also training images%s: validation figures are optimistic",
                    len(in_train), more)


def readable(frame: pd.DataFrame, source: str, split: str) -> pd.DataFrame:
    """The manifest's rows whose files decode; unreadable ones are named and left out. None left is an error, and
    a manifest none of whose files exists says so (moved or deleted since indexing)."""
    if not any(os.path.isfile(path) for path in frame["filepath"]):
        shown = "\n  ".join(frame["filepath"][:5]) + ("\n  ..." if len(frame) > 5 else "")
        raise DataError(f"{source}: none of the {split} manifest's {len(frame)} files exists (moved or deleted "
                        f"since indexing? re-run `skincancer index`):\n  {shown}")
    bad = check_files(list(frame["filepath"]), desc=f"checking {split} images")
    if not bad:
        return frame
    report_bad([(i, item.reason) for i, item in enumerate(bad)], pd.Series([item.path for item in bad]), split)
    if len(bad) == len(frame):
        raise DataError(f"{source}: none of the {len(frame)} {split} images can be read (listed above)")
    log.warning("%s: %d of %d images cannot be read and are left out", source, len(bad), len(frame))
    return frame[~frame["filepath"].isin({item.path for item in bad})].reset_index(drop=True)


def report_bad(errors: list, paths: pd.Series, split: str) -> None:
    for index, reason in errors:
        log.warning("%s: skipped %s: %s", split, paths.iloc[index], reason)


def log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


class NoWriter:
    """Stands in for SummaryWriter on ranks other than 0: only rank 0 writes the run folder."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

