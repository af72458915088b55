"""What a prediction says: the guard's word on each image (Judged), one image's record (Prediction), the sentences a
person reads, and the records as a table. Classifier.records builds them; the CLI, the API, the page and Ray render
them. No torch and no pandas until a table is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, eq=False)  # eq: its arrays have no single truth value
class Prediction:
    """What the model says of one image, decided once (Classifier.records) and rendered by every output: the CLI's
    sentence and table, the REST API's answer and the page, Ray's table."""

    source: str
    probabilities: np.ndarray  # [classes], the engine's dtype (NaN: unreadable)
    malignant: np.floating  # the positive classes' probability (NaN: unreadable)
    label: str  # the positive or negative name at the threshold; 'refused' (the guard); '' (unreadable)
    ood_score: np.floating  # 1 is the limit; NaN without a guard or for an unreadable file
    in_distribution: bool | None  # None: no guard to ask, or unreadable
    refusal: str  # why the image gets no verdict ('' : it does; under --no-guard said, not enforced)
    error: str  # why the file could not be read ('' : it could)
    sentence: str  # the tutorial's sentence, or why there is no verdict ('' : unreadable)
    metadata_used: bool = False  # whether the patient's age/sex were fused into the probabilities


def predictions_table(predictions: Sequence[Prediction], class_names: Sequence[str], positive_name: str,
                      metadata_used: bool = False) -> pd.DataFrame:
    """The records as `predict`'s table: source, each class, the positive probability, label, ood_score,
    in_distribution, refusal, [metadata_used,] error; numbers in the engine's dtype."""
    import pandas as pd

    stacked = np.stack([p.probabilities for p in predictions]) if predictions else np.empty((0, len(class_names)))
    columns = {"source": [p.source for p in predictions]}
    for c, name in enumerate(class_names):
        columns[name] = stacked[:, c]
    columns[positive_name] = np.array([p.malignant for p in predictions])
    columns["label"] = [p.label for p in predictions]
    columns["ood_score"] = np.array([p.ood_score for p in predictions])
    columns["in_distribution"] = pd.array([p.in_distribution for p in predictions], dtype="boolean")
    columns["refusal"] = [p.refusal for p in predictions]
    if metadata_used:
        columns["metadata_used"] = [p.metadata_used for p in predictions]
    columns["error"] = [p.error for p in predictions]
    return pd.DataFrame(columns)


@dataclass
class Judged:
    """What the guard says of each image, beside its probabilities: see Classifier.judge."""

    probs: np.ndarray
    errors: list
    ood_score: np.ndarray  # [N]: 1 is the limit; NaN without a guard or for an unreadable file
    refusals: list[str]  # [N]: why the image gets no verdict ("": it does)
    refuse: bool = True  # False: the reasons are said, the verdicts kept (--no-guard)
    guarded: bool = True  # whether there was an out-of-distribution score (frame checks always run)

    def refused(self, index: int) -> bool:
        return self.refuse and bool(self.refusals[index])

    def in_distribution(self, index: int) -> bool | None:
        """False where the guard or a frame check objects; None where there was no guard to ask."""
        reason = self.refusals[index]
        return (not reason) if self.guarded or reason else None


def sentence(probability: float, threshold: float, positive_name: str = "malignant",
             negative_name: str = "benign") -> str:
    """The tutorial's sentence with the model's call: 'This image is 68.04% malignant: above the model's threshold
    of 8.45%, so it is flagged malignant.' The probability is always the malignant one, so that '11% malignant' can
    never be read as a benign call when the threshold (chosen for sensitivity) sits lower."""
    flagged = probability >= threshold
    return (f"This image is {probability * 100:.2f}% {positive_name}: {'above' if flagged else 'below'} the model's "
            f"threshold of {threshold * 100:.2f}%, so it is "
            f"{f'flagged {positive_name}' if flagged else f'called {negative_name}'}.")


def refusal_sentence(reason: str) -> str:
    """What a person reads for an image the guard refuses: why, and that there is no verdict."""
    return f"No verdict for this image: {reason}."
