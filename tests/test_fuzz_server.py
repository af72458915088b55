"""Server fuzzing: schema-driven (schemathesis) and hostile requests get no 5xx, the server stays up, memory is flat."""

from __future__ import annotations

import io
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from badcorpus import bomb_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import serving
from PIL import Image
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.slow
LIMIT_MB = 2
RSS_GROWTH_LIMIT_MB = 50


@pytest.fixture(scope="module")
def live(tiny_run, tmp_path_factory) -> Iterator[dict]:
    """A real `skincancer serve` process on loopback, with its own TMPDIR so leaked upload files would show."""
    tmpdir = tmp_path_factory.mktemp("server-tmp")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)  # inherited by the server process
    try:
        with serving(tiny_run, "--max-upload-mb", str(LIMIT_MB), "--engine", "torch") as (url, process):
            yield {"url": url, "process": process, "tmpdir": tmpdir}
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved


def assert_alive(live: dict) -> None:
    assert live["process"].poll() is None, "the server process died"
    assert httpx.get(f"{live['url']}/api/health", timeout=10).status_code == 200
    assert not list(live["tmpdir"].iterdir()), "upload temp files were left behind"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@pytest.fixture(scope="module")
def lesion_bytes(data_dir) -> bytes:
    return sorted((data_dir / "test" / "melanoma").glob("*.jpg"))[0].read_bytes()


def test_schemathesis_finds_no_server_error(live):
    schema = schemathesis.openapi.from_url(f"{live['url']}/openapi.json")
    operations = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert {("POST", "/api/predict"), ("POST", "/api/predict/batch")} <= operations
    strategy = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                         schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    statuses: list[int] = []

    @given(case=strategy)
    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(base_url=live["url"], timeout=30)
        statuses.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    check()
    assert statuses and max(statuses) < 500
    assert any(code >= 400 for code in statuses), "the fuzzer never sent a bad request: it tested nothing"
    assert_alive(live)


def hostile_requests(rng: random.Random, lesion: bytes) -> Iterator[tuple[str, dict]]:
    """(description, httpx request arguments) pairs for POST /api/predict; a description starting with 'valid'
    carries a real photograph and may be answered 200, every other one must get a 4xx."""
    for size in (0, 1, 7, 100, 5000, 300_000):
        yield f"multipart random {size} bytes", {"files": {"file": ("x.jpg", rng.randbytes(size), "image/jpeg")}}
    mangled = bytearray(lesion)
    for _ in range(40):
        mangled[rng.randrange(200, len(mangled))] = rng.randrange(256)
    yield "multipart mangled JPEG", {"files": {"file": ("lesion.jpg", bytes(mangled), "image/jpeg")}}
    yield "multipart JPEG header only", {"files": {"file": ("lesion.jpg", lesion[:600], "image/jpeg")}}
    yield "multipart decompression bomb", {"files": {"file": ("bomb.png", bomb_png(), "image/png")}}
    yield "valid photo, odd file name", {"files": {"file": ("../../etc/passwd\x00.jpg", lesion, "text/html")}}
    yield "multipart unicode name", {"files": {"file": ("\u202e\u0000gnp.exe", b"\xff\xd8\xff", "image/jpeg")}}
    yield "multipart wrong field name", {"files": {"image": ("x.jpg", lesion, "image/jpeg")}}
    yield "valid photo first of two files", {"files": [("file", ("a.jpg", lesion, "image/jpeg")),
                                            ("file", ("b.jpg", b"junk", "image/jpeg"))]}
    yield "multipart text field instead of file", {"data": {"file": "not a file"}}
    yield "bad cam query", {"files": {"file": ("x.jpg", lesion, "image/jpeg")}, "params": {"cam": "maybe"}}
    for content_type in ("application/octet-stream", "image/jpeg", "text/plain", "application/json",
                         "application/x-www-form-urlencoded", "multipart/form-data",
                         "multipart/form-data; boundary=", "multipart/form-data; boundary=zzz",
                         "multipart/mixed; boundary=zzz", "\x7f/\x7f", ""):
        for body in (lesion[:4000], rng.randbytes(2000), b'{"file": "aGVsbG8="}', b"--zzz\r\n\r\n--zzz--"):
            yield f"raw body as {content_type!r}", {"content": body, "headers": {"content-type": content_type}}
    yield "huge multipart body", {"files": {"file": ("big.jpg", lesion + b"\0" * (LIMIT_MB * 2 << 20), "image/jpeg")}}
    yield "huge raw body", {"content": b"\0" * (LIMIT_MB * 3 << 20), "headers": {"content-type": "image/jpeg"}}
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n' + lesion
    chunks = [part, *(b"\0" * (1 << 20) for _ in range(LIMIT_MB * 3)), b"\r\n--b--\r\n"]
    yield "huge chunked multipart body (no Content-Length)", {
        "content": iter(chunks), "headers": {"content-type": "multipart/form-data; boundary=b"}}


def test_random_bytes_wrong_types_and_huge_bodies_get_4xx(live, lesion_bytes):
    failures = []
    with httpx.Client(base_url=live["url"], timeout=60) as client:
        for description, request in hostile_requests(random.Random(0), lesion_bytes):
            try:
                response = client.post("/api/predict", **request)
            except httpx.TransportError as err:  # a server may hang up on an oversized upload; it must stay up
                if "huge" not in description:
                    failures.append(f"{description}: connection failed ({err!r})")
                continue
            allowed = range(200, 500) if description.startswith("valid") else range(400, 500)
            if response.status_code not in allowed:
                failures.append(f"{description}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert_alive(live)


def test_the_batch_endpoint_answers_hostile_files_one_by_one(live, lesion_bytes):
    """The same requests with the file field named as the batch endpoint wants it: a 4xx for the request, or a 200
    whose every result not from a valid photo carries an error."""
    failures = []
    with httpx.Client(base_url=live["url"], timeout=60) as client:
        for description, request in hostile_requests(random.Random(0), lesion_bytes):
            files = request.get("files")
            if isinstance(files, dict):
                request = {**request, "files": [("files" if k == "file" else k, v) for k, v in files.items()]}
            elif files is not None:
                request = {**request, "files": [("files", v) for _, v in files]}
            try:
                response = client.post("/api/predict/batch", **request)
            except httpx.TransportError as err:
                if "huge" not in description:
                    failures.append(f"{description}: connection failed ({err!r})")
                continue
            if response.status_code == 200:
                results = response.json()["results"]
                answered = [r["filename"] for r in results if "error" not in r]
                valid = description.startswith("valid") or "params" in request  # a photo; no query to refuse here
                if answered and not valid:
                    failures.append(f"{description}: answered {answered}")
            elif not 400 <= response.status_code < 500:
                failures.append(f"{description}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert_alive(live)


@pytest.mark.parametrize("raw", [
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n",
    b"POST /api/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello to the plain-HTTP port
], ids=["content-length-text", "content-length-negative", "body-cut-short", "bad-chunk", "tls-hello"])
def test_malformed_http_does_not_hurt_the_server(live, raw):
    port = int(live["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(raw)
        connection.shutdown(socket.SHUT_WR)  # and hang up mid-request
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:300]
    assert_alive(live)


def test_memory_does_not_grow_over_1000_requests(live, lesion_bytes):
    rng = random.Random(1)
    small = io.BytesIO()
    Image.open(io.BytesIO(lesion_bytes)).resize((64, 64)).save(small, format="PNG")
    uploads = [
        ("lesion.jpg", lesion_bytes, 200), ("small.png", small.getvalue(), 200),
        ("truncated.jpg", lesion_bytes[: len(lesion_bytes) // 2], 422), ("bomb.png", bomb_png(), 422),
        ("text.jpg", b"not an image at all\n" * 20, 415), ("empty.jpg", b"", 422),
    ]

    def send(client: httpx.Client, i: int) -> None:
        if i % 10 == 0:  # every tenth request is a real photograph that goes through the model
            name, data, expected = uploads[(i // 10) % 2]
        elif i % 10 == 5:
            name, data, expected = "noise.jpg", rng.randbytes(rng.randrange(1, 50_000)), None
        else:
            name, data, expected = uploads[2 + i % 4]
        response = client.post("/api/predict", files={"file": (name, data, "image/jpeg")})
        assert response.status_code < 500, (name, response.status_code, response.text[:200])
        if expected is not None:
            assert response.status_code == expected, (name, response.status_code, response.text[:200])

    pid = live["process"].pid
    with httpx.Client(base_url=live["url"], timeout=60) as client:
        for i in range(100):  # warm-up: thread pool, allocator arenas, model caches
            send(client, i)
        before = rss_mb(pid)
        for i in range(1000):
            send(client, i)
        after = rss_mb(pid)
    assert after - before < RSS_GROWTH_LIMIT_MB, f"RSS grew {after - before:.1f} MB ({before:.0f} -> {after:.0f})"
    assert_alive(live)
