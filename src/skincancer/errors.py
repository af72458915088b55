"""The errors the package raises for bad input: each message names the file or field. A leaf module (no torch), so
that the command line can catch them without importing the modules that raise them."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file or field."""


class ImageError(DataError):
    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # picklable: it crosses into DataLoader workers started by spawn or forkserver
        return type(self), (self.path, self.reason)


class MetadataError(DataError):
    """Metadata that cannot be read or understood; the message names the file, row or field."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible; the message names the field."""


class CheckpointError(RuntimeError):
    """A run folder or model file that cannot be used; the message names the file and what to do."""


class BackboneError(RuntimeError):
    """A backbone that cannot be built or given its weights."""
