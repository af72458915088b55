"""Data: index folder-per-class trees and ISIC CSVs into manifests; check images (decoded by images.py). No torch:
`skincancer index` starts in a second. The torch Dataset and the transforms are in datasets.py."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import atomic_write
from .errors import DataError, ImageError  # noqa: F401 (raised here; imported from here too)
from .images import (  # noqa: F401 (decoding lives in images.py, torch-free; imported from here too)
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    MIN_SIDE,
    check_image,
    load_image,
    to_rgb,
)
from .progress import progress

MANIFEST_COLUMNS = ["image_id", "filepath", "diagnosis", "label"]


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


# ---------------------------------------------------------------- images


def check_files(paths: Sequence[str | Path], desc: str = "checking images") -> list[BadFile]:
    bad = []
    for path in progress(paths, desc=desc, unit="img", leave=False, disable=len(paths) < 50):
        reason = check_image(path)
        if reason is not None:
            bad.append(BadFile(str(path), reason))
    return bad


# ---------------------------------------------------------------- indexing


def index_folder(root: str | Path, labels: dict[str, int]) -> pd.DataFrame:
    """A folder-per-class tree (root/<diagnosis>/*.jpg) -> manifest with absolute file paths (not yet checked)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders found (expected {root}/<diagnosis>/<image files>)")
    unknown = [p.name for p in class_dirs if p.name not in labels]
    if unknown:
        raise DataError(
            f"{root}: class folder(s) {', '.join(map(repr, unknown))} not in the label map {labels}; "
            "index or train with --labels NAME=0|1,... to include them (a model evaluates its own classes only)"
        )
    # every class folder is in the label map by now, so its names are all the class names there are
    class_names = {name.strip().casefold() for name in labels}
    rows = []
    for class_dir in class_dirs:
        others = class_names - {class_dir.name.strip().casefold()}
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                rows.append((path.stem, str(path.absolute()), class_dir.name, labels[class_dir.name]))
            elif path.name.strip().casefold() in others and path.is_dir():
                # melanoma/nevus/x.jpg would silently be labelled melanoma; melanoma/batch1/x.jpg and the
                # melanoma/melanoma/x.jpg some archives unpack to are fine
                raise DataError(f"{path}: folder named like a class inside class folder {class_dir.name!r}; it "
                                f"looks like a misplaced class folder (its images would be labelled "
                                f"{class_dir.name!r}): move it to {root} or rename it")
    if not rows:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders")
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    # image_id is the file name without extension (ISIC_0000000), unless that name occurs twice in the tree
    # (nevus/001.jpg and melanoma/001.jpg): then the path under root, without extension, keeps ids unique
    clash = frame["image_id"].duplicated(keep=False)
    frame.loc[clash, "image_id"] = [Path(f).relative_to(root.absolute()).with_suffix("").as_posix()
                                    for f in frame.loc[clash, "filepath"]]
    return frame


def read_csv_checked(path: str | Path, required: Iterable[str], dtype: type | dict | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=dtype)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns)) or 'none'}"
        )
    return frame


def plain(value: object) -> object:
    """numpy scalars as Python values, so that messages read 2, not np.int64(2)."""
    return value.item() if isinstance(value, np.generic) else value


def file_row(frame: pd.DataFrame, mask: pd.Series) -> int:
    """The file row (the header is row 1) of the first True in `mask`."""
    return int(np.flatnonzero(mask.to_numpy())[0]) + 2


def refuse_duplicates(path: str | Path, frame: pd.DataFrame, column: str, values: pd.Series) -> None:
    """A repeated image would count twice in n and narrow every confidence interval: name it and its rows."""
    repeated = values.duplicated(keep=False)
    if repeated.any():
        first = values[repeated].iloc[0]
        rows = (np.flatnonzero((values == first).to_numpy()) + 2).tolist()
        shown = frame.loc[values == first, column].iloc[0]
        raise DataError(f"{path}: {column} {plain(shown)!r} appears more than once (rows "
                        f"{', '.join(map(str, rows))}); each image must be listed once")


def same_content(paths: Sequence[str | Path]) -> list[list[int]]:
    """Groups (indices into `paths`) of files with byte-identical content; unreadable files are left out.

    The ISIC 2017 release has such copies under different ids, within and across its splits."""
    return same_key(content_keys(paths))


def same_key(keys: Sequence[str | None]) -> list[list[int]]:
    """Groups (indices) of equal keys, as from content_keys; None keys are left out."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return [group for group in groups.values() if len(group) > 1]


def content_keys(paths: Iterable[str | Path]) -> list[str | None]:
    """SHA-1 of each file's bytes (the feature cache's key); None where the file cannot be read."""
    keys: list[str | None] = []
    for path in paths:
        try:
            keys.append(hashlib.sha1(Path(path).read_bytes()).hexdigest())
        except (OSError, ValueError):  # ValueError: a NUL in the path
            keys.append(None)
    return keys


def refuse_conflicting_copies(manifest: pd.DataFrame, source: str) -> list[list[int]]:
    """The same image filed under two labels is an error naming both files; same-label copies come back (as row
    groups) for the caller to report."""
    groups = same_content(list(manifest["filepath"]))
    labels = manifest["label"].to_numpy()
    for group in groups:
        if len(set(labels[group])) > 1:
            files = ", ".join(f"{manifest['filepath'].iloc[i]} ({manifest['diagnosis'].iloc[i]})" for i in group)
            raise DataError(f"{source}: the same image (identical bytes) is labelled both malignant and benign: "
                            f"{files}")
    return groups


def save_manifest(manifest: pd.DataFrame, path: str | Path) -> Path:
    """Write the manifest with file paths relative to the manifest's own folder (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = manifest.copy()
    out["filepath"] = [os.path.relpath(p, path.parent.absolute()) for p in out["filepath"]]
    atomic_write(path, lambda tmp: out.to_csv(tmp, index=False))  # a fresh temporary name, never a user's file
    return path


TEXT_COLUMNS = ("image_id", "filepath", "diagnosis")


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV; file paths come back absolute."""
    path = Path(path)
    # identifiers and names as written: an image_id 001 stays 001, not 1
    frame = read_csv_checked(path, ["filepath", "label"], dtype=dict.fromkeys(TEXT_COLUMNS, str))
    if frame.empty:
        raise DataError(f"{path}: manifest has no rows")
    for column in ("filepath", "label", "diagnosis"):
        if column not in frame.columns:
            continue
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            raise DataError(f"{path}: row {file_row(frame, empty)}: column {column} is empty")
    nul = frame["filepath"].str.contains("\x00", regex=False)
    if nul.any():
        raise DataError(f"{path}: row {file_row(frame, nul)}: column filepath holds a NUL character")
    bad = ~frame["label"].isin([0, 1]) | frame["label"].map(lambda v: isinstance(v, (bool, np.bool_)))
    if bad.any():
        raise DataError(f"{path}: row {file_row(frame, bad)}: column label must hold 0 or 1, found "
                        f"{plain(frame.loc[bad, 'label'].iloc[0])!r}")
    frame["label"] = frame["label"].astype(int)
    if "image_id" in frame.columns:
        refuse_duplicates(path, frame, "image_id", frame["image_id"].astype(str))
    else:
        frame["image_id"] = [Path(p).stem for p in frame["filepath"].astype(str)]
    if "diagnosis" in frame.columns:
        _refuse_label_conflicts(path, frame)
    else:
        frame["diagnosis"] = frame["label"].map({0: "benign", 1: "malignant"})
        frame.attrs["diagnosis_from_label"] = True  # no diagnosis column: nothing to check against a label map
    base = path.parent.absolute()
    frame["filepath"] = [os.path.normpath(p if os.path.isabs(p) else base / p) for p in frame["filepath"].astype(str)]
    refuse_duplicates(path, frame, "filepath", frame["filepath"])
    return frame


def manifest_labels(frame: pd.DataFrame) -> dict[str, int]:
    """The manifest's own label map: each diagnosis and the label its rows carry."""
    if frame.attrs.get("diagnosis_from_label"):
        return {}
    pairs = frame.dropna(subset=["diagnosis"]).groupby("diagnosis", sort=True)["label"].first()
    return {str(d): int(label) for d, label in pairs.items()}


def check_labels_agree(frame: pd.DataFrame, labels: dict[str, int], source) -> None:
    """The manifest's labels must be the label map's: a model built from the map and scored against the manifest's
    `label` column would report figures for another question than the one it answers."""
    own = manifest_labels(frame)
    conflicts = [(d, label, labels[d]) for d, label in own.items() if d in labels and labels[d] != label]
    if conflicts:
        d, label, mapped = conflicts[0]
        raise DataError(f"{source}: diagnosis {d!r} is labelled {label} in the manifest but {mapped} in the label map "
                        f"({', '.join(f'{k}={v}' for k, v in labels.items())}); to use the manifest's labels, pass "
                        f"--labels {','.join(f'{k}={v}' for k, v in own.items())}")


def _refuse_label_conflicts(path: Path, frame: pd.DataFrame) -> None:
    """One diagnosis, one label: melanoma rows labelled 1 and 0 in the same manifest are a labelling mistake."""
    for diagnosis, labels in frame.dropna(subset=["diagnosis"]).groupby("diagnosis", sort=True)["label"]:
        if labels.nunique() > 1:
            rows = [int(np.flatnonzero((frame["diagnosis"] == diagnosis).to_numpy() & (frame["label"] == value)
                                       .to_numpy())[0]) + 2 for value in (0, 1)]
            raise DataError(f"{path}: diagnosis {plain(diagnosis)!r} has label 0 (row {rows[0]}) and label 1 "
                            f"(row {rows[1]}); one diagnosis must map to one label")


def resolve_data(source: str | Path, labels: dict[str, int]) -> pd.DataFrame:
    """A manifest CSV or a folder-per-class directory (indexed on the fly) -> manifest."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if source.is_dir():
        return index_folder(source, labels)
    if source.suffix.lower() == ".csv":
        return load_manifest(source)
    raise DataError(f"{source}: expected a manifest .csv or a folder-per-class directory")
