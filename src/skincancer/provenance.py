"""Provenance: which code, libraries, machine and data made a model or an evaluation (recorded beside the figures)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import __version__
from .progress import world_from_env

ENVIRONMENT_FILE = "environment.json"  # in a run's model folder, from the run's start (read back by --resume)
PACKAGES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "onnxruntime")


def environment(device: str | None = None) -> dict:
    """The time, skincancer's version and git commit, the libraries and the machine (`device`: what ran the model).
    Not the command line: its paths would travel with the weights (the run's config.yaml and train.log have them)."""
    import torch

    env = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "skincancer": __version__,
        "git": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {**{name: _version(name) for name in PACKAGES}, "torch": torch.__version__},  # with +cu130 etc.
        "cpu_threads": torch.get_num_threads(),
        "processes": world_from_env()[1],  # torchrun's; its own flags are not in sys.argv
    }
    if device is not None:
        env["device"] = device if device == "cpu" or not device.startswith("cuda") else (
            f"{device} ({torch.cuda.get_device_name(torch.device(device))})")
    return env


def git_commit(package: Path | None = None) -> dict | None:
    """{'commit': sha, 'dirty': uncommitted changes to the package's files, untracked ones included} when skincancer
    runs from a git checkout (an editable install); None otherwise, e.g. an installed copy, even one inside a
    checkout's ignored .venv. `package`: the package folder (default: this one)."""
    here = Path(package or Path(__file__).resolve().parent)
    # -C alone is overridden by a GIT_DIR set around us (a git hook); no optional locks: status may not take
    # .git/index.lock, which a commit the user runs meanwhile needs
    environ = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE")}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(here), *args], capture_output=True, text=True,
                              timeout=10, env=environ)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None  # this package is not the checkout's: the commit would describe other code
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None  # no git on the machine
    if commit.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks: the one file hash of weights, guards, exports and downloads."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(content_keys: Sequence[str], labels: Sequence) -> str:
    """SHA-256 over the sorted (image content hash, label or diagnosis) pairs: the same images with the same labels
    give the same fingerprint wherever they lie and in whatever order the manifest lists them."""
    pairs = sorted(f"{key},{label}" for key, label in zip(content_keys, labels, strict=True))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def describe(env: dict) -> str:
    """One line for logs and reports: 'skincancer 0.1.0 (git 1a2b3c4, uncommitted changes), torch 2.14.1, ...'.
    Tolerates a hand-edited or partial record (missing parts are left out)."""
    if not isinstance(env, dict):
        return "an unreadable environment record"
    git, packages = env.get("git"), env.get("packages")
    code = ""
    if isinstance(git, dict) and isinstance(git.get("commit"), str):
        code = f" (git {git['commit'][:7]}{', uncommitted changes' if git.get('dirty') else ''})"
    parts = [f"skincancer {env.get('skincancer', '?')}{code}"]
    if isinstance(packages, dict):
        parts += [f"{name} {version}" for name, version in packages.items() if version]
    if env.get("python"):
        parts.append(f"Python {env['python']}")
    if env.get("device"):
        parts.append(f"on {env['device']}")
    return ", ".join(parts)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
