"""skincancer: melanoma vs benign dermoscopy classification by transfer learning (a research aid, not a device)."""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

NOTICE = (
    "Research aid only, not a medical device: it has not been clinically validated and must not be used to "
    "diagnose, treat or rule out skin cancer. See a dermatologist about any lesion that worries you."
)

# The public API, imported on first use: `skincancer --help` and `import skincancer` need not pay for torch.
_API = {
    "TrainConfig": "config", "load_config": "config",
    "index_folder": "data", "index_isic_csv": "sources", "load_manifest": "data", "save_manifest": "data",
    "compare": "evaluate", "evaluate": "evaluate",
    "Classifier": "predict", "load_model": "predict",
    "train": "train",
}

__all__ = ["NOTICE", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


class _Package(types.ModuleType):
    """`skincancer.train` and `skincancer.evaluate` are the functions, as the API says, whichever was imported
    first: importing the submodules of the same names (skincancer.train, skincancer.evaluate) would otherwise set
    the package's attributes to the modules. The modules stay in sys.modules."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
