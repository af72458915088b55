"""What int8 buys on this CPU: every quantisation plan `skincancer export --int8` tries, kept or not, timed model
only (batch 32, ONNX Runtime, the machine's threads) beside the float graph, with its parity on the check images.

The export keeps the first plan within tolerance; this shows what the others would have given in speed (the CPU's
int8 instructions, VNNI / AMX where present, only pay on the convolutions in int8).

    .venv/bin/python benchmarks/int8_plans.py --model runs/benchmark/student
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from throughput import rate  # benchmarks/ is the script's folder

from skincancer.checkpoint import find_model_dir
from skincancer.engines import OnnxEngine
from skincancer.predict import load_model
from skincancer.quantize import Tolerance, parity, plans, prepare, quantisation_inputs, quantize_graph, refusal


def model_only(engine: OnnxEngine, batch: np.ndarray, seconds: float) -> float:
    return round(rate(lambda: engine.probabilities(batch), len(batch), seconds), 1)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "vnni" in f or f.startswith("amx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported run (skincancer export)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()

    classifier = load_model(args.model, engine="onnx")
    inputs = quantisation_inputs(classifier, find_model_dir(args.model), args.model)  # as the export has them
    size = int(classifier.meta["image_size"])
    batch = np.random.default_rng(0).standard_normal((args.batch_size, 3, size, size)).astype(np.float32)
    base = {"model": args.model, "image_size": size, "batch_size": args.batch_size, "cpu_int8_flags": cpu_flags()}
    print(json.dumps({**base, "plan": "float", "int8_convolutions": 0,
                      "model_only_images_per_s": model_only(classifier.engine, batch, args.seconds)}),
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        prepare(classifier.engine.path, prepared)
        for index, (plan, nodes) in enumerate(plans(prepared)):
            path = Path(tmp) / f"plan{index}.onnx"
            quantize_graph(prepared, path, inputs.calibration_arrays, nodes)
            engine = OnnxEngine(path)
            report = parity(classifier, classifier.engine, engine, inputs.check_arrays, inputs.truth)
            print(json.dumps({**base, "plan": plan, "int8_convolutions": len(nodes),
                              "model_only_images_per_s": model_only(engine, batch, args.seconds),
                              "within_tolerance": refusal({"plan": plan, **report}, Tolerance()) is None,
                              **{k: report[k] for k in ("mean_difference", "max_difference", "auc_float",
                                                        "auc_int8") if k in report}}), flush=True)


if __name__ == "__main__":
    main()
