"""Patient metadata (approximate age, sex): reading it, and late fusion with an image model's probabilities.

The image model stays image-only. Beside it, small multinomial logistic regressions learn p(class | age, sex),
p(class | age) and p(class | sex) on the training images where those fields are known. Where a prediction comes
with metadata, the model for the fields given and the image model are combined as independent evidence (Bayes'
rule): p(class | image, metadata) is proportional to p(class | image) * p(class | metadata) / p(class), with p(class)
that model's training class frequencies. A field not given is left out, never read as evidence. Without metadata the
image model's probabilities are returned unchanged, so one model serves images with and without it.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, MetadataError  # noqa: F401 (raised here; imported from here too)

COLUMNS = ("age_approximate", "sex")
CARRIED = ("group", "anatom_site")  # joined into a manifest as they are: the lesion (for grouped folds), the site
ALIASES = {"image": "image_id", "age_approx": "age_approximate", "lesion_id": "group",
           "anatom_site_general": "anatom_site"}
SEXES = ("male", "female")
if TYPE_CHECKING:  # pandas is imported where a frame is read or built: predicting one image needs none
    import pandas as pd
MISSING = ("", "unknown", "nan", "none", "na", "n/a")


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


def records(frame: pd.DataFrame, source: str = "metadata") -> list[dict | None]:
    """One {'age', 'sex'} per row of a frame with age_approximate / sex columns (either may be absent); None for
    rows where both are unknown."""
    import pandas as pd

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
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MetadataError(f"{path}: not a readable CSV ({err})") from None
    # ISIC 2019's layout: image, age_approx, anatom_site_general, lesion_id, sex
    frame = frame.rename(columns={k: v for k, v in ALIASES.items() if k in frame.columns and v not in frame.columns})
    if "image_id" not in frame.columns or not set(COLUMNS) & set(frame.columns):
        raise MetadataError(f"{path}: expected columns image_id and age_approximate and/or sex, "
                            f"found {', '.join(frame.columns) or 'none'}")
    if frame["image_id"].duplicated().any():
        raise MetadataError(f"{path}: image_id {frame['image_id'][frame['image_id'].duplicated()].iloc[0]!r} "
                            "appears twice")
    records(frame, str(path))  # every value is checked here, naming the row
    return frame.set_index("image_id")[[c for c in (*COLUMNS, *CARRIED) if c in frame.columns]]


def _in_image_order(frame: pd.DataFrame, n: int, ids: Sequence[str | None] | None) -> pd.DataFrame:
    """A metadata frame's rows in the images' order: by image_id where it has one, else as given."""
    import pandas as pd

    if "image_id" in frame.columns or frame.index.name == "image_id":
        keyed = frame.set_index("image_id") if "image_id" in frame.columns else frame
        keyed = keyed[~keyed.index.duplicated(keep="first")] if keyed.index.has_duplicates else keyed
        if ids is None or any(i is None for i in ids):
            raise MetadataError("metadata: matched on image_id, but not every image is a file with a name; give "
                                "a list of dicts (or a frame without image_id) in the images' order")
        return keyed.reindex([str(i) for i in ids]).reset_index(drop=True)
    if not frame.index.equals(pd.RangeIndex(len(frame))):
        raise MetadataError("metadata: a DataFrame with a reordered index and no image_id; add an image_id column "
                            "(file name without extension), or reset_index(drop=True) if its rows are in the images' "
                            "order")
    return frame


def attach(manifest: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """The manifest with age_approximate / sex columns joined on image_id ('unknown' where an image has none), and
    the lesion (`group`) and body site where the metadata gives them."""
    out = manifest.drop(columns=[c for c in (*COLUMNS, *CARRIED) if c in manifest.columns and c in metadata.columns])
    joined = out.join(metadata, on="image_id")
    for column in COLUMNS:
        if column in joined:
            joined[column] = joined[column].fillna("unknown")
    return joined


def has_metadata(frame: pd.DataFrame) -> bool:
    return any(column in frame.columns for column in COLUMNS)


# The metadata model is one logistic regression per pattern of known fields, each fitted on the training images
# where those fields are known: p(class | age, sex), p(class | age), p(class | sex). A field that is not given is
# then left out (marginalised over the training images), never read as evidence: "age unknown" was a feature once,
# and in ISIC 2017 the images without an age come from particular sources, so giving only a sex moved predictions
# by what 27 training images happened to be.
PARTS = {"age+sex": ["age", "age_squared", "male"], "age": ["age", "age_squared"], "sex": ["male"]}


def encode(age: float | None, sex: str | None, features: Sequence[str] = PARTS["age+sex"]) -> np.ndarray:
    """A metadata model's inputs, by name: age/100, (age/100)^2, male."""
    a = 0.0 if age is None else age / 100
    values = {"age": a, "age_squared": a * a, "male": float(sex == "male")}
    return np.array([values[name] for name in features])


def pattern(age: float | None, sex: str | None) -> str | None:
    """Which fields are known: 'age+sex', 'age', 'sex', or None."""
    return {(True, True): "age+sex", (True, False): "age", (False, True): "sex"}.get((age is not None,
                                                                                      sex is not None))


class _Part:
    """One pattern's logistic regression and the class frequencies of the images it was fitted on."""

    def __init__(self, features: Sequence[str], coef, intercept, prior, n: int | None = None):
        self.features, self.n = list(features), n
        self.coef, self.intercept, self.prior = np.asarray(coef), np.asarray(intercept), np.asarray(prior)

    def proba(self, age: float | None, sex: str | None) -> np.ndarray:
        logits = self.coef @ encode(age, sex, self.features) + self.intercept
        logits = logits - logits.max()
        return np.exp(logits) / np.exp(logits).sum()

    def to_dict(self) -> dict:
        return {"features": self.features, "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "prior": self.prior.tolist(), "n": self.n}


class MetadataModel:
    """p(class | the known fields of age and sex), one model per pattern of known fields (see PARTS)."""

    def __init__(self, parts: Mapping[str, _Part], prior: np.ndarray):
        self.parts, self.prior = dict(parts), np.asarray(prior)

    @classmethod
    def fit(cls, rows: Sequence[dict | None], targets: np.ndarray, num_classes: int, c: float = 1.0,
            ) -> MetadataModel:
        """A model for each pattern of known fields whose training images hold every class; at least one."""
        from sklearn.linear_model import LogisticRegression

        targets = np.asarray(targets)
        parts = {}
        for kind, features in PARTS.items():
            fields = kind.split("+")
            keep = [i for i, row in enumerate(rows) if row is not None and all(row[f] is not None for f in fields)]
            y = targets[keep]
            if len(np.unique(y)) < num_classes:
                continue  # too few images with these fields: predictions that give only them use the image alone
            x = np.stack([encode(rows[i]["age"], rows[i]["sex"], features) for i in keep])
            clf = LogisticRegression(C=c, max_iter=2000).fit(x, y)
            coef, intercept = clf.coef_, clf.intercept_
            if num_classes == 2:  # sklearn's binary case has one row of weights for class 1
                coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
            parts[kind] = _Part(features, coef, intercept, np.bincount(y, minlength=num_classes) / len(y), len(y))
        known = targets[[i for i, row in enumerate(rows) if row is not None]]
        if not parts:
            raise MetadataError(f"metadata: {len(known)} training images have age or sex, "
                                "and not every class is among them; cannot fit the metadata model")
        return cls(parts, np.bincount(known, minlength=num_classes) / len(known))

    def part(self, age: float | None, sex: str | None) -> _Part | None:
        """The model for the fields given (None: no such model, or nothing given; the image alone then)."""
        kind = pattern(age, sex)
        return self.parts.get(kind) if kind else None

    def covers(self, row: dict | None) -> bool:
        """Whether this row's age/sex change a prediction."""
        return row is not None and self.part(row.get("age"), row.get("sex")) is not None

    def proba(self, age: float | None, sex: str | None) -> np.ndarray | None:
        part = self.part(age, sex)
        return None if part is None else part.proba(age, sex)

    def fuse(self, probs: np.ndarray, rows: Sequence[dict | None] | None) -> np.ndarray:
        """Image probabilities [N, classes] combined with each row's known fields; rows without metadata (None) or
        whose fields no model covers, and NaN rows (unreadable images), come back unchanged."""
        if rows is None:
            return probs
        if len(rows) != len(probs):
            raise MetadataError(f"metadata: {len(rows)} rows for {len(probs)} images")
        fused = probs.copy()
        for i, row in enumerate(rows):
            part = self.part(row.get("age"), row.get("sex")) if row is not None else None
            if part is None or np.isnan(probs[i]).any():
                continue
            weights = np.clip(probs[i], 1e-12, None) * part.proba(row.get("age"), row.get("sex")) / part.prior
            fused[i] = weights / weights.sum()
        return fused

    def to_dict(self) -> dict:
        return {"parts": {kind: part.to_dict() for kind, part in self.parts.items()}, "prior": self.prior.tolist(),
                "fusion": "bayes"}

    @classmethod
    def from_dict(cls, values: Mapping) -> MetadataModel:
        parts = values.get("parts")
        if not isinstance(parts, Mapping) or not parts:
            raise MetadataError(f"metadata model: expected per-pattern models ({', '.join(PARTS)}), found "
                                f"{sorted(values)}")
        for kind, part in parts.items():
            if kind not in PARTS or list(part.get("features", [])) != PARTS[kind]:
                raise MetadataError(f"metadata model {kind!r}: features {part.get('features')} differ from "
                                    f"{PARTS.get(kind)}")
        return cls({kind: _Part(p["features"], p["coef"], p["intercept"], p["prior"], p.get("n"))
                    for kind, p in parts.items()}, values["prior"])


def _is_frame(value) -> bool:
    """Whether value is a pandas DataFrame, without importing pandas for a caller that never made one."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def normalise_rows(metadata, n: int, ids: Sequence[str | None] | None = None) -> list[dict | None] | None:
    """Accept None, a list of dicts/None (keys age or age_approximate, sex) or a DataFrame; check every value.
    A DataFrame with an image_id column (or index) is matched on `ids`, the images' file names without extension;
    one without is taken in order, and only with its own 0..n-1 index (a reordered one would pair wrongly)."""
    if metadata is None:
        return None
    if _is_frame(metadata):
        metadata = _in_image_order(metadata, n, ids)
    if isinstance(metadata, Mapping):  # one image's
        if n != 1:
            raise MetadataError(f"metadata: a single dict for {n} images; give a list with one dict (or None) per "
                                "image")
        metadata = [metadata]
    if _is_frame(metadata):
        rows = records(metadata)
    else:
        rows = []
        for i, item in enumerate(metadata):
            if item is None:
                rows.append(None)
                continue
            if not isinstance(item, Mapping):
                raise MetadataError(f"metadata[{i}]: expected a dict with age and/or sex, or None; got "
                                    f"{type(item).__name__}")
            unknown = sorted(set(map(str, item)) - {"age", "age_approximate", "sex"})
            if unknown:
                raise MetadataError(f"metadata[{i}]: unknown key(s) {', '.join(unknown)}; expected age (or "
                                    "age_approximate) and sex")
            age = parse_age(item.get("age", item.get("age_approximate")), f"metadata[{i}].age")
            sex = parse_sex(item.get("sex"), f"metadata[{i}].sex")
            rows.append(None if age is None and sex is None else {"age": age, "sex": sex})
    if len(rows) != n:
        raise MetadataError(f"metadata: {len(rows)} rows for {n} images")
    return rows
