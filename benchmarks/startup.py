"""How long the command line takes to answer: `skincancer --help`, and `skincancer predict` of one image on a run
(exported to ONNX), each the median wall time of several runs in fresh processes, with the host's load average
before and after (a shared host's figures mean little without it).

    python benchmarks/startup.py --model runs/demo --image ../shared/data/isic2017/test/melanoma/ISIC_0012369.jpg
    python benchmarks/startup.py --src /tmp/before/src ...   # the same for another checkout's code (before/after)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def wall(command: list[str], env: dict, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run folder (exported: `skincancer export --model RUN`)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--src", help="put this src/ folder first on PYTHONPATH (another checkout's code)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = args.src
    cli = [sys.executable, "-m", "skincancer"]
    result = {"src": args.src or "this checkout", "repeats": args.repeats,
              "load_before": [round(x, 2) for x in os.getloadavg()]}
    for name, command in (("help", [*cli, "--help"]),
                          ("predict_one_image", [*cli, "predict", "--model", args.model, args.image])):
        times = wall(command, env, args.repeats)
        result[name] = {"median_s": round(statistics.median(times), 2), "all_s": [round(t, 2) for t in times]}
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
