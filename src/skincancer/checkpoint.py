"""Checkpoints: a run's model folder (safetensors weights + model.json) written atomically and read without pickle."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from .config import RESIZE_POLICIES, VIEWS
from .errors import CheckpointError
from .provenance import file_sha256

if TYPE_CHECKING:  # torch is imported by the functions that need it: reading model.json must not pay for it
    import torch
    from torch import nn

# 2: weights_sha256 required; formats before it were never released, and are refused with a word to retrain
FORMAT_VERSION = 2
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"
FITTED_IMAGES_FILE = "fitted_images.json"  # content hashes of the images a run trained and validated on
META_REQUIRED = ("backbone", "class_names", "labels", "image_size", "mean", "std", "threshold")


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once (os.umask can only be read by setting it)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: a kill mid-save leaves the old file, never half a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON: NaN and infinity (an AUC with one class absent) are written as null."""
    text = json.dumps(_strict(data), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def _strict(value: Any) -> Any:
    """Plain JSON values: numpy/torch scalars and arrays as Python numbers and lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist"):
        return _strict(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    from torch import nn

    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(model: nn.Module, meta: dict, directory: str | Path) -> Path:
    """Write weights (safetensors) then metadata (JSON) into `directory`; model.json last marks it complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    missing = [k for k in META_REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"model metadata lacks {', '.join(missing)}")
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    digest = file_sha256(directory / WEIGHTS_FILE)
    write_json(directory / META_FILE, {"format_version": FORMAT_VERSION, **meta, "weights_sha256": digest})
    return directory


def find_model_dir(path: str | Path) -> Path:
    """Accept a run folder, its model/ folder, or model.json itself."""
    path = Path(path)
    for candidate in (path / "model", path, path.parent):
        if (candidate / META_FILE).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or model folder")
    raise CheckpointError(f"{path}: not a trained run (no model/{META_FILE} found)")


def read_meta(model_dir: Path) -> dict:
    """model.json as written, once ModelMeta has found every field it checks usable."""
    path = model_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable model metadata ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    try:
        ModelMeta.model_validate(meta)
    except ValidationError as err:
        raise CheckpointError(f"{path}: {_meta_message(err)}") from None
    return meta


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_CHOICES = {"head": ("diagnosis", "binary"), "mode": ("linear", "finetune")}  # model.json fields of a fixed set


class ModelMeta(BaseModel):
    """The fields of model.json that rebuild and use a model, each checked as it is read (a hand edit, another
    tool's file, another format): the first problem becomes one CheckpointError that names the field. Other fields
    (validation figures, provenance, epoch...) pass through unchecked."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    format_version: int
    backbone: str
    class_names: list[str]
    labels: dict[str, int]
    head: str = "diagnosis"
    image_size: int
    mean: list[float]
    std: list[float]
    threshold: float
    tta: int = 1
    resize: str = "squash"
    mode: str = "linear"
    positive_name: str = "malignant"
    negative_name: str = "benign"
    weights_sha256: str
    # read by cards, pages, fusion and the guard
    validation: dict | None = None
    environment: dict | None = None
    metadata_model: dict | None = None
    validation_summary: dict | None = None
    guard: dict | None = None
    distilled_from: dict | None = None
    initialised_from: dict | None = None

    @field_validator("format_version", mode="before")
    @classmethod
    def _this_format(cls, version: Any) -> Any:
        if type(version) is not int or version > FORMAT_VERSION:
            raise ValueError(f"format_version {version!r}: written by a newer skincancer (this one reads "
                             f"{FORMAT_VERSION}); upgrade")
        if version < FORMAT_VERSION:  # formats before 2 were never released: no reader is kept for them
            raise ValueError(f"format_version {version}: written by a development version of skincancer (this one "
                             f"reads {FORMAT_VERSION}); train the model again")
        return version

    @field_validator("backbone", mode="before")
    @classmethod
    def _timm_name(cls, backbone: Any) -> Any:
        if not isinstance(backbone, str) or not backbone:
            raise ValueError(f"backbone: expected a timm model name, got {backbone!r}")
        if ":" in backbone or "/" in backbone:  # hf-hub:..., a URL: timm would go to the network
            raise ValueError(f"backbone: expected a timm model name (no hub or path), got {backbone!r}")
        return backbone

    @field_validator("class_names", mode="before")
    @classmethod
    def _names(cls, names: Any) -> Any:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"class_names: expected a non-empty list of names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"class_names: a name is listed twice in {names}")
        return names

    @field_validator("labels", mode="before")
    @classmethod
    def _label_map(cls, labels: Any) -> Any:
        if not isinstance(labels, dict) or any(v not in (0, 1) or isinstance(v, bool) for v in labels.values()):
            raise ValueError(f"labels: expected a map of diagnosis to 0 or 1, got {labels!r}")
        return labels

    @field_validator("head", "mode", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: ValidationInfo) -> Any:
        choices = _CHOICES[info.field_name]
        if value not in choices:
            raise ValueError(f"{info.field_name}: must be {' or '.join(map(repr, choices))}, got {value!r}")
        return value

    @field_validator("image_size", mode="before")
    @classmethod
    def _pixels(cls, size: Any) -> Any:
        if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= 4096:
            raise ValueError(f"image_size: expected a whole number of pixels (16-4096), got {size!r}")
        return size

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _per_channel(cls, values: Any, info: ValidationInfo) -> Any:
        low, kind = (-10, "numbers from -10 to 10") if info.field_name == "mean" else (1e-3, "numbers from 0.001 to 10")
        if not isinstance(values, list) or len(values) != 3 or not all(_finite(v) and low <= v <= 10 for v in values):
            raise ValueError(f"{info.field_name}: expected 3 {kind} (one per RGB channel), got {values!r}")
        return values

    @field_validator("threshold", mode="before")
    @classmethod
    def _probability(cls, threshold: Any) -> Any:
        if not _finite(threshold) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold: expected a probability between 0 and 1, got {threshold!r}")
        return threshold

    @field_validator("tta", mode="before")
    @classmethod
    def _views(cls, tta: Any) -> Any:
        if type(tta) is not int or tta not in VIEWS:
            raise ValueError(f"tta: must be 1, 2, 4 or 8, got {tta!r}")
        return tta

    @field_validator("resize", mode="before")
    @classmethod
    def _resize_policy(cls, resize: Any) -> Any:
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"resize: must be {' or '.join(map(repr, RESIZE_POLICIES))}, got {resize!r:.80}")
        return resize

    @field_validator("weights_sha256", mode="before")
    @classmethod
    def _digest(cls, digest: Any) -> Any:
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"weights_sha256: expected the SHA-256 of {WEIGHTS_FILE} (64 hex digits), got "
                             f"{digest!r:.80}")
        return digest

    @field_validator("validation", "environment", "metadata_model", "validation_summary", "guard", "distilled_from",
                     "initialised_from", mode="before")
    @classmethod
    def _object(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{info.field_name}: expected an object of fields, got {type(value).__name__} "
                             f"{value!r:.60}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelMeta:
        names, labels = self.class_names, self.labels
        if self.head == "diagnosis":
            unlabelled = [n for n in names if n not in labels]
            if unlabelled:
                raise ValueError(f"labels: no label for class {unlabelled[0]!r} of class_names")
            if not any(labels[n] == 1 for n in names) or all(labels[n] == 1 for n in names):
                raise ValueError(f"labels: the classes {names} must include both malignant (1) and benign (0) ones")
        elif len(names) != 2:
            raise ValueError(f"class_names: a binary head has 2 outputs, got {len(names)} names")
        positive, negative = self.positive_name, self.negative_name
        if not (positive.strip() and negative.strip() and positive != negative):
            raise ValueError(f"positive_name / negative_name: expected two different names, got {positive!r} / "
                             f"{negative!r}")
        return self


def _meta_message(err: ValidationError) -> str:
    """The first problem pydantic found, worded as the checks above word it."""
    problems = err.errors()
    missing = [str(p["loc"][0]) for p in problems if p["type"] == "missing"]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    problem = problems[0]
    cause = (problem.get("ctx") or {}).get("error")
    if cause is not None:
        return str(cause)
    name = ".".join(map(str, problem["loc"])) or "model.json"
    return f"{name}: {problem['msg'].lower()}, got {problem['input']!r:.60}"


def read_weights(model_dir: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Weights from safetensors only: never unpickle a file a user hands us.

    expected_sha256: model.json's `weights_sha256` (None: not checked, for a caller reading a file it has just
    written): a file that changed since it was saved is refused; so is any weight that is NaN or infinite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = model_dir / WEIGHTS_FILE
    if not path.is_file():
        others = sorted(p.name for p in model_dir.glob("*.pt*")) + sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(others)}: pickle files are not loaded, for safety)" if others else ""
        raise CheckpointError(f"{path}: weights file missing{hint}")
    if expected_sha256 and file_sha256(path) != expected_sha256:
        raise CheckpointError(f"{path}: the file changed since it was saved (its SHA-256 differs from model.json's "
                              "weights_sha256): corrupted or replaced; retrain or restore it")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    broken = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise CheckpointError(f"{path}: weights {broken[0]}{more} contain NaN or infinity: the file is corrupted")
    return weights


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not fit the model described in model.json ({err})") from None


def check_starting_run(run: str | Path, config) -> tuple[Path, dict]:
    """The model folder and model.json of an `init_from` run, refused unless it has finished, is not the new run's
    own folder, and has the new run's backbone and pooling (its weights are not read: StartingWeights does that)."""
    try:
        model_dir = find_model_dir(run)
        meta = read_meta(model_dir)
    except CheckpointError as err:
        raise CheckpointError(f"init_from: {err}") from None
    if meta.get("unfinished"):
        raise CheckpointError(f"init_from: {run} was saved by a run that has not finished; finish it first "
                              f"(skincancer train --resume {run})")
    if model_dir.resolve().is_relative_to(Path(config.out).resolve()):
        raise CheckpointError(f"init_from: {run} is this run's own folder; start from another run")
    for key, own in (("backbone", config.backbone), ("pooling", config.pooling)):
        if meta.get(key, "final") != own:
            raise CheckpointError(f"init_from: {run} has {key} {meta.get(key, 'final')}, this run {own}; "
                                  f"they must be the same")
    return model_dir, meta


class StartingWeights:
    """A trained run's weights that start a fine-tune instead of ImageNet's (config `init_from`): read and checked
    before the new run's folder is touched, loaded once its model is built (`load_into`)."""

    def __init__(self, run: str | Path, config) -> None:
        model_dir, meta = check_starting_run(run, config)
        self.run = str(run)
        try:
            self.weights = read_weights(model_dir, meta.get("weights_sha256"))
        except CheckpointError as err:
            raise CheckpointError(f"init_from: {err}") from None
        # its classifier fits only a run of the same classes (known once the data are read: load_into), head and
        # label map (a binary head's classes are always benign / malignant, whatever its labels count as malignant)
        self.head_and_labels = (meta.get("head"), meta["labels"]) == (config.head, config.labels)
        # model.json's `initialised_from`: the run, its classes and weights, and the data it learnt from
        self.record = {"run": self.run, "backbone": meta["backbone"], "class_names": meta["class_names"],
                       "head": meta.get("head"), "weights_sha256": meta.get("weights_sha256"),
                       "sources": meta.get("sources")}
        self.fitted = fitted_images(model_dir)

    def load_into(self, model: nn.Module, class_names: list[str]) -> dict:
        """Every weight of `model` but its classifier from the run; the classifier too when the run's classes (and
        head and label map) are this run's, else it stays freshly initialised. Returns the `initialised_from`
        record."""
        net = unwrap(model)
        own = net.state_dict()
        classifier = net.get_classifier()
        head = next(f"{name}." for name, module in net.named_modules() if module is classifier)
        keep_head = self.head_and_labels and self.record["class_names"] == class_names
        taken = {k: v for k, v in self.weights.items() if keep_head or not k.startswith(head)}
        misfit = sorted({*(k for k in own if k not in taken and not k.startswith(head)),
                         *(k for k, v in taken.items() if k not in own or own[k].shape != v.shape)})
        if misfit:
            more = f" and {len(misfit) - 1} more" if len(misfit) > 1 else ""
            raise CheckpointError(f"init_from: {self.run}: its weights do not fit this network ({misfit[0]}{more})")
        net.load_state_dict(taken, strict=False)
        if not keep_head:  # initialised as the ImageNet path's new classifier is (timm's own init is 20x wider)
            for module in classifier.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.weights = {}  # loaded: not kept twice in memory
        return {**self.record, "classifier": "kept" if keep_head else "new"}


def fitted_images(model_dir: Path, required: bool = False) -> dict:
    """The images a run's weights were fitted ("train") or tuned ("valid") on, its own starting run's too: they
    travel into a new run's fitted_images.json (`inherited`), so `evaluate` still says when it scores them.
    A missing or unreadable record is {} unless `required` (then its OSError or ValueError is raised)."""
    try:
        hashes = json.loads((Path(model_dir) / FITTED_IMAGES_FILE).read_text())
        if not isinstance(hashes, dict) or (required and not isinstance(hashes.get("train"), list)):
            raise ValueError("not a JSON object with a 'train' list")
    except (OSError, ValueError):
        if required:
            raise
        return {}
    inherited = hashes.get("inherited") or {}
    return {split: sorted({*hashes.get(split, []), *inherited.get(split, [])}) for split in ("train", "valid")}
