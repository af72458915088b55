"""Test-time views: what one prediction averages. Up to 8 dihedral views of the image (engines.collect turns the
batch); beyond 8, the same 8 of each of 1-7 fixed augmentations of it (images.AugmentedView), one pass over the
images each."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import PREDICT_VIEWS, PREDICT_VIEWS_TEXT
from .guard import PIXEL_STATS
from .images import ImageList


def average_views(classifier, sources: list, batch_size: int, num_workers: int, tta: int, output: str,
                  extra: Callable | None) -> tuple[np.ndarray, list]:
    """A predict.Classifier's engine outputs [N, outputs] averaged over `tta` views (NaN rows: unreadable), extra's
    columns (the guard's frame figures) from the image itself, and the (index, reason) failures of every pass."""
    if type(tta) is not int or tta not in PREDICT_VIEWS:
        raise ValueError(f"tta: must be {PREDICT_VIEWS_TEXT} views, got {tta!r}")
    draws, total, failures = max(1, tta // 8), None, {}
    for draw in range(draws):
        if classifier.engine is not None:  # numpy all the way: no torch
            values, errors = classifier.engine.run_inference(
                ImageList(sources, None, classifier.array_transform(draw)), batch_size=batch_size,
                num_workers=num_workers, tta=min(tta, 8), output=output, extra=extra if draw == 0 else None)
        else:
            from .datasets import ImageDataset
            from .engine import run_inference

            values, errors = run_inference(classifier.model, ImageDataset(sources, None, classifier.transform(draw)),
                                           batch_size=batch_size, num_workers=num_workers, tta=min(tta, 8),
                                           output=output, extra=extra if draw == 0 else None)
        for index, reason in errors:  # a file that turns bad between passes fails its row, said once
            failures.setdefault(index, reason)
        if total is None:
            total = values
            views = total.shape[1] - (PIXEL_STATS if extra is not None and total.shape[1] else 0)
        elif views:  # a pass with no columns: every image failed in it (NaN rows, as they would have been)
            total[:, :views] += values if values.shape[1] else np.nan
    total[:, :views] /= draws
    return total, sorted(failures.items())
