"""Load test: a bounded number of POST /api/predict (or /batch) requests to `skincancer serve`; latency, errors.

Starts the server itself on a free 127.0.0.1 port (or uses --url, which must be a loopback address), sends real ISIC
JPEGs, and prints one JSON line per concurrency level: p50/p90/p99 latency in ms, errors, requests per second.

    .venv/bin/python benchmarks/load_test.py --model runs/linear224 --requests 500 --concurrency 1,8
    .venv/bin/python benchmarks/load_test.py --model runs/a --model runs/b --requests 50   # an ensemble
    .venv/bin/python benchmarks/load_test.py --model runs/a --requests 20 --batch 32   # POST /api/predict/batch
    .venv/bin/python benchmarks/load_test.py --model runs/a --requests 5 --batch 32 --cam   # with Grad-CAM maps
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"{url}: this load test only targets loopback addresses (127.0.0.0/8, ::1, localhost)")


def start_server(models: list[str], engine: str, timeout: float = 120.0) -> tuple[str, subprocess.Popen]:
    port = free_port()
    runs = [arg for model in models for arg in ("--model", model)]
    process = subprocess.Popen([sys.executable, "-m", "skincancer", "serve", *runs, "--port", str(port), "--engine",
                                engine],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return url, process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.terminate()
    raise SystemExit(f"server did not answer on {url} within {timeout:.0f} s")


async def run_load(url: str, photos: list[tuple[str, bytes]], requests: int, concurrency: int, cam: bool,
                   batch: int = 1) -> dict:
    latencies: list[float] = []
    failures: dict[str, int] = {}
    next_request = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_request
        while next_request < requests:
            sent = [photos[(next_request * batch + i) % len(photos)] for i in range(batch)]
            next_request += 1
            start = time.perf_counter()
            try:
                if batch > 1:
                    response = await client.post("/api/predict/batch", params={"cam": "true"} if cam else None,
                                                 files=[("files", (name, data, "image/jpeg")) for name, data in sent])
                    ok = response.status_code == 200 and response.json()["n_failed"] == 0
                else:
                    name, data = sent[0]
                    response = await client.post("/api/predict", params={"cam": "true"} if cam else None,
                                                 files={"file": (name, data, "image/jpeg")})
                    ok = response.status_code == 200 and "malignant_probability" in response.json()
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                ok, reason = False, type(err).__name__
            latencies.append((time.perf_counter() - start) * 1000)
            if not ok:
                failures[reason] = failures.get(reason, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for name, data in photos[:5]:  # warm-up, not counted
            await client.post("/api/predict", files={"file": (name, data, "image/jpeg")})
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies)
    return {
        "requests": len(latencies), "batch": batch, "concurrency": concurrency, "cam": cam,
        "errors": sum(failures.values()), "images_per_s": round(len(latencies) * batch / wall, 1),
        "error_kinds": failures, "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1), "requests_per_s": round(len(latencies) / wall, 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="run folder to serve (default runs/linear224); repeat for "
                        "an ensemble")
    parser.add_argument("--url", help="an already running server on loopback instead of starting one")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--images", default="../shared/data/isic2017/test", help="folder of JPEGs to send")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels, each a separate run")
    parser.add_argument("--cam", action="store_true", help="ask for the Grad-CAM overlay too")
    parser.add_argument("--batch", type=int, default=1, help="images per request; above 1, POST /api/predict/batch "
                        "(at most the server's --max-batch, 32 by default)")
    args = parser.parse_args()

    photos = [(p.name, p.read_bytes()) for p in sorted(Path(args.images).rglob("*.jpg"))[:64]]
    if not photos:
        raise SystemExit(f"{args.images}: no JPEG files")
    if args.batch < 1:
        raise SystemExit(f"--batch: expected 1 or more images per request, got {args.batch}")
    process = None
    if args.url:
        check_loopback(args.url)
        url = args.url
    else:
        url, process = start_server(args.model or ["runs/linear224"], args.engine)
    try:
        model = httpx.get(f"{url}/api/model", timeout=10).json()
        for level in (int(c) for c in args.concurrency.split(",")):
            result = asyncio.run(run_load(url, photos, args.requests, level, args.cam, args.batch))
            sizes = [m["image_size"] for m in model.get("members", [])] or model["image_size"]
            result.update({"engine": model["engine"], "model": model["backbone"], "image_size": sizes,
                           "server_alive": process is None or process.poll() is None,
                           "load_average_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()})
            print(json.dumps(result), flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
