"""Test helper: run `skincancer serve` in a subprocess on a free loopback port, and stop it afterwards."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path | list[Path], *extra: str, timeout: float = 90.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base URL, process) once GET /api/health answers; the default host is left to the CLI. Several runs:
    an ensemble (`--model` repeated)."""
    port = free_port()
    models = [arg for r in (run if isinstance(run, list) else [run]) for arg in ("--model", str(r))]
    process = subprocess.Popen([sys.executable, "-m", "skincancer", "serve", *models, "--port", str(port), *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # read the server's output as it comes: a full pipe (64 KB of access-log lines) would block the server
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                reader.join(timeout=10)
                raise RuntimeError(f"server exited with {process.returncode}: {''.join(lines)}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        process.stdout = io.StringIO("".join(lines))  # what the tests read afterwards, as from the pipe
