"""Data sources: one diagnosis vocabulary, the HAM10000 and ISIC 2018/2019 ground-truth layouts, lesion groups and
the grouped folds every split of the tool uses, and the licence each source carries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .data import IMAGE_EXTENSIONS, MANIFEST_COLUMNS, file_row, plain, read_csv_checked, refuse_duplicates
from .errors import DataError

# Every layout's diagnosis codes, as written (case-insensitive), -> the one name manifests and models use.
# HAM10000's bkl (seborrheic keratosis, solar lentigo, lichen-planus-like keratosis) joins ISIC 2017's seborrheic
# keratosis: one benign-keratosis class, so that models trained on either source share it (docs/data.md).
VOCABULARY = {
    "mel": "melanoma", "melanoma": "melanoma",
    "nv": "nevus", "nevus": "nevus",
    "bkl": "seborrheic_keratosis", "sk": "seborrheic_keratosis", "seborrheic_keratosis": "seborrheic_keratosis",
    "bcc": "basal_cell_carcinoma", "basal_cell_carcinoma": "basal_cell_carcinoma",
    "akiec": "actinic_keratosis", "ak": "actinic_keratosis", "actinic_keratosis": "actinic_keratosis",
    "scc": "squamous_cell_carcinoma", "squamous_cell_carcinoma": "squamous_cell_carcinoma",
    "vasc": "vascular_lesion", "vascular_lesion": "vascular_lesion",
    "df": "dermatofibroma", "dermatofibroma": "dermatofibroma",
    "unk": "unknown",
}

# Known sources' terms, as their publishers state them. A model lists the sources it learnt from with these.
LICENCES = {
    "isic2017": "ISIC Archive terms (research use, attribution)",
    "isic2018": "CC BY-NC 4.0",
    "isic2019": "CC BY-NC 4.0",
    "ham10000": "CC BY-NC 4.0",
}
UNSTATED = "not stated"

HAM_COLUMNS = ("lesion_id", "image_id", "dx")
ISIC2017_COLUMNS = ("image_id", "melanoma", "seborrheic_keratosis")
ONEHOT_2018 = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ONEHOT_2019 = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")  # and UNK, empty in the training set


def licence_of(source: str) -> str:
    return LICENCES.get(source.strip().lower(), UNSTATED)


def is_non_commercial(licence: str) -> bool:
    return "-NC" in licence.upper().replace(" ", "-") or "NON-COMMERCIAL" in licence.upper()


def csv_layout(columns: Sequence[str]) -> str:
    """Which ground-truth layout a CSV's header is: 'isic2017', 'isic2018', 'isic2019' or 'ham10000'."""
    have = set(columns)
    if set(ISIC2017_COLUMNS) <= have:
        return "isic2017"
    if set(HAM_COLUMNS) <= have:
        return "ham10000"
    if "image" in have and set(ONEHOT_2019) <= have:
        return "isic2019"
    if "image" in have and set(ONEHOT_2018) <= have:
        return "isic2018"
    raise DataError(f"not a known ground-truth layout: columns {', '.join(columns) or 'none'}; expected ISIC 2017 "
                    f"({','.join(ISIC2017_COLUMNS)}), ISIC 2018 or 2019 (image,{','.join(ONEHOT_2018[:3])},...) or "
                    f"the HAM10000 metadata ({','.join(HAM_COLUMNS)},...)")


def diagnosis_name(code: object, where: str) -> str:
    name = VOCABULARY.get(str(code).strip().lower()) if not pd.isna(code) else None
    if name is None:
        raise DataError(f"{where}: diagnosis {code!r} is not one of {', '.join(sorted(set(VOCABULARY)))}")
    return name


def read_ham(frame: pd.DataFrame, csv_path: str | Path) -> pd.DataFrame:
    """HAM10000 metadata rows -> image_id, diagnosis, group (the lesion), age_approximate, sex, anatom_site,
    dx_type (how the diagnosis was made)."""
    for column in HAM_COLUMNS:
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            raise DataError(f"{csv_path}: row {int(np.flatnonzero(empty.to_numpy())[0]) + 2}: column {column} is empty")
    out = pd.DataFrame({
        "image_id": frame["image_id"].astype(str).str.strip(),
        "diagnosis": [diagnosis_name(dx, f"{csv_path}: row {i + 2}") for i, dx in enumerate(frame["dx"])],
        "group": frame["lesion_id"].astype(str).str.strip(),
    })
    renamed = {"age": "age_approximate", "sex": "sex", "localization": "anatom_site", "dx_type": "dx_type"}
    for column, name in renamed.items():
        if column in frame:
            out[name] = frame[column].fillna("unknown").to_numpy()
    return out


def read_onehot(frame: pd.DataFrame, csv_path: str | Path, layout: str) -> pd.DataFrame:
    """ISIC 2018 / 2019 one-hot ground truth -> image_id, diagnosis (exactly one 1 per row)."""
    codes = [c for c in (*(ONEHOT_2019 if layout == "isic2019" else ONEHOT_2018), "UNK") if c in frame.columns]
    values = np.empty((len(frame), len(codes)))
    for j, code in enumerate(codes):
        numbers = pd.to_numeric(frame[code], errors="coerce")
        bad = numbers.isna() | ~numbers.isin((0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{csv_path}: row {i + 2} ({frame['image'].iloc[i]}): column {code} must be 0 or 1, got "
                            f"{frame[code].iloc[i]!r}")
        values[:, j] = numbers.to_numpy()
    ones = values.sum(1)
    if (ones != 1).any():
        i = int(np.flatnonzero(ones != 1)[0])
        raise DataError(f"{csv_path}: row {i + 2} ({frame['image'].iloc[i]}): {int(ones[i])} diagnosis columns are "
                        "1; an image has exactly one")
    return pd.DataFrame({"image_id": frame["image"].astype(str).str.strip(),
                         "diagnosis": [VOCABULARY[codes[j].lower()] for j in values.argmax(1)]})


# ---------------------------------------------------------------- groups and folds


def fold_groups(frame: pd.DataFrame, keys: Sequence[str | None] | None = None) -> np.ndarray:
    """One integer per row: rows of the same lesion (the manifest's `group` column, within a source) or with the same
    file content (`keys`, as data.content_keys) share it, so no split puts one lesion on both sides."""
    n = len(frame)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(rows: Sequence[int]) -> None:
        first = root(rows[0])
        for i in rows[1:]:
            parent[root(i)] = first

    labels = []
    if "group" in frame:
        source = frame["source"].astype(str) if "source" in frame else pd.Series([""] * n, index=frame.index)
        group = frame["group"].astype(str).str.strip().where(frame["group"].notna(), "")
        labels.append([None if g.lower() in ("", "nan", "none") else (s, g)
                       for s, g in zip(source, group, strict=True)])
    if keys is not None:
        if len(keys) != n:
            raise ValueError(f"fold_groups: {len(keys)} keys for {n} rows")
        labels.append(list(keys))
    for column in labels:
        rows: dict = {}
        for i, label in enumerate(column):
            if label is not None:
                rows.setdefault(label, []).append(i)
        for members in rows.values():
            if len(members) > 1:
                join(members)
    return np.array([root(i) for i in range(n)])


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold that keeps each group on one side (scikit-learn's StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.asarray(y), np.asarray(groups)
    if len(np.unique(groups)) < folds:
        raise DataError(f"{len(np.unique(groups))} lesions: too few for {folds}-fold cross-validation")
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


# ---------------------------------------------------------------- indexing


def index_csv(csv_path: str | Path, images: str | Path, labels: dict[str, int], source: str | None = None,
              licence: str | None = None) -> pd.DataFrame:
    """Any known ground-truth CSV (ISIC 2017, ISIC 2018/2019 one-hot, HAM10000 metadata) + its image folder ->
    manifest with source, licence and, where the layout knows lesions, group. Images missing from the folder keep
    an empty-looking path, for the caller to report with the other bad files."""
    csv_path, images = Path(csv_path), Path(images)
    frame = read_csv_checked(csv_path, [], dtype=str)
    try:
        layout = csv_layout([str(c) for c in frame.columns])
    except DataError as err:
        raise DataError(f"{csv_path}: {err}") from None
    if layout == "isic2017":
        manifest = index_isic_csv(csv_path, images, labels)
    else:
        if not images.is_dir():
            raise DataError(f"{images}: not a directory")
        rows = read_ham(frame, csv_path) if layout == "ham10000" else read_onehot(frame, csv_path, layout)
        repeated = rows["image_id"].duplicated(keep=False)
        if repeated.any():
            where = (np.flatnonzero(repeated.to_numpy()) + 2).tolist()
            raise DataError(f"{csv_path}: image {rows['image_id'][repeated].iloc[0]!r} appears more than once (rows "
                            f"{', '.join(map(str, where[:5]))}); each image must be listed once")
        unmapped = sorted(set(rows["diagnosis"]) - set(labels))
        if unmapped:
            counts = rows["diagnosis"].value_counts()
            raise DataError(f"{csv_path}: diagnosis {', '.join(f'{d} ({counts[d]} images)' for d in unmapped)} not in "
                            f"the label map ({', '.join(f'{k}={v}' for k, v in labels.items())}); add it to --labels")
        by_id = {p.stem: p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
        paths = [str(by_id[i].absolute()) if i in by_id else str(images.absolute() / f"{i}.jpg")
                 for i in rows["image_id"]]
        manifest = rows.assign(filepath=paths, label=rows["diagnosis"].map(labels).astype(int))
    return with_source(manifest, source or layout, licence)


def index_isic_csv(csv_path: str | Path, images: str | Path, labels: dict[str, int]) -> pd.DataFrame:
    """Official ISIC 2017 ground truth (image_id,melanoma,seborrheic_keratosis) + an image folder -> manifest.

    Images are found by id anywhere under `images` (flat or folder-per-class). Missing images are kept with an
    empty filepath so that the caller reports them with the rest of the bad files.
    """
    frame = read_csv_checked(csv_path, ISIC2017_COLUMNS, dtype=str)  # cells as written, for the messages
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: not a directory")
    by_id = {p.stem: p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
    empty = frame["image_id"].isna() | (frame["image_id"].str.strip() == "")
    if empty.any():
        raise DataError(f"{csv_path}: row {file_row(frame, empty)}: column image_id is empty")
    refuse_duplicates(csv_path, frame, "image_id", frame["image_id"])
    rows = []
    for i, row in frame.iterrows():
        image_id = str(row["image_id"])
        where = f"{csv_path}: row {i + 2} ({image_id})"
        melanoma = _isic_flag(row["melanoma"], where, "melanoma")
        keratosis = _isic_flag(row["seborrheic_keratosis"], where, "seborrheic_keratosis")
        if melanoma and keratosis:
            raise DataError(f"{where}: columns melanoma and seborrheic_keratosis are both 1; an image has one "
                            "diagnosis (both 0 means nevus)")
        diagnosis = "melanoma" if melanoma else "seborrheic_keratosis" if keratosis else "nevus"
        if diagnosis not in labels:
            raise DataError(f"{csv_path}: diagnosis {diagnosis!r} (row {i + 2}) not in the label map {labels}")
        path = by_id.get(image_id)
        rows.append((image_id, str(path.absolute()) if path else str(images / f"{image_id}.jpg"), diagnosis,
                     labels[diagnosis]))
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _isic_flag(value: object, where: str, column: str) -> bool:
    """One ground-truth cell: 0 or 1 (the official files write 0.0 / 1.0); anything else names the cell."""
    if pd.isna(value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: column {column} is empty; expected 0 or 1")
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number not in (0.0, 1.0):
        raise DataError(f"{where}: column {column} must be 0 or 1, got {plain(value)!r}")
    return number == 1.0


def with_source(manifest: pd.DataFrame, source: str, licence: str | None = None) -> pd.DataFrame:
    """The manifest with its source and licence columns, after image_id, filepath, diagnosis, label."""
    if not source.strip():
        raise DataError("--source: the source's name is empty")
    out = manifest.assign(source=source.strip(), licence=(licence or licence_of(source)).strip())
    first = ["image_id", "filepath", "diagnosis", "label", "source", "group", "licence"]
    return out[[c for c in first if c in out] + [c for c in out if c not in first]]


def read_sources(paths: Sequence[str | Path], labels: dict[str, int]) -> pd.DataFrame:
    """One or several manifests (or folder-per-class trees) -> one manifest. Each row has its source (the manifest's
    own column, else the file's or folder's name) and that source's licence; an image listed twice is an error."""
    from .data import resolve_data

    frames = []
    for path in paths:
        frame = resolve_data(path, labels)
        name = Path(path).stem if Path(path).is_file() else Path(path).name
        frame["source"] = frame["source"].fillna(name).astype(str) if "source" in frame else name
        if "licence" not in frame:
            frame["licence"] = frame["source"].map(licence_of)
        frame["licence"] = frame["licence"].fillna(frame["source"].map(licence_of)).astype(str)
        frames.append(frame)
    if len(frames) == 1:
        return frames[0]
    joined = pd.concat(frames, ignore_index=True)
    joined.attrs = {"diagnosis_from_label": True} if all(f.attrs.get("diagnosis_from_label") for f in frames) else {}
    where = np.repeat(np.arange(len(frames)), [len(f) for f in frames])
    for column in ("image_id", "filepath"):
        repeated = joined[column].astype(str).duplicated(keep=False).to_numpy()
        if repeated.any():
            first = joined[column][repeated].iloc[0]
            named = sorted({str(paths[i]) for i in where[joined[column].astype(str) == str(first)]})
            raise DataError(f"{' and '.join(named)}: {column} {first!r} is in more than one training manifest; a "
                            "source must not repeat another's images (HAM10000 is part of ISIC 2018 and 2019)")
    return joined


def source_table(train_df: pd.DataFrame, valid_df: pd.DataFrame) -> list[dict]:
    """The sources a model learnt from, with their licences and image counts, for model.json and the card."""
    rows: dict[str, dict] = {}
    for split, frame in (("train", train_df), ("valid", valid_df)):
        if "source" not in frame:
            continue
        for (source, licence), n in frame.groupby(["source", "licence"], sort=True).size().items():
            row = rows.setdefault(str(source), {"name": str(source), "licence": str(licence), "train_images": 0,
                                                "valid_images": 0})
            row[f"{split}_images"] += int(n)
            if str(licence) not in row["licence"].split("; "):
                row["licence"] += f"; {licence}"
    return list(rows.values())


def inherited_sources(sources: Sequence[dict] | None, through: str) -> list[dict]:
    """The data another model learnt from (a teacher, starting weights), as rows of this model's `sources`: their
    licences travel on. None (that model predates the record) gives one row that says so."""
    unknown = {"name": "data not recorded", "licence": "not recorded: check the training data of that model",
               "train_images": 0, "valid_images": 0}
    return [{**source, "name": f"{source['name']} ({through})"} for source in (sources or [unknown])]


def starting_sources(meta: dict) -> list[dict]:
    """The `sources` rows a fine-tune inherits from the run it started from (model.json's `initialised_from`)."""
    start = meta.get("initialised_from")
    return inherited_sources(start["sources"], f"through the starting weights {start['run']}") if start else []


def licence_note(sources: Sequence[dict]) -> str | None:
    """What a model's training data allows, in a sentence; None when no source restricts it."""
    restricted = [s for s in sources if is_non_commercial(s.get("licence", ""))]
    if not restricted:
        return None
    licences = "; ".join(dict.fromkeys(s["licence"] for s in restricted))
    return f"For non-commercial use ({licences}): this model learnt from {', '.join(s['name'] for s in restricted)}."
