"""Provenance: which code, libraries, machine and data made a model or an evaluation (recorded beside the figures)."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from . import __version__

PACKAGES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "onnxruntime")


def environment() -> dict:
    """The command line, the time, skincancer's version and git commit, the libraries and the machine."""
    import torch

    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "skincancer": __version__,
        "git": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {**{name: _version(name) for name in PACKAGES}, "torch": torch.__version__},  # with +cu130 etc.
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def git_commit() -> dict | None:
    """{'commit': sha, 'dirty': uncommitted changes to tracked files} when skincancer runs from a git checkout (an
    editable install); None otherwise, e.g. an installed copy, even one inside a checkout's ignored .venv."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None  # this file is not the checkout's: the commit would describe other code
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None  # no git on the machine
    if commit.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def data_fingerprint(content_keys: Sequence[str], labels: Sequence) -> str:
    """SHA-256 over the sorted (image content hash, label or diagnosis) pairs: the same images with the same labels
    give the same fingerprint wherever they lie and in whatever order the manifest lists them."""
    pairs = sorted(f"{key},{label}" for key, label in zip(content_keys, labels, strict=True))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def describe(env: dict) -> str:
    """One line for logs and reports: 'skincancer 0.1.0 (git 1a2b3c4, uncommitted changes), torch 2.14.1, ...'."""
    git = env.get("git")
    code = f" (git {git['commit'][:7]}{', uncommitted changes' if git['dirty'] else ''})" if git else ""
    packages = ", ".join(f"{name} {version}" for name, version in env.get("packages", {}).items() if version)
    return f"skincancer {env.get('skincancer')}{code}, {packages}, Python {env.get('python')}"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
