"""Throughput: images/s from JPEG file to probability (batch 32) and model-only, ONNX Runtime vs eager PyTorch.

Prints one JSON line per (model, engine): the trained run's model (EfficientNet-Lite0 at 224 px) and the tutorial's
InceptionV3 at 299 px (random weights: only the time matters), each beside the FLOP ceiling of this machine
(measured float32 matmul GFLOP/s divided by the model's FLOPs per image).

    .venv/bin/python benchmarks/throughput.py --model runs/linear224 --images ../shared/data/isic2017/test

A run exported with `skincancer export --int8` gets an 'int8' row too. With `--ensemble RUN` (repeated: the
benchmark ensemble, each member exported), the ensemble is timed end to end in the same run (ONNX Runtime, each
member with its own test-time views), and every row says how many times faster than it it is and what share of the
FLOP ceiling it reaches (issue 24: a distilled, quantised student against its teacher):

    .venv/bin/python benchmarks/throughput.py --model runs/benchmark/student --skip-inception \
        --ensemble runs/benchmark/lite0 --ensemble runs/benchmark/lite2 --ensemble runs/benchmark/linear
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from skincancer.checkpoint import find_model_dir
from skincancer.engines import INT8_FILE, OnnxEngine, session_options
from skincancer.ensemble import load_models
from skincancer.export import write_onnx
from skincancer.images import expand_inputs
from skincancer.predict import Classifier, load_model


def best_rate(multiply, size: int, rounds: int = 3, seconds: float = 0.5) -> float:
    """GFLOP/s of repeated size x size float32 matrix products: the best of a few short rounds, so that another
    process's burst does not lower the ceiling."""
    multiply()
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            multiply()
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def matmul_gflops(size: int = 2048) -> dict[str, float]:
    """Measured float32 matmul GFLOP/s on this machine's cores through torch, numpy and ONNX Runtime (their BLAS
    kernels differ: on AVX-512 CPUs ORT's MLAS can be twice torch's); the best one is the machine's ceiling."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = torch.randn(size, size), torch.randn(size, size)
    an, bn = a.numpy(), b.numpy()
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size]) for name in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return {
        "torch": round(best_rate(lambda: torch.mm(a, b), size), 1),
        "numpy": round(best_rate(lambda: an @ bn, size), 1),
        "onnxruntime": round(best_rate(lambda: session.run(None, {"a": an, "b": bn}), size), 1),
    }


def gflops_per_image(model: torch.nn.Module, image_size: int) -> float:
    """Forward FLOPs of one image (convolutions and matmuls, 2 per multiply-add), in GFLOP."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def model_only(classifier: Classifier, batch_size: int, seconds: float) -> float:
    """Images/s of the model alone on ready normalised batches (no decoding, no resizing)."""
    size = int(classifier.meta["image_size"])
    batch = torch.randn(batch_size, 3, size, size)
    if classifier.engine is not None:
        run = lambda: classifier.engine.probabilities(batch.numpy())  # noqa: E731
    else:
        def run():
            with torch.inference_mode():
                return classifier.model(batch).softmax(1)
    return rate(run, batch_size, seconds)


def rate(run, batch_size: int, seconds: float) -> float:
    """Images/s of repeated calls of run() on one batch: a warm-up call (allocations, ORT's first-run planning),
    then calls for at least `seconds` (and at least two)."""
    run()
    count, start = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - start < seconds:
        run()
        count += 1
    return batch_size * count / (time.perf_counter() - start)


def end_to_end(classifier: Classifier, files: list[str], batch_size: int, num_workers: int) -> float:
    """Images/s from file paths to probabilities through the package's own path (Dataset, DataLoader, engine)."""
    classifier.predict_proba(files[:batch_size], batch_size=batch_size, num_workers=0)  # warm-up
    start = time.perf_counter()
    probs, errors = classifier.predict_proba(files, batch_size=batch_size, num_workers=num_workers)
    elapsed = time.perf_counter() - start
    if errors or np.isnan(probs).any():
        raise SystemExit(f"unreadable benchmark images: {errors[:3]}")
    return len(files) / elapsed


def classifiers(run: str | None, backbone: str, image_size: int, workdir: Path) -> dict[str, Classifier]:
    """{'onnx': ..., 'torch': ...} for the trained run (and 'int8' where it has an int8 export), or for a randomly
    initialised timm backbone."""
    if run is not None:
        torch_classifier = load_model(run, engine="torch")
    else:
        model = timm.create_model(backbone, pretrained=False, num_classes=3).eval()
        meta = {"backbone": backbone, "class_names": ["melanoma", "nevus", "seborrheic_keratosis"],
                "labels": {"melanoma": 1, "nevus": 0, "seborrheic_keratosis": 0}, "image_size": image_size,
                "mean": [0.5] * 3, "std": [0.5] * 3, "threshold": 0.5}
        torch_classifier = Classifier(model=model, meta=meta, source=workdir)
    path = workdir / f"{torch_classifier.meta['backbone']}.onnx"
    write_onnx(torch_classifier.model, int(torch_classifier.meta["image_size"]), path)  # never touches the run
    onnx_classifier = Classifier(model=torch_classifier.model, meta=torch_classifier.meta,
                                 source=torch_classifier.source, engine=OnnxEngine(path))
    engines = {"onnx": onnx_classifier}
    if run is not None and (find_model_dir(run) / INT8_FILE).is_file():  # `skincancer export --int8` was run
        engines["int8"] = load_model(run, engine="int8")
    return {**engines, "torch": torch_classifier}


def ensemble_record(runs: list[str], files: list[str], batch_size: int, num_workers: int,
                    peak: float) -> tuple[dict, float]:
    """The ensemble end to end on ONNX Runtime (every member exported), with its FLOPs per image (each member's
    forward FLOPs times its test-time views); and its unrounded images/s."""
    ensemble = load_models(runs, engine="onnx")
    flops = 0.0
    for member in ensemble.runs:  # member.model: the eager network, built on first use (the ONNX engine runs it)
        flops += gflops_per_image(member.model, int(member.meta["image_size"])) * int(member.meta.get("tta", 1))
    speed = end_to_end(ensemble, files, batch_size, num_workers)
    return {"model": " + ".join(f"{m.meta['backbone']}@{m.meta['image_size']}x{m.meta.get('tta', 1)}"
                                for m in ensemble.runs),
            "weights": "trained runs (ensemble)", "engine": "onnx", "batch_size": batch_size,
            "num_workers": num_workers, "images": len(files), "end_to_end_images_per_s": round(speed, 2),
            "gflops_per_image": round(flops, 3), "flop_ceiling_images_per_s": round(peak / flops, 1),
            "share_of_flop_ceiling": round(speed / (peak / flops), 3)}, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/linear224", help="trained run (EfficientNet-Lite0)")
    parser.add_argument("--images", default="../shared/data/isic2017/test", help="folder of JPEGs")
    parser.add_argument("--limit", type=int, default=600, help="images for the Lite0 end-to-end runs")
    parser.add_argument("--inception-limit", type=int, default=96, help="images for the InceptionV3 runs")
    parser.add_argument("--torch-limit", type=int, default=320, help="images for eager PyTorch (slower)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1,
                        help="decoding while the model runs: threads (ONNX engines) or loader processes (torch)")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per model-only measurement")
    parser.add_argument("--skip-inception", action="store_true")
    parser.add_argument("--ensemble", action="append", default=[], help="run folder of an ensemble member (repeat): "
                        "the ensemble is timed end to end in the same run and every row compared with it")
    parser.add_argument("--ensemble-limit", type=int, default=96, help="images for the ensemble (slow)")
    args = parser.parse_args()

    files = expand_inputs([args.images])
    if not files:
        raise SystemExit(f"{args.images}: no images")
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_average_1min_at_start": round(os.getloadavg()[0], 2), "python": platform.python_version(),
               "torch": torch.__version__}
    matmul = matmul_gflops()
    peak = max(matmul.values())
    ensemble_speed = None
    if args.ensemble:
        ensemble, ensemble_speed = ensemble_record(args.ensemble, files[:args.ensemble_limit], args.batch_size,
                                                   args.num_workers, peak)
        print(json.dumps({**ensemble, "matmul_gflops_per_s": matmul, **machine,
                          "load_average_1min": round(os.getloadavg()[0], 2)}), flush=True)
    models = [(args.model, "tf_efficientnet_lite0", None, args.limit)]
    if not args.skip_inception:
        models.append((None, "inception_v3", 299, args.inception_limit))
    with tempfile.TemporaryDirectory() as tmp:
        for run, backbone, size, limit in models:
            engines = classifiers(run, backbone, size or 0, Path(tmp))
            meta = engines["torch"].meta
            flops = gflops_per_image(engines["torch"].model, int(meta["image_size"]))
            views = int(meta.get("tta", 1))  # end to end runs the model's own test-time views
            for name, classifier in engines.items():
                n = min(limit, args.torch_limit) if name == "torch" else limit
                speed = end_to_end(classifier, files[:n], args.batch_size, args.num_workers)
                record = {
                    "model": meta["backbone"], "weights": "trained run" if run else "random",
                    "image_size": meta["image_size"], "engine": name, "batch_size": args.batch_size,
                    "num_workers": args.num_workers, "images": min(n, len(files)),
                    "end_to_end_images_per_s": round(speed, 1),
                    "end_to_end_images_per_s_no_workers": round(end_to_end(classifier, files[:n], args.batch_size,
                                                                           0), 1),
                    "model_only_images_per_s": round(model_only(classifier, args.batch_size, args.seconds), 1),
                    "gflops_per_image": round(flops, 3), "matmul_gflops_per_s": matmul,
                    "views": views, "flop_ceiling_images_per_s": round(peak / flops, 1),
                    "share_of_flop_ceiling": round(speed * views / (peak / flops), 3),
                    **({"times_the_ensemble": round(speed / ensemble_speed, 1)} if ensemble_speed and run else {}),
                    "load_average_1min": round(os.getloadavg()[0], 2), **machine,
                }
                print(json.dumps(record), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
