"""Ensembles: average the probabilities of several trained runs; the threshold is re-chosen on their validation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import CheckpointError
from .errors import DataError
from .predict import Classifier, Deferred, load_model

if TYPE_CHECKING:  # pandas and the metrics (scipy, scikit-learn): for ensembles only, imported where used
    import pandas as pd

log = logging.getLogger("skincancer")


class Ensemble(Classifier):
    """Several classifiers over the same classes; behaves as one Classifier (predict, predictions, predict_proba)."""

    def __init__(self, members: Sequence[Classifier]):
        if len(members) < 2:
            raise CheckpointError("an ensemble needs at least two models")
        first = members[0]
        for member in members[1:]:
            if member.class_names != first.class_names or member.meta["labels"] != first.meta["labels"]:
                raise CheckpointError(
                    f"{member.source}: classes {member.class_names} differ from {first.source}'s {first.class_names}"
                )
            names, first_names = ((m.positive_name, m.negative_name) for m in (member, first))
            if names != first_names:
                raise CheckpointError(f"{member.source}: calls its outcomes {' / '.join(names)}, {first.source} "
                                      f"{' / '.join(first_names)}; ensemble members must name them alike")
            if member.meta.get("head", "diagnosis") != first.meta.get("head", "diagnosis"):
                raise CheckpointError(f"{member.source}: head {member.meta.get('head')!r} differs from "
                                      f"{first.source}'s {first.meta.get('head')!r}")
        self._members = list(members)
        meta = dict(first.meta, backbone="+".join(m.meta["backbone"] for m in members), mode="ensemble")
        meta.pop("metadata_model", None)  # each member fuses its own
        meta["unfinished"] = any(m.meta.get("unfinished") for m in members)
        meta["threshold"], meta["validation"], meta["validation_source"] = _ensemble_threshold(self._members)
        super().__init__(model=Deferred(lambda: first.model), meta=meta, source=first.source)

    @property
    def members(self) -> list[Classifier]:
        return self._members

    @property
    def engine_name(self) -> str:
        names = [m.engine_name for m in self._members]
        return names[0] if len(set(names)) == 1 else "+".join(names)

    @property
    def uses_metadata(self) -> bool:
        return any(m.uses_metadata for m in self._members)

    @property
    def has_guard(self) -> bool:
        return all(m.has_guard for m in self._members)

    def _outputs(self, images, batch_size: int, num_workers: int, tta: int | None, metadata, guarded: bool):
        """Mean of the members' probabilities (each fusing metadata if it has a metadata model); a file unreadable
        for one is unreadable for all. One guard decision: the mean of the members' out-of-distribution scores
        (each 1 at its own threshold), NaN unless every member has a guard; the frame checks of the first."""
        results = [m._outputs(images, batch_size, num_workers, tta if tta is not None else m.meta.get("tta", 1),
                              metadata, guarded) for m in self._members]
        probs = np.mean([r[0] for r in results], axis=0)
        scores = np.mean([r[2] for r in results], axis=0)
        return probs, results[0][1], scores, results[0][3]


def _ensemble_threshold(members: Sequence[Classifier]) -> tuple[float, dict, str]:
    """Choose the ensemble's threshold the way each member's was chosen: on the members' validation predictions.
    Returns the threshold, the figures there, and where they come from (as model.json's validation_source)."""
    from .metrics import choose_threshold, validation_summary

    tables = []
    for member in members:
        path = Path(member.source).parent / "valid_predictions.csv"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the ensemble's threshold is chosen on validation predictions")
        tables.append(_validation_table(path, member.positive_name))
    # Members may hold predictions for different images (a linear head fitted on train+valid keeps out-of-fold
    # predictions for both); the threshold is chosen on the images every member predicted without seeing them.
    common = set(tables[0].index)
    for table in tables[1:]:
        common &= set(table.index)
    ids = [i for i in tables[0].index if i in common]
    labels = tables[0].loc[ids, "label"].to_numpy() if ids else np.array([])
    if len(set(labels)) < 2:
        raise CheckpointError(f"ensemble members share {len(ids)} validation images, not enough of both classes to "
                              "choose a threshold; validate them on the same split")
    if any(len(t) != len(ids) for t in tables):
        log.info("ensemble threshold chosen on the %d validation images all members predicted", len(ids))
    positive = members[0].positive_name
    malignant = np.mean([t.loc[ids, positive].to_numpy() for t in tables], axis=0)
    ok = ~np.isnan(malignant)
    policy = members[0].meta.get("threshold_policy", "sensitivity:0.90")
    threshold = choose_threshold(labels[ok], malignant[ok], policy)
    # only probes fitted on train+valid share training images' predictions: those rows are out of fold
    out_of_fold = "split" in tables[0] and (tables[0].loc[ids, "split"] == "train").any()
    source = "out-of-fold (train+valid)" if out_of_fold else "valid"
    return threshold, validation_summary(labels[ok], malignant[ok], threshold), source


def _validation_table(path: Path, positive: str) -> pd.DataFrame:
    from .data import read_csv_checked

    try:
        return read_csv_checked(path, ["image_id", "label", positive], dtype={"image_id": str}).set_index("image_id")
    except DataError as err:  # the run's own file, not the user's data: say how to get it back
        raise CheckpointError(f"{err}; retrain the run to recreate it") from None


def load_models(runs: Sequence[str | Path], engine: str = "auto") -> Classifier:
    """One run -> its Classifier; several -> an Ensemble of them."""
    classifiers = [load_model(run, engine=engine) for run in runs]
    return classifiers[0] if len(classifiers) == 1 else Ensemble(classifiers)
