"""Provenance: the git commit and its dirty flag, data fingerprints, and records that survive hand edits."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from skincancer.provenance import data_fingerprint, describe, environment, git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A repository with a package `pkg/` (committed) and a README beside it."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "README.md").write_text("readme\n")
    (repo / ".gitignore").write_text(".venv/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    return repo


def test_git_commit_and_dirty_flag_of_the_package(checkout):
    package = checkout / "pkg"
    assert git_commit(package) == {"commit": git(checkout, "rev-parse", "HEAD"), "dirty": False}
    (checkout / "README.md").write_text("changed\n")  # outside the package: the code is unchanged
    assert git_commit(package)["dirty"] is False
    (package / "new_module.py").write_text("x = 1\n")  # untracked code in the package counts
    assert git_commit(package)["dirty"] is True
    (package / "new_module.py").unlink()
    (package / "__init__.py").write_text("y = 2\n")
    assert git_commit(package)["dirty"] is True


def test_no_commit_for_a_copy_outside_a_checkout_or_in_an_ignored_folder(checkout, tmp_path):
    loose = tmp_path / "loose" / "pkg"
    shutil.copytree(checkout / "pkg", loose)
    assert git_commit(loose) is None
    installed = checkout / ".venv" / "site-packages" / "pkg"  # an installed copy inside the checkout
    shutil.copytree(checkout / "pkg", installed)
    assert git_commit(installed) is None


def test_environment_leaves_the_command_line_out_and_names_the_device():
    env = environment("cpu")
    assert "command" not in env and env["device"] == "cpu" and env["processes"] >= 1
    assert env["skincancer"] in describe(env) and "on cpu" in describe(env)


def test_describe_tolerates_partial_or_broken_records():
    assert describe({"packages": None, "git": {"commit": 5}}) == "skincancer ?"
    assert describe("nonsense") == "an unreadable environment record"
    full = {"skincancer": "0.1.0", "git": {"commit": "a" * 40, "dirty": True}, "packages": {"torch": "2.14.1"},
            "python": "3.11.7"}
    assert describe(full) == "skincancer 0.1.0 (git aaaaaaa, uncommitted changes), torch 2.14.1, Python 3.11.7"


def test_data_fingerprint_ignores_order_and_place_but_not_labels():
    keys, diagnoses = ["a1", "b2", "c3"], ["melanoma", "nevus", "nevus"]
    fingerprint = data_fingerprint(keys, diagnoses)
    assert data_fingerprint(keys[::-1], diagnoses[::-1]) == fingerprint
    assert data_fingerprint(keys, ["nevus", "nevus", "nevus"]) != fingerprint
    assert data_fingerprint(keys[:2], diagnoses[:2]) != fingerprint
