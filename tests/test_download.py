"""Tests: the ISIC downloader against a loopback HTTP server (Range support, a cut connection, a corrupt zip)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from skincancer.config import ISIC2017_LABELS
from skincancer.data import index_folder
from skincancer.download import (
    MARKER,
    Archive,
    DownloadError,
    download_dataset,
    download_file,
    extract_archive,
    isic2017_archives,
    load_archive_list,
    read_marker,
)

PER_CLASS = 2


class ArchiveServer(ThreadingHTTPServer):
    """Serves `files` (path -> bytes) with byte ranges; `cut[path] = n` closes the first response after n bytes."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class RangeHandler(BaseHTTPRequestHandler):
    server: ArchiveServer

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def do_GET(self) -> None:
        path = self.path.lstrip("/")
        self.server.requests.append((path, self.headers.get("Range")))
        body = self.server.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.cut.pop(path, None)
        if cut is not None:  # promise the whole body, send part of it, hang up
            self.wfile.write(body[start:start + cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture()
def server():
    httpd = ArchiveServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def images(data_dir, tmp_path_factory) -> Path:
    """A few real ISIC images per class, copied into a temporary folder-per-class tree."""
    root = tmp_path_factory.mktemp("images")
    for diagnosis in ISIC2017_LABELS:
        (root / diagnosis).mkdir()
        for path in sorted((data_dir / "train" / diagnosis).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(path, root / diagnosis / path.name)
    return root


def make_zip(images: Path, top: str = "") -> bytes:
    """A zip of <diagnosis>/<image> (under `top`/ when given), with a macOS resource folder to be ignored."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
        for path in sorted(images.rglob("*.jpg")):
            bundle.write(path, f"{top}{path.relative_to(images).as_posix()}")
        bundle.writestr(f"__MACOSX/{top}._junk", b"resource fork")
    return buffer.getvalue()


def corrupt(archive: bytes) -> bytes:
    """Flip bytes inside the last member's data: the zip still opens, its CRC check fails."""
    with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
        member = [m for m in bundle.infolist() if m.filename.endswith(".jpg")][-1]
    data_start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    middle = data_start + member.compress_size // 2
    broken = bytearray(archive)
    broken[middle:middle + 64] = bytes(b ^ 0xFF for b in broken[middle:middle + 64])
    return bytes(broken)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_isic2017_download_resumes_a_cut_connection_and_a_second_run_does_nothing(server, images, tmp_path):
    server.files["train.zip"] = make_zip(images, top="train/")  # the official zips hold a top-level folder
    server.files["valid.zip"] = make_zip(images)                # and without one
    server.files["test.zip"] = make_zip(images, top="test/")
    cut_at = len(server.files["train.zip"]) // 3
    server.cut["train.zip"] = cut_at
    dest = tmp_path / "isic2017"

    done = download_dataset(isic2017_archives(server.url), dest, retry_wait=0, progress=False)

    # the cut download was resumed from where it stopped, not restarted
    assert [r for r in server.requests if r[0] == "train.zip"] == [("train.zip", None),
                                                                  ("train.zip", f"bytes={cut_at}-")]
    expected = tree(images)
    for split in ("train", "valid", "test"):
        assert tree(dest / split) == expected, split
        manifest = index_folder(dest / split, ISIC2017_LABELS)  # the layout the rest of the tool reads
        assert len(manifest) == PER_CLASS * len(ISIC2017_LABELS)
        assert done[split]["files"] == len(expected)
        assert done[split]["sha256"] == hashlib.sha256(server.files[f"{split}.zip"]).hexdigest()
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "test", "train", "valid"])  # no temp files
    assert read_marker(dest) == done

    server.requests.clear()
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    assert download_dataset(isic2017_archives(server.url), dest, progress=False) == done
    assert server.requests == []  # the second run never touched the network
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before


def test_corrupt_archive_is_reported_and_nothing_is_half_extracted(server, images, tmp_path):
    server.files["train.zip"] = make_zip(images, top="train/")
    server.files["valid.zip"] = corrupt(make_zip(images, top="valid/"))
    dest = tmp_path / "data"
    archives = [Archive("train", server.url + "train.zip"), Archive("valid", server.url + "valid.zip")]

    with pytest.raises(DownloadError, match=r"corrupt archive .*valid\.zip \(from http://127\.0\.0\.1:\d+/valid\.zip\)"):
        download_dataset(archives, dest, retry_wait=0, progress=False)

    assert not (dest / "valid").exists()
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "train"]  # no temp folder, no archive left
    assert list(read_marker(dest)) == ["train"]
    assert tree(dest / "train") == tree(images)

    # the server fixed its file: the next run fetches only the missing part
    server.files["valid.zip"] = make_zip(images, top="valid/")
    server.requests.clear()
    download_dataset(archives, dest, retry_wait=0, progress=False)
    assert [r[0] for r in server.requests] == ["valid.zip"]
    assert tree(dest / "valid") == tree(images)


def test_not_a_zip_and_checksum_mismatch_and_http_errors_name_the_url(server, images, tmp_path):
    server.files["html.zip"] = b"<html>Access denied</html>" * 100
    server.files["good.zip"] = make_zip(images)
    with pytest.raises(DownloadError, match=r"corrupt archive .*html\.zip .*File is not a zip file"):
        download_dataset([Archive("html", server.url + "html.zip")], tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "html").exists()

    with pytest.raises(DownloadError, match=r"good\.zip: SHA-256 [0-9a-f]{64} does not match the expected 0{64}"):
        download_file(server.url + "good.zip", tmp_path / "b" / "good.zip", sha256="0" * 64, progress=False)
    assert list((tmp_path / "b").iterdir()) == []

    with pytest.raises(DownloadError, match=r"got \d+ bytes, expected 12|length \d+ differs from the expected 12"):
        download_file(server.url + "good.zip", tmp_path / "c" / "good.zip", size=12, progress=False)

    with pytest.raises(DownloadError, match=r"http://127\.0\.0\.1:\d+/missing\.zip: HTTP 404"):
        download_file(server.url + "missing.zip", tmp_path / "d" / "missing.zip", progress=False)

    digest = download_file(server.url + "good.zip", tmp_path / "e" / "good.zip",
                           sha256=hashlib.sha256(server.files["good.zip"]).hexdigest(), progress=False)
    assert (tmp_path / "e" / "good.zip").read_bytes() == server.files["good.zip"]
    assert digest == hashlib.sha256(server.files["good.zip"]).hexdigest()


def test_gives_up_after_the_retries_when_the_connection_keeps_breaking(server, images, tmp_path):
    server.files["train.zip"] = make_zip(images)

    class AlwaysCut(dict):  # every request is cut, not only the first
        def pop(self, key, default=None):
            return 100 if key == "train.zip" else default

    server.cut = AlwaysCut()
    with pytest.raises(DownloadError, match=r"train\.zip: gave up after 2 retries \(connection closed after"):
        download_file(server.url + "train.zip", tmp_path / "train.zip", retries=2, retry_wait=0, progress=False)
    assert len(server.requests) == 3
    assert (tmp_path / "train.zip.part").stat().st_size == 300  # kept for the next run to resume


def test_zip_slip_and_symlinks_are_refused(tmp_path):
    for name, member in [("slip", zipfile.ZipInfo("../evil.jpg")), ("absolute", zipfile.ZipInfo("/tmp/evil.jpg"))]:
        archive = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(archive, "w") as bundle:
            bundle.writestr(member, b"x")
        with pytest.raises(DownloadError, match="points outside the folder"):
            extract_archive(archive, tmp_path / name)
        assert not (tmp_path / name).exists() and not (tmp_path.parent / "evil.jpg").exists()
    link = zipfile.ZipInfo("melanoma/link.jpg")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as bundle:
        bundle.writestr(link, "/etc/passwd")
    with pytest.raises(DownloadError, match="is a symbolic link"):
        extract_archive(tmp_path / "link.zip", tmp_path / "link")
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as bundle:
        bundle.writestr("readme.txt", "no class folders")
    with pytest.raises(DownloadError, match=r"has no <diagnosis>/<image> folders \(found readme\.txt\)"):
        extract_archive(tmp_path / "flat.zip", tmp_path / "flat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["absolute.zip", "flat.zip", "link.zip", "slip.zip"]


def test_archive_list_files(tmp_path):
    (tmp_path / "urls.yaml").write_text("- http://h/x/train.zip\n- url: http://h/y/other.zip\n  name: valid\n"
                                        f"  sha256: {'A' * 64}\n  size: 10\n")
    assert load_archive_list(tmp_path / "urls.yaml") == [
        Archive("train", "http://h/x/train.zip"), Archive("valid", "http://h/y/other.zip", "a" * 64, 10)]
    (tmp_path / "urls.json").write_text(json.dumps({"test": "http://h/test.zip"}))
    assert load_archive_list(tmp_path / "urls.json") == [Archive("test", "http://h/test.zip")]
    (tmp_path / "bad.yaml").write_text("- name: train\n")
    with pytest.raises(DownloadError, match=r"bad\.yaml: entry 1 has no url"):
        load_archive_list(tmp_path / "bad.yaml")
    (tmp_path / "evil.yaml").write_text("- url: http://h/a.zip\n  name: ../up\n")
    with pytest.raises(DownloadError, match="not a plain folder name"):
        load_archive_list(tmp_path / "evil.yaml")
    assert [a.url for a in isic2017_archives()] == [
        f"https://s3-us-west-1.amazonaws.com/udacity-dlnfd/datasets/skin-cancer/{s}.zip" for s in ("train", "valid",
                                                                                                   "test")]


def test_cli_download_with_a_url_list_then_a_second_run(cli, server, images, tmp_path):
    server.files["tr.zip"] = make_zip(images, top="train/")
    (tmp_path / "urls.yaml").write_text(f"- url: {server.url}tr.zip\n  name: train\n")
    args = ["download", "isic2017", "--dest", str(tmp_path / "d"), "--urls", str(tmp_path / "urls.yaml")]
    first = cli(*args)
    assert first.returncode == 0, first.output
    assert f"{tmp_path / 'd' / 'train'}: {PER_CLASS * len(ISIC2017_LABELS)} images" in first.output
    server.requests.clear()
    second = cli(*args)
    assert second.returncode == 0 and server.requests == []
    bad = cli("download", "isic2018", "--dest", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown dataset 'isic2018'" in bad.output
