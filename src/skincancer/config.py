"""Training configuration: one frozen pydantic model, YAML defaults, CLI overrides, checked before any work starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

ISIC2017_LABELS: dict[str, int] = {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0}
# Every diagnosis of the vocabulary (skincancer.sources): melanoma malignant, the rest benign, as the ISIC 2017 task
# scores it. Basal cell carcinoma, actinic keratosis and squamous cell carcinoma are malignant or pre-malignant, but
# not melanoma: a malignant-vs-benign model says so with --labels (docs/data.md). A model's classes are the
# diagnoses its training images have.
DEFAULT_LABELS: dict[str, int] = {**ISIC2017_LABELS, "basal_cell_carcinoma": 0, "actinic_keratosis": 0,
                                  "squamous_cell_carcinoma": 0, "vascular_lesion": 0, "dermatofibroma": 0}
MAX_SEED = 2**32 - 1  # numpy's seed range
RESIZE_POLICIES = ("squash", "crop")  # how a non-square image becomes a square (images.centre_square)
VIEWS = (1, 2, 4, 8)  # test-time and feature views: the first n dihedral transforms (engine.DIHEDRAL)
# what a prediction may average: also the 8 dihedral views of each of 1-7 fixed augmentations (images.AugmentedView)
PREDICT_VIEWS = (*VIEWS, 16, 24, 32, 40, 48, 56, 64)
PREDICT_VIEWS_TEXT = "1, 2, 4, 8 or a multiple of 8 up to 64"  # PREDICT_VIEWS in words


# The defaults of the fields that mean something else in the two modes: a linear run without a config gets the
# demo's probe (configs/linear.yaml, chosen by cross-validation; BENCHMARKS.md), a fine-tune what it always had (a
# fine-tune has no use for the linear_* keys, but config.yaml records every field). The field defaults below are the
# linear ones; a config with `mode: finetune` gets these instead where it does not set them.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"pooling": "multiscale", "class_balance": "none", "linear_fit": "train+valid",
               "linear_c": [3e-4, 1e-3, 3e-3]},
    "finetune": {"pooling": "final", "class_balance": "weighted_loss", "linear_fit": "train",
                 "linear_c": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]},
}
_LINEAR = MODE_DEFAULTS["linear"]


class TrainConfig(BaseModel):
    """Every training setting, checked when made: a wrong type or an impossible value is one ConfigError that names
    the field. Frozen; `config.replace(out=...)` makes a changed copy (checked again)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    train: str | list[str] = ""  # one training manifest or folder, or a list of them (several sources)
    valid: str = ""
    out: str = ""
    mode: str = "linear"  # linear: frozen backbone + logistic head on cached features; finetune: whole network
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 224
    # finetune: the size validation and prediction resize images to; 0 = image_size. Random crops enlarge lesions in
    # training, so a fine-tuned model can see whole images best a little larger than it trained (FixRes)
    eval_image_size: int = 0
    head: str = "diagnosis"  # diagnosis: one output per diagnosis (3-class on ISIC); binary: malignant vs benign
    labels: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_LABELS))
    positive_name: str = "malignant"
    negative_name: str = "benign"
    threshold_policy: str = "sensitivity:0.90"
    # the source (a manifest's `source` column) whose held-out images choose C or the best epoch, and the threshold:
    # the one the model is judged on, when other sources only add training images. "" = every held-out image
    select_on: str = ""
    # finetune, several sources: how often an epoch draws each image of a source (1 = once, 0.2 = one epoch in five,
    # cycling through the source); unlisted sources 1. E.g. {ham10000: 0.16} draws about 1,430 of HAM10000's 8,917
    # melanomas, nevi and keratoses an epoch, as many as a cross-validation fold's ISIC 2017 images (docs/data.md)
    source_weights: dict[str, float] = Field(default_factory=dict)
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 2
    # finetune
    epochs: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.02
    warmup_epochs: float = 0.5
    patience: int = 3
    augment: str = "standard"  # none | standard | strong | perez (Perez et al. 2018's set; docs/training.md)
    # how a non-square image becomes a square, in training and in every prediction (model.json `resize`): squash
    # (resize whole, as the ISIC 2017 copies were made) | crop (its centre square, e.g. HAM10000's 200 x 150)
    resize: str = "squash"
    # weighted_loss | sampler | none; the probe: weighted unless none. By mode (MODE_DEFAULTS): linear none,
    # finetune weighted_loss
    class_balance: str = _LINEAR["class_balance"]
    label_smoothing: float = 0.0
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; small values make smoke tests fast
    keep: str = "best"  # best: the epoch with the highest validation AUC (early stopping); last: the final epoch
    ema_decay: float = 0.0  # > 0: validate and keep an exponential moving average of the weights (e.g. 0.998)
    tta: int = 1  # dihedral views averaged when validating and choosing the threshold; stored as the model's default
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    # fit p(class | age, sex) on the training manifest's metadata; fused where given. Off by default in both modes
    # (the demo's configs/linear.yaml turns it on): it needs manifests with metadata columns, which a folder lacks
    metadata: bool = False
    # the out-of-distribution guard (skincancer.guard), fitted at the end of training: images past its threshold get
    # no verdict; the threshold refuses this share of held-in images
    guard: bool = True
    guard_false_rejection: float = 0.02
    # distillation (skincancer distill; finetune only): the teacher's run folders (several: their ensemble), whose
    # per-class probabilities with all their views are the targets; each labelled image's target is
    # distill_alpha * the teacher's + (1 - distill_alpha) * its true label; the `extra` images (manifests, folders or
    # files; no labels needed) have the teacher's alone
    teacher: list[str] = Field(default_factory=list)
    distill_alpha: float = 0.7
    # each image's teacher probabilities from only the teacher runs whose weights were never fitted on it (their
    # fitted_images.json): give the runs of every fold of a cross-validation (benchmarks/cv_search.py), so no target
    # is a prediction on an image the teacher memorised
    distill_out_of_fold: bool = False
    extra: list[str] = Field(default_factory=list)
    # finetune: start from a trained run's weights instead of ImageNet's (e.g. a run pre-trained on another source);
    # the backbone must be the same; its classifier is kept only when its classes are this run's. Its training
    # sources (and their licences) travel on to this model
    init_from: str = ""
    # linear (defaults by mode: MODE_DEFAULTS)
    linear_c: list[float] = Field(default_factory=lambda: list(_LINEAR["linear_c"]))
    # final: the backbone's pooled features; multiscale: + pooled later stages (EfficientNet only)
    pooling: str = _LINEAR["pooling"]
    feature_views: int = 2  # dihedral views of each image the head is trained on: 1, 2 (+ mirror), 4 or 8
    # train: C by k-fold CV on train, threshold on valid. train+valid: C by k-fold CV on both together, threshold and
    # validation figures from the out-of-fold predictions, final head fitted on both
    linear_fit: str = _LINEAR["linear_fit"]
    cache_dir: str = ""  # "" = $SKINCANCER_CACHE or ~/.cache/skincancer

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_message(err, values)) from None

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed, checked like a new config (the mode's defaults are not applied again)."""
        return TrainConfig(**{**self.model_dump(), **changes})

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("mode", "linear"), str):
            return {**MODE_DEFAULTS.get(values.get("mode", "linear"), {}), **values}
        return values

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        paths = value if isinstance(value, list) else [value]
        if not paths or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"train: expected a path or a list of paths, got {value!r}")
        return paths[0] if len(paths) == 1 else list(paths)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_map(cls, value: Any) -> Any:
        if isinstance(value, dict) and not all(isinstance(k, str) and type(v) is int and v in (0, 1)
                                               for k, v in value.items()):
            raise ConfigError(f"labels: expected a mapping of diagnosis name to 0 or 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_values(self) -> TrainConfig:
        if self.mode not in ("linear", "finetune"):
            raise ConfigError(f"mode: must be 'linear' or 'finetune', got {self.mode!r}")
        if self.head not in ("diagnosis", "binary"):
            raise ConfigError(f"head: must be 'diagnosis' or 'binary', got {self.head!r}")
        if self.augment not in ("none", "standard", "strong", "perez"):
            raise ConfigError(f"augment: must be 'none', 'standard', 'strong' or 'perez', got {self.augment!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"resize: must be {' or '.join(map(repr, RESIZE_POLICIES))}, got {self.resize!r}")
        if self.linear_fit not in ("train", "train+valid"):
            raise ConfigError(f"linear_fit: must be 'train' or 'train+valid', got {self.linear_fit!r}")
        if self.class_balance not in ("weighted_loss", "sampler", "none"):
            raise ConfigError(
                f"class_balance: must be 'weighted_loss', 'sampler' or 'none', got {self.class_balance!r}"
            )
        for name in ("image_size", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32 or self.image_size > 1024:
            raise ConfigError(f"image_size: must be between 32 and 1024, got {self.image_size}")
        if self.eval_image_size and not 32 <= self.eval_image_size <= 1024:
            raise ConfigError(f"eval_image_size: must be 0 (= image_size) or between 32 and 1024, "
                              f"got {self.eval_image_size}")
        if self.mode == "linear" and self.eval_image_size not in (0, self.image_size):
            raise ConfigError(f"eval_image_size: a linear probe predicts at the size its features were computed "
                              f"(image_size {self.image_size}); leave eval_image_size unset")
        for name in ("num_workers", "patience", "max_steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr: must be in (0, 1), got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.pooling not in ("final", "multiscale"):
            raise ConfigError(f"pooling: must be 'final' or 'multiscale', got {self.pooling!r}")
        if self.keep not in ("best", "last"):
            raise ConfigError(f"keep: must be 'best' or 'last', got {self.keep!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.guard_false_rejection < 0.5:
            raise ConfigError(f"guard_false_rejection: expected a share between 0 and 0.5 (e.g. 0.02), got "
                              f"{self.guard_false_rejection}")
        for name in ("tta", "feature_views"):
            if getattr(self, name) not in VIEWS:
                raise ConfigError(f"{name}: must be 1, 2, 4 or 8, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if not self.linear_c or any(c <= 0 for c in self.linear_c):
            raise ConfigError(f"linear_c: must be a non-empty list of positive numbers, got {self.linear_c}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.device == "cuda":
            import torch  # lazily: reading a config should not cost the torch import

            if not torch.cuda.is_available():
                raise ConfigError("device: 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
        if not self.positive_name.strip() or not self.negative_name.strip() or self.positive_name == self.negative_name:
            raise ConfigError(f"positive_name / negative_name: expected two different names, got "
                              f"{self.positive_name!r} / {self.negative_name!r}")
        if not self.labels:
            raise ConfigError("labels: must map at least one diagnosis to 0 and one to 1")
        if set(self.labels.values()) != {0, 1}:
            raise ConfigError(f"labels: values must be 0 (benign) or 1 (malignant), both present; got {self.labels}")
        parse_threshold_policy(self.threshold_policy)
        self._check_finetune_only()
        return self

    def _check_finetune_only(self) -> None:
        """Distillation, starting weights and source weights: settings of a fine-tune, and their values."""
        if (self.teacher or self.extra) and self.mode != "finetune":
            raise ConfigError("teacher / extra: distillation trains a network (mode: finetune), not a linear probe")
        if self.init_from and self.mode != "finetune":
            raise ConfigError("init_from: starting weights are for fine-tuning (mode: finetune), not a linear probe")
        if self.distill_out_of_fold and not self.teacher:
            raise ConfigError("distill_out_of_fold: out-of-fold targets need the teacher runs of every fold; add "
                              "teacher")
        if self.extra and not self.teacher:
            raise ConfigError("extra: images without labels need a teacher to give their targets; add teacher")
        if self.source_weights and self.mode != "finetune":
            raise ConfigError("source_weights: sampling by source is for fine-tuning (mode: finetune); a linear probe "
                              "fits every training image once")
        for name, weight in self.source_weights.items():
            if not 0 < weight <= 100:
                raise ConfigError(f"source_weights: {name}: expected a weight above 0 and at most 100, got {weight}")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"distill_alpha: must be in [0, 1], got {self.distill_alpha}")

    @property
    def train_name(self) -> str:
        """The training sources, for messages."""
        return " + ".join(self.train_paths)

    def positive_indices(self, class_names: list[str]) -> list[int]:
        """The classes whose probabilities add up to the malignant probability."""
        if self.head == "binary":
            return [1]
        return [i for i, name in enumerate(class_names) if self.labels[name] == 1]

    def judged(self, frame) -> Any:
        """The rows (a boolean array) whose held-out predictions choose the model and its threshold: those of
        `select_on`, or all."""
        import numpy as np

        if not self.select_on:
            return np.ones(len(frame), bool)
        return (frame["source"] == self.select_on).to_numpy()

    @property
    def train_paths(self) -> list[str]:
        """The training manifests or folders (one or several sources)."""
        return self.train if isinstance(self.train, list) else [self.train] if self.train else []

    @property
    def inference_size(self) -> int:
        """The size validation and the saved model resize images to."""
        return self.eval_image_size or self.image_size


def parse_threshold_policy(policy: str) -> tuple[str, float | None]:
    """'sensitivity:0.9' -> ('sensitivity', 0.9); 'youden' -> ('youden', None); 'fixed:0.5' -> ('fixed', 0.5)."""
    match = re.fullmatch(r"(youden)|(sensitivity|specificity|fixed):([0-9]*\.?[0-9]+)", policy.strip())
    if not match:
        raise ConfigError(
            f"threshold_policy: expected 'youden', 'sensitivity:S', 'specificity:S' or 'fixed:T', got {policy!r}"
        )
    if match.group(1):
        return "youden", None
    kind, value = match.group(2), float(match.group(3))
    if not 0 <= value <= 1:
        raise ConfigError(f"threshold_policy: {kind} value must be between 0 and 1, got {value}")
    return kind, value


def parse_source_weights(pairs: list[str]) -> dict[str, float]:
    """['ham10000=0.16'] -> {'ham10000': 0.16} (--source-weight, given once per source)."""
    weights: dict[str, float] = {}
    for item in pairs:
        name, sep, value = item.partition("=")
        try:
            weight = float(value) if sep and name.strip() else None
        except ValueError:
            weight = None
        if weight is None:
            raise ConfigError(f"source_weights: expected SOURCE=WEIGHT (e.g. ham10000=0.16), got {item!r}")
        if name.strip() in weights:
            raise ConfigError(f"source_weights: {name.strip()} given twice")
        weights[name.strip()] = weight
    return weights


def parse_labels(text: str) -> dict[str, int]:
    """'melanoma=1,nevus=0' -> {'melanoma': 1, 'nevus': 0}."""
    labels: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or value.strip() not in ("0", "1") or not name.strip():
            raise ConfigError(f"labels: expected NAME=0 or NAME=1 separated by commas, got {item!r} in {text!r}")
        if name.strip() in labels:
            raise ConfigError(f"labels: {name.strip()} given twice in {text!r}")
        labels[name.strip()] = int(value)
    if set(labels.values()) != {0, 1}:
        raise ConfigError(f"labels: need at least one class =1 and one =0, got {text!r}")
    return labels


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
               "list_type": "list", "dict_type": "dict"}


def _message(err: ValidationError, values: dict[str, Any]) -> str:
    """pydantic's first complaint as one line that names the field and what it expected, as the checks above do."""
    problems = err.errors()
    extra = [str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden"]
    if extra:
        return f"unknown config key(s): {', '.join(sorted(extra))}"
    problem = problems[0]
    cause = (problem.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # raised by a check of ours: already worded
        return str(cause)
    name, value = str(problem["loc"][0]) if problem["loc"] else "config", problem["input"]
    if len(problem["loc"]) > 1:  # an entry of linear_c or source_weights
        kind = "a mapping of names to numbers" if isinstance(values.get(name), dict) else "a list of numbers"
        if problem["type"] == "finite_number":
            return f"{name}: entries must be finite numbers, got {values.get(name)!r}"
        return f"{name}: expected {kind}, got {values.get(name)!r}"
    if problem["type"] == "finite_number":
        return f"{name}: must be a finite number, got {value}"
    if problem["type"] == "float_type" and isinstance(value, str) and _is_number(value):
        return f"{name}: expected float, got the string {value!r}; write the number without quotes"
    if problem["type"] in _TYPE_NAMES:
        return f"{name}: expected {_TYPE_NAMES[problem['type']]}, got {value!r}"
    return f"{name}: {problem['msg']}, got {value!r}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.2 habits: 1e-3 is a float (not the string '1e-3'), and a key given
    twice in one mapping is an error (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(f"{self.name}: key {key!r} given twice (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own check reports it
                continue
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(path: Path) -> Any:
    """A YAML file read with _ConfigLoader; unreadable text and bad YAML become ConfigErrors naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    loader = _ConfigLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def config_fields() -> set[str]:
    return set(TrainConfig.model_fields)


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Read a YAML file (if given), apply the overrides that are not None, and check everything."""
    values: dict[str, Any] = {}
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in config_fields())
    if unknown:  # a keyword argument, not the file's
        raise ConfigError(f"load_config: unknown field(s) {', '.join(unknown)}; the fields are those of TrainConfig")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - config_fields())
    if unknown:
        source = f" in {path}" if path is not None else ""
        raise ConfigError(f"unknown config key(s){source}: {', '.join(unknown)}")
    return TrainConfig(**values)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return config.model_dump()
