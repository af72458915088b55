"""Download: fetch a challenge's archives (resumable, verified) and unpack them into folder-per-class trees."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import yaml
from tqdm.auto import tqdm

from .checkpoint import write_json
from .images import IMAGE_EXTENSIONS
from .progress import progress as progress_bar
from .provenance import file_sha256

log = logging.getLogger("skincancer")

# The tutorial's (udacity/dermatologist-ai) mirror of the ISIC 2017 challenge images, already sorted into
# <split>/<diagnosis>/ folders: train 2000, valid 150, test 600 images.
ISIC2017_BASE_URL = "https://s3-us-west-1.amazonaws.com/udacity-dlnfd/datasets/skin-cancer/"
ISIC2017_PARTS = ("train", "valid", "test")
DATASETS = ("isic2017",)
MARKER = ".skincancer-download.json"
CHUNK = 1 << 20
MAX_RETRY_WAIT = 30.0  # seconds; the wait grows with each retry up to this
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db"}


class DownloadError(RuntimeError):
    """A download or an archive that could not be used; the message names the URL or the file."""


@dataclass(frozen=True)
class Archive:
    """One archive to fetch: it unpacks into DEST/<name>/<diagnosis>/<images>."""

    name: str
    url: str
    sha256: str | None = None
    size: int | None = None


def isic2017_archives(base_url: str = ISIC2017_BASE_URL) -> list[Archive]:
    """The three ISIC 2017 archives (train, valid, test) under `base_url`."""
    base = base_url if base_url.endswith("/") else base_url + "/"
    _check_url(base, "--base-url")
    return [Archive(part, f"{base}{part}.zip") for part in ISIC2017_PARTS]


def load_archive_list(path: str | Path) -> list[Archive]:
    """Archives from a YAML/JSON file: a list of URLs, a list of {url, name?, sha256?, size?}, or {name: url}."""
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DownloadError(f"{path}: cannot read the archive list ({err})") from None
    if isinstance(entries, dict):  # {name: url} or {name: {url, sha256?, size?}}
        entries = [{"name": name, **value} if isinstance(value, dict) else {"name": name, "url": value}
                   for name, value in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise DownloadError(f"{path}: expected a non-empty list of URLs or of {{url, name, sha256, size}}")
    archives = []
    for i, entry in enumerate(entries):
        entry = {"url": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise DownloadError(f"{path}: entry {i + 1} has no url: {entry!r}")
        unknown = set(entry) - {"url", "name", "sha256", "size"}
        if unknown:
            raise DownloadError(f"{path}: entry {i + 1} has unknown key(s) {', '.join(sorted(unknown))}")
        _check_url(entry["url"], f"{path}: entry {i + 1}")
        name = str(entry.get("name") or _archive_stem(entry["url"]))
        if not name or name != Path(name).name or name.startswith("."):
            raise DownloadError(f"{path}: entry {i + 1}: {name!r} is not a plain folder name")
        size, sha256 = entry.get("size"), str(entry.get("sha256") or "").lower() or None
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise DownloadError(f"{path}: entry {i + 1}: size must be a whole number of bytes, got {size!r}")
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise DownloadError(f"{path}: entry {i + 1}: sha256 must be 64 hexadecimal digits, got {sha256!r}")
        archives.append(Archive(name, entry["url"], sha256, size))
    names = [a.name for a in archives]
    if len(set(names)) != len(names):
        raise DownloadError(f"{path}: archive names must be unique, got {names}")
    return archives


def download_dataset(archives: Iterable[Archive], dest: str | Path, keep_archives: bool = False, retries: int = 5,
                     retry_wait: float = 2.0, timeout: float = 60.0, progress: bool = True) -> dict:
    """Fetch and unpack each archive into DEST/<name>/; parts already recorded in DEST's marker are skipped.

    Every part is tried; when some fail, the others are still completed and recorded, then a DownloadError
    lists the failures. Returns the marker's contents ({name: {url, sha256, size, files}}).
    """
    _check_retries(retries, retry_wait)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    done = read_marker(dest)
    failures = []
    for archive in archives:
        if archive.name in done and (dest / archive.name).is_dir():
            log.info("%s: already downloaded and unpacked in %s", archive.name, dest / archive.name)
            continue
        try:
            done[archive.name] = _fetch_and_unpack(archive, dest, keep_archives, retries, retry_wait, timeout,
                                                   progress)
        except DownloadError as err:
            failures.append(str(err))
            continue
        _write_marker(dest, done)
    if failures:
        raise DownloadError("; ".join(failures))
    return done


def read_marker(dest: str | Path) -> dict:
    """The parts completed in DEST (empty when none)."""
    path = Path(dest) / MARKER
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DownloadError(f"{path}: unreadable download record ({err}); delete it to start over") from None


def download_file(url: str, target: str | Path, size: int | None = None, sha256: str | None = None,
                  retries: int = 5, retry_wait: float = 2.0, timeout: float = 60.0, progress: bool = True) -> str:
    """Download `url` to `target`, resuming TARGET.part with HTTP Range requests after a broken connection.

    The size is checked against the server's length (and `size` when given), the SHA-256 against `sha256` when
    given. Returns the file's SHA-256.
    """
    _check_retries(retries, retry_wait)
    target = Path(target)
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    total = size
    attempt = 0
    bar = progress_bar(desc=target.name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                       leave=False)
    try:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if total is not None and have == total:
                break
            if total is not None and have > total:
                part.unlink()  # longer than the archive: not a prefix of it
                have = 0
            try:
                total = _fetch_into(url, part, have, total, timeout, bar)
                break
            except _Retryable as err:
                if isinstance(err, _Refused) and attempt == 0 and have == 0:
                    # nothing listens there: a wrong host or port, or a server that is down; waiting will not help
                    raise DownloadError(f"{url}: {err} (is the URL right and the server up?)") from None
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"{url}: gave up after {retries} retries ({err})") from None
                log.warning("%s: %s; resuming (retry %d of %d)", url, err, attempt, retries)
                time.sleep(min(retry_wait * attempt, MAX_RETRY_WAIT))
    finally:
        bar.close()
    got = part.stat().st_size
    if total is not None and got != total:
        part.unlink()
        raise DownloadError(f"{url}: got {got} bytes, expected {total}; the partial file was deleted")
    digest = file_sha256(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise DownloadError(f"{url}: SHA-256 {digest} does not match the expected {sha256}; "
                            "the downloaded file was deleted")
    os.replace(part, target)
    return digest


def extract_archive(archive: str | Path, dest: str | Path, source: str = "") -> int:
    """Unpack a zip of <diagnosis>/<images> folders (possibly under one top-level folder) into `dest`.

    All members are CRC-checked and their paths vetted before anything is written; the tree is built in a
    temporary folder beside `dest` and renamed into place, so a bad archive leaves nothing behind.
    Returns the number of image files.
    """
    archive, dest = Path(archive), Path(dest)
    what = f"{archive}" + (f" (from {source})" if source else "")
    if dest.exists():
        raise DownloadError(f"{dest} already exists; move it away or delete it before unpacking {what}")
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not _ignored(m.filename)]
            for member in members:
                _check_member(member, what)
            broken = bundle.testzip()  # reads every member and checks its CRC
            if broken is not None:
                raise DownloadError(f"corrupt archive {what}: member {broken} fails its CRC check")
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
            try:
                for member in members:
                    bundle.extract(member, tmp)
                root = _class_root(tmp)
                count = _check_layout(root, what)
                os.chmod(root, 0o755)  # mkdtemp's folder is private
                os.replace(root, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise DownloadError(f"corrupt archive {what}: {err}") from None
    return count


# ---------------------------------------------------------------- internals


class _Retryable(Exception):
    """A broken connection or a transient server error: resume from what is on disk."""


class _Refused(_Retryable):
    """The connection was refused: retried only once some bytes have come through."""


def _check_url(url: str, what: str) -> None:
    """Only http(s) URLs with a host: anything else would fail deep inside urllib ('unknown url type')."""
    try:
        parsed = urllib.parse.urlparse(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and (parsed.port or 0) >= 0
    except (TypeError, ValueError):  # not text, or a port that is not a number
        ok = False
    if not ok:
        raise DownloadError(f"{what}: {url!r} is not an http:// or https:// URL")


def _check_retries(retries: int, retry_wait: float) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise DownloadError(f"retries must be a whole number >= 0, got {retries!r}")
    if not retry_wait >= 0:  # also refuses NaN
        raise DownloadError(f"retry_wait must be >= 0 seconds, got {retry_wait!r}")


def _fetch_and_unpack(archive: Archive, dest: Path, keep_archives: bool, retries: int, retry_wait: float,
                      timeout: float, progress: bool) -> dict:
    if (dest / archive.name).exists():
        raise DownloadError(f"{dest / archive.name} exists but was not made by this downloader (no record in "
                            f"{dest / MARKER}); move it away before downloading {archive.url}")
    zip_path = dest / ".archives" / f"{archive.name}.zip"
    if zip_path.exists():
        digest = file_sha256(zip_path)  # downloaded by an earlier run that stopped before unpacking
        if archive.sha256 is not None and digest != archive.sha256:
            zip_path.unlink()
    if not zip_path.exists():
        try:
            digest = download_file(archive.url, zip_path, archive.size, archive.sha256, retries, retry_wait,
                                   timeout, progress)
        except DownloadError:
            if zip_path.parent.is_dir() and not any(zip_path.parent.iterdir()):
                zip_path.parent.rmdir()  # leave no empty .archives behind; a .part file stays for resuming
            raise
    size = zip_path.stat().st_size
    try:
        count = extract_archive(zip_path, dest / archive.name, source=archive.url)
    except DownloadError:
        _remove_archive(zip_path)  # so that the next run fetches it again
        raise
    if not keep_archives:
        _remove_archive(zip_path)
    log.info("%s: %d images in %s", archive.name, count, dest / archive.name)
    return {**asdict(archive), "sha256": digest, "size": size, "files": count}


def _remove_archive(zip_path: Path) -> None:
    zip_path.unlink(missing_ok=True)
    if zip_path.parent.is_dir() and not any(zip_path.parent.iterdir()):
        zip_path.parent.rmdir()


def _fetch_into(url: str, part: Path, have: int, total: int | None, timeout: float, bar: tqdm) -> int | None:
    """Append the bytes from offset `have` to `part`; returns the full length (None when the server gives none)."""
    headers = {"User-Agent": "skincancer-downloader"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            part.unlink()
            raise _Retryable(f"HTTP 416 for bytes {have}- (partial file larger than the archive)") from None
        if err.code in (408, 429) or err.code >= 500:
            raise _Retryable(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, ConnectionRefusedError):
            raise _Refused(f"connection refused ({err.reason})") from None
        if isinstance(err.reason, (TimeoutError, ConnectionError)):
            raise _Retryable(str(err.reason)) from None
        raise DownloadError(f"{url}: {err.reason}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
        raise _Retryable(str(err)) from None
    except ValueError as err:  # a URL urllib cannot use (no scheme, bad port...)
        raise DownloadError(f"{url}: not a usable URL ({err})") from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if response.status == 206:
            start, full = _content_range(response.headers.get("Content-Range", ""), url)
            if start != have:
                raise DownloadError(f"{url}: asked for bytes from {have}, the server sent from {start}")
            mode = "ab"
        else:  # 200: a server without Range support sends the whole file again
            start, full, mode = 0, length, "wb"
        if total is not None and full is not None and full != total:
            raise DownloadError(f"{url}: the server's length {full} differs from the expected {total}")
        total = full if full is not None else total
        bar.reset(total=total)
        bar.update(start)
        received = 0
        with open(part, mode) as handle:
            try:
                while block := response.read(CHUNK):
                    handle.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                raise _Retryable(f"connection broken after {start + received} bytes ({err})") from None
    # http.client returns a short body without complaint when the server closes early: count the bytes
    if length is not None and received < length:
        raise _Retryable(f"connection closed after {start + received} of {start + length} bytes")
    return total


def _content_range(value: str, url: str) -> tuple[int, int | None]:
    """'bytes 100-999/1000' -> (100, 1000); the total may be '*'."""
    try:
        unit, _, spec = value.partition(" ")
        span, _, full = spec.partition("/")
        if unit != "bytes":
            raise ValueError(value)
        return int(span.split("-")[0]), (None if full == "*" else int(full))
    except ValueError:
        raise DownloadError(f"{url}: unusable Content-Range header {value!r}") from None


def _archive_stem(url: str) -> str:
    name = PurePosixPath(urllib.request.urlparse(url).path).name
    return name[: -len(".zip")] if name.lower().endswith(".zip") else name


def _ignored(filename: str) -> bool:
    return any(part in IGNORED_NAMES or part.startswith("._") for part in PurePosixPath(filename).parts)


def _check_member(member: zipfile.ZipInfo, what: str) -> None:
    """Refuse zip-slip paths (absolute, '..', drive letters) and symbolic links."""
    name = member.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        raise DownloadError(f"unsafe archive {what}: member {member.filename!r} points outside the folder")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise DownloadError(f"unsafe archive {what}: member {member.filename!r} is a symbolic link")


def _class_root(tmp: Path) -> Path:
    """Descend through lone top-level folders (train.zip -> train/) down to the folder of class folders."""
    root = tmp
    while True:
        entries = [p for p in root.iterdir() if not _ignored(p.name)]
        if len(entries) != 1 or not entries[0].is_dir() or _has_images(entries[0]):
            return root
        root = entries[0]


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def _check_layout(root: Path, what: str) -> int:
    classes = [p for p in root.iterdir() if p.is_dir() and not _ignored(p.name)]
    counts = {p.name: sum(1 for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
              for p in classes}
    if not counts or not any(counts.values()):
        raise DownloadError(f"archive {what} has no <diagnosis>/<image> folders (found "
                            f"{', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'})")
    return sum(counts.values())


def _write_marker(dest: Path, done: dict) -> None:
    write_json(dest / MARKER, done)
