"""Guard: whether an image is one the model can judge. A Mahalanobis distance on the pooled backbone features,
fitted on the training images, with a threshold chosen on held-in images at a stated false-rejection rate; and cheap
checks of the frame itself (black, blank, washed out)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, atomic_write
from .provenance import file_sha256

log = logging.getLogger("skincancer")

GUARD_FILE = "guard.safetensors"
FALSE_REJECTION = 0.02  # the share of held-in dermoscopy images the threshold refuses
GUARD_FOLDS = 5
NO_GUARD = "this model has no out-of-distribution guard (fit one: skincancer guard --model RUN)"
OUT_OF_DISTRIBUTION = ("does not look like the dermoscopy images the model was trained on; its score means nothing "
                       "for it")

# Frame checks on the model's input (resized, before normalisation), luminance 0..1. Set far outside what
# dermoscopy gives (ISIC 2017 and HAM10000: mean luminance 0.18-0.86, spread >= 0.03; BENCHMARKS.md): each names a
# fault the distance may miss, a frame with no picture in it.
TOO_DARK, TOO_BRIGHT, UNIFORM = 0.06, 0.96, 0.012
PIXEL_STATS = 2  # columns of pixel_stats: mean and standard deviation of the luminance


class GuardError(CheckpointError):
    pass


@dataclass(frozen=True)
class Guard:
    """A Gaussian of the training images' pooled features (Ledoit-Wolf shrunk covariance) and the distance above
    which an image is out of distribution. score(): the distance (root mean square per feature dimension) divided by
    the threshold, so that 1 is the limit for every model and ensemble."""

    mean: np.ndarray  # [D] float64
    precision: np.ndarray  # [D, D] float64
    threshold: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance / sqrt(D) of each row of features [N, D] (NaN rows stay NaN)."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred, optimize=True)
        return np.sqrt(np.maximum(squared, 0) / len(self.mean))

    def score(self, features: np.ndarray) -> np.ndarray:
        return self.distance(features) / self.threshold


def fit_gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of features [N, D]; the covariance shrunk (Ledoit-Wolf) since D is close to N here.

    The precision comes from a Cholesky factor (the shrunk covariance is positive definite): the same matrix as
    scikit-learn's own pseudo-inverse to 1e-11 on the demo's 2024 features, in a tenth of the time (0.4 s against
    5 s); the pseudo-inverse only where the factor fails (a covariance with no spread to shrink towards)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve, pinvh
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    fitted = LedoitWolf(store_precision=False, assume_centered=False).fit(features)
    covariance = fitted.covariance_
    try:
        precision = cho_solve(cho_factor(covariance), np.eye(len(covariance)))
        precision = (precision + precision.T) / 2
    except LinAlgError:
        precision = pinvh(covariance)
    return fitted.location_, precision


def fit_guard(fit_features: np.ndarray, held_features: np.ndarray | None = None,
              false_rejection: float = FALSE_REJECTION, seed: int = 0,
              fold_features: np.ndarray | None = None, groups: np.ndarray | None = None,
              folds: int = GUARD_FOLDS) -> tuple[Guard, dict]:
    """The guard and its record for model.json.

    held_features: images not in fit_features (validation): the threshold is their (1 - false_rejection) quantile.
    groups: the lesion of each row of fit_features (sources.fold_groups): the folds keep a lesion's images together.
    None: out of fold: the Gaussian is fitted on all but one of `folds` folds of fit_features and scored on the one
    left, fold by fold (for a frozen backbone, whose features of the training images are those of any new image).
    fold_features: what the held-out folds are scored on, row for row with fit_features (the mean of the model's
    views), if not the same."""
    if not 0 < false_rejection < 0.5:
        raise ValueError(f"false_rejection: expected a share between 0 and 0.5, got {false_rejection}")
    fit_features = np.asarray(fit_features, dtype=np.float64)
    if len(fit_features) < 20:
        raise GuardError(f"{len(fit_features)} images: too few to fit the guard (at least 20)")
    if held_features is None:
        from sklearn.model_selection import GroupKFold, KFold

        scored = fit_features if fold_features is None else np.asarray(fold_features, dtype=np.float64)
        held = np.empty(len(fit_features))
        splitter = (KFold(folds, shuffle=True, random_state=seed) if groups is None else
                    GroupKFold(folds, shuffle=True, random_state=seed))
        for kept, out in splitter.split(fit_features, groups=groups):
            mean, precision = fit_gaussian(fit_features[kept])
            held[out] = Guard(mean, precision, 1.0).distance(scored[out])
        source = f"out-of-fold ({folds} folds of the fitted images)"
    else:
        source = "validation images"
    mean, precision = fit_gaussian(fit_features)
    if held_features is not None:
        held = Guard(mean, precision, 1.0).distance(held_features)
    held = held[np.isfinite(held)]
    if len(held) < 20:
        raise GuardError(f"{len(held)} held-in images: too few to choose the guard's threshold (at least 20)")
    threshold = float(np.quantile(held, 1 - false_rejection, method="higher"))
    record = {"method": "mahalanobis", "features": "pooled backbone features (what the classifier reads)",
              "file": GUARD_FILE, "threshold": threshold, "false_rejection": false_rejection,
              "held_in": source, "n_fit": int(len(fit_features)), "n_held_in": int(len(held)),
              "held_in_rejected": float(np.mean(held > threshold)),
              "frame_checks": {"too_dark": TOO_DARK, "too_bright": TOO_BRIGHT, "uniform": UNIFORM}}
    return Guard(mean, precision, threshold), record


def save_guard(guard: Guard, record: dict, model_dir: Path) -> dict:
    """Write the statistics to model_dir/guard.safetensors; returns the record with the file's SHA-256."""
    from safetensors.numpy import save_file

    tensors = {"mean": guard.mean.astype(np.float64), "precision": guard.precision.astype(np.float64)}
    atomic_write(Path(model_dir) / GUARD_FILE, lambda tmp: save_file(tensors, str(tmp)))
    return {**record, "threshold": guard.threshold, "sha256": file_sha256(Path(model_dir) / GUARD_FILE)}


def load_guard(model_dir: Path, record: dict | None) -> Guard | None:
    """The guard model.json describes (None: the run has none); refused when the file changed since it was fitted
    (its SHA-256), or is not the statistics it should be."""
    if record is None:
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(model_dir) / GUARD_FILE
    where = f"{path} (model.json guard)"
    if not isinstance(record, dict):
        raise GuardError(f"{model_dir / 'model.json'}: guard: expected an object of fields, got {record!r:.60}")
    threshold = record.get("threshold")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold < 1e6:
        raise GuardError(f"{model_dir / 'model.json'}: guard.threshold: expected a positive number, got {threshold!r}")
    if not path.is_file():
        raise GuardError(f"{where}: missing; fit it again with `skincancer guard --model {model_dir.parent}`")
    if not isinstance(record.get("sha256"), str):
        raise GuardError(f"{model_dir / 'model.json'}: guard.sha256: missing; fit the guard again with `skincancer "
                         f"guard --model {model_dir.parent}`")
    if file_sha256(path) != record.get("sha256"):
        raise GuardError(f"{path}: the file changed since it was fitted (its SHA-256 differs from model.json's "
                         f"guard.sha256): corrupted or replaced; fit it again with `skincancer guard --model "
                         f"{model_dir.parent}`")
    try:
        tensors = load_file(str(path))
        mean, precision = tensors["mean"], tensors["precision"]
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise GuardError(f"{path}: not the guard's statistics ({type(err).__name__}: {err})") from None
    if mean.ndim != 1 or precision.shape != (len(mean), len(mean)) or not (
            np.isfinite(mean).all() and np.isfinite(precision).all()):
        raise GuardError(f"{path}: expected a finite mean [D] and precision [D, D], got {mean.shape} and "
                         f"{precision.shape}")
    return Guard(mean.astype(np.float64), precision.astype(np.float64), float(threshold))


def pixel_stats(images, mean: list[float], std: list[float]) -> np.ndarray:
    """[N, 2]: the mean and standard deviation of each normalised image's luminance (0..1); images [N, 3, H, W] as a
    numpy array or a CPU tensor."""
    images = np.asarray(images, dtype=np.float32)
    scale = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    shift = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    rgb = np.clip(images * scale + shift, 0, 1)
    luminance = (rgb * np.asarray([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)).sum(1)
    flat = luminance.reshape(len(luminance), -1)
    return np.stack([flat.mean(1), flat.std(1, ddof=1)], 1)


def frame_problem(brightness: float, spread: float) -> str | None:
    """What is wrong with a frame, in words a person understands (None: nothing these checks see)."""
    if not np.isfinite(brightness):
        return None
    if spread < UNIFORM:
        return "the frame is nearly uniform: there is no lesion to see"
    if brightness < TOO_DARK:
        return f"the frame is far too dark (mean brightness {brightness:.0%})"
    if brightness > TOO_BRIGHT:
        return f"the frame is far too bright or washed out (mean brightness {brightness:.0%})"
    return None


def image_features(model, paths, transform, tta: int = 1, batch_size: int = 32, num_workers: int = 0,
                   desc: str = "guard features") -> np.ndarray:
    """Pooled features [N, D] of image files, the mean of `tta` dihedral views (NaN rows: unreadable)."""
    from .datasets import ImageDataset
    from .engine import run_inference

    features, _ = run_inference(model, ImageDataset(list(paths), None, transform), batch_size, num_workers, tta=tta,
                                output="features", desc=desc)
    return features


def fit_model_guard(model, frozen: bool, train_paths, valid_paths, transform, tta: int, model_dir: Path,
                    batch_size: int = 32, num_workers: int = 0, false_rejection: float = FALSE_REJECTION,
                    valid_features: np.ndarray | None = None, fitted_features: np.ndarray | None = None,
                    seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """Fit a trained model's guard and write it into model_dir; returns model.json's `guard` record.

    frozen: the backbone never trained on these images (a linear probe): the Gaussian is fitted on train + valid and
    the threshold chosen out of fold, on the mean of the model's `tta` views, as predictions see them. Otherwise
    (fine-tuned: the network has seen its training images) it is fitted on the training images (one view) and the
    threshold chosen on the validation images with the model's views. valid_features / fitted_features: features
    already computed (the validation pass of training; the probe's cached features of train + valid). groups: the
    lesion of each training then validation image, for the out-of-fold threshold (sources.fold_groups)."""
    if frozen:
        if fitted_features is None:
            fitted_features = image_features(model, [*train_paths, *valid_paths], transform, tta, batch_size,
                                             num_workers)
        finite = np.isfinite(fitted_features).all(1)
        guard, record = fit_guard(fitted_features[finite], false_rejection=false_rejection, seed=seed,
                                  groups=None if groups is None else np.asarray(groups)[finite])
    else:
        train_features = image_features(model, train_paths, transform, 1, batch_size, num_workers,
                                        desc="guard features (train)")
        if valid_features is None:
            valid_features = image_features(model, valid_paths, transform, tta, batch_size, num_workers,
                                             desc="guard features (valid)")
        train_features = train_features[np.isfinite(train_features).all(1)]
        valid_features = valid_features[np.isfinite(valid_features).all(1)]
        guard, record = fit_guard(train_features, valid_features, false_rejection=false_rejection, seed=seed)
    record = save_guard(guard, {**record, "views": tta}, model_dir)
    log.info("guard: Mahalanobis distance on %d pooled features, fitted on %d images; threshold %.4f refuses "
             "%.1f%% of the %d held-in images (%s)", len(guard.mean), record["n_fit"], guard.threshold,
             100 * record["held_in_rejected"], record["n_held_in"], record["held_in"])
    return record
