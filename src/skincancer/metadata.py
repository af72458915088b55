"""Patient metadata (approximate age, sex): reading it, and late fusion with an image model's probabilities.

The image model stays image-only. Beside it, a small multinomial logistic regression learns p(class | age, sex) on
the training images' metadata. Where a prediction comes with metadata, the two are combined as independent evidence
(Bayes' rule): p(class | image, metadata) is proportional to p(class | image) * p(class | metadata) / p(class),
with p(class) the metadata model's training class frequencies. Without metadata the image model's probabilities
are returned unchanged, so one model serves images with and without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from .data import DataError

COLUMNS = ("age_approximate", "sex")
SEXES = ("male", "female")
MISSING = ("", "unknown", "nan", "none", "na", "n/a")
FEATURES = ["age", "age_squared", "age_unknown", "male", "female"]


class MetadataError(DataError):
    """Metadata that cannot be read or understood; the message names the file, row or field."""


def parse_age(value, where: str = "age", typed: bool = False) -> float | None:
    """An age in years (None where unknown); rejects text that is neither a number nor 'unknown'.

    typed: a value a person typed (a flag, a form field), where NaN is a mistake, not a CSV's empty cell."""
    text = value.strip().lower() if isinstance(value, str) else None
    if typed and (text == "nan" or (isinstance(value, float) and math.isnan(value))):
        raise MetadataError(f"{where}: 'nan' is not an age in years (leave it out when unknown)")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if text is not None:
        if text in MISSING:
            return None
        try:
            value = float(value)
        except ValueError:
            raise MetadataError(f"{where}: {value!r} is not an age in years (or 'unknown')") from None
    age = float(value)
    if not 0 <= age <= 120:
        raise MetadataError(f"{where}: {age:g} is not an age in years (0-120)")
    return age


def parse_sex(value, where: str = "sex") -> str | None:
    """'male' / 'female' (None where unknown)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in MISSING:
        return None
    text = {"m": "male", "f": "female"}.get(text, text)
    if text not in SEXES:
        raise MetadataError(f"{where}: {value!r} is not one of male, female, unknown")
    return text


def encode(age: float | None, sex: str | None) -> np.ndarray:
    """The metadata model's inputs: [age/100, (age/100)^2, age unknown, male, female]."""
    a = 0.0 if age is None else age / 100
    return np.array([a, a * a, float(age is None), float(sex == "male"), float(sex == "female")])


def records(frame: pd.DataFrame, source: str = "metadata") -> list[dict | None]:
    """One {'age', 'sex'} per row of a frame with age_approximate / sex columns (either may be absent); None for
    rows where both are unknown."""
    rows: list[dict | None] = []
    ages = frame["age_approximate"] if "age_approximate" in frame else pd.Series([None] * len(frame))
    sexes = frame["sex"] if "sex" in frame else pd.Series([None] * len(frame))
    for i, (age, sex) in enumerate(zip(ages, sexes, strict=True)):
        age = parse_age(age, f"{source}, row {i + 1}, age_approximate")
        sex = parse_sex(sex, f"{source}, row {i + 1}, sex")
        rows.append(None if age is None and sex is None else {"age": age, "sex": sex})
    return rows


def read_metadata_csv(path: str | Path) -> pd.DataFrame:
    """An ISIC metadata CSV (image_id, age_approximate, sex), checked; indexed by image_id."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MetadataError(f"{path}: not a readable CSV ({err})") from None
    if "image_id" not in frame.columns or not set(COLUMNS) & set(frame.columns):
        raise MetadataError(f"{path}: expected columns image_id and age_approximate and/or sex, "
                            f"found {', '.join(frame.columns) or 'none'}")
    if frame["image_id"].duplicated().any():
        raise MetadataError(f"{path}: image_id {frame['image_id'][frame['image_id'].duplicated()].iloc[0]!r} "
                            "appears twice")
    records(frame, str(path))  # every value is checked here, naming the row
    return frame.set_index("image_id")[[c for c in COLUMNS if c in frame.columns]]


def attach(manifest: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """The manifest with age_approximate / sex columns joined on image_id ('unknown' where an image has none)."""
    out = manifest.drop(columns=[c for c in COLUMNS if c in manifest.columns])
    joined = out.join(metadata, on="image_id")
    for column in COLUMNS:
        if column in joined:
            joined[column] = joined[column].fillna("unknown")
    return joined


def has_metadata(frame: pd.DataFrame) -> bool:
    return any(column in frame.columns for column in COLUMNS)


class MetadataModel:
    """p(class | age, sex) by multinomial logistic regression, with its training class frequencies."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, prior: np.ndarray):
        self.coef, self.intercept, self.prior = np.asarray(coef), np.asarray(intercept), np.asarray(prior)

    @classmethod
    def fit(cls, rows: Sequence[dict | None], targets: np.ndarray, num_classes: int, c: float = 1.0,
            ) -> MetadataModel:
        """Fit on the rows that have metadata; needs every class present among them."""
        keep = [i for i, row in enumerate(rows) if row is not None]
        y = np.asarray(targets)[keep]
        if len(keep) == 0 or len(np.unique(y)) < num_classes:
            raise MetadataError(f"metadata: {len(keep)} training images have age or sex, "
                                "and not every class is among them; cannot fit the metadata model")
        x = np.stack([encode(rows[i]["age"], rows[i]["sex"]) for i in keep])
        clf = LogisticRegression(C=c, max_iter=2000).fit(x, y)
        coef, intercept = clf.coef_, clf.intercept_
        if num_classes == 2:  # sklearn's binary case has one row of weights for class 1
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        prior = np.bincount(y, minlength=num_classes) / len(y)
        return cls(coef, intercept, prior)

    def proba(self, age: float | None, sex: str | None) -> np.ndarray:
        logits = self.coef @ encode(age, sex) + self.intercept
        logits = logits - logits.max()
        return np.exp(logits) / np.exp(logits).sum()

    def fuse(self, probs: np.ndarray, rows: Sequence[dict | None] | None) -> np.ndarray:
        """Image probabilities [N, classes] combined with each row's metadata; rows without metadata (None), and
        NaN rows (unreadable images), come back unchanged."""
        if rows is None:
            return probs
        if len(rows) != len(probs):
            raise MetadataError(f"metadata: {len(rows)} rows for {len(probs)} images")
        fused = probs.copy()
        for i, row in enumerate(rows):
            if row is None or np.isnan(probs[i]).any():
                continue
            weights = np.clip(probs[i], 1e-12, None) * self.proba(row.get("age"), row.get("sex")) / self.prior
            fused[i] = weights / weights.sum()
        return fused

    def to_dict(self) -> dict:
        return {"features": FEATURES, "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "prior": self.prior.tolist(), "fusion": "bayes"}

    @classmethod
    def from_dict(cls, values: Mapping) -> MetadataModel:
        if list(values.get("features", [])) != FEATURES:
            raise MetadataError(f"metadata model: features {values.get('features')} differ from {FEATURES}")
        return cls(values["coef"], values["intercept"], values["prior"])


def normalise_rows(metadata, n: int) -> list[dict | None] | None:
    """Accept None, a list of dicts/None (keys age or age_approximate, sex) or a DataFrame; check every value."""
    if metadata is None:
        return None
    if isinstance(metadata, pd.DataFrame):
        rows = records(metadata)
    else:
        rows = []
        for i, item in enumerate(metadata):
            if item is None:
                rows.append(None)
                continue
            age = parse_age(item.get("age", item.get("age_approximate")), f"metadata[{i}].age")
            sex = parse_sex(item.get("sex"), f"metadata[{i}].sex")
            rows.append(None if age is None and sex is None else {"age": age, "sex": sex})
    if len(rows) != n:
        raise MetadataError(f"metadata: {len(rows)} rows for {n} images")
    return rows
