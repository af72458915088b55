"""How well a model's guard tells what it can judge from what it cannot: far out-of-distribution pictures (every
sample photograph shipped with scikit-image and scikit-learn, and synthetic frames) and HAM10000 lesions of diagnoses
the model never saw, against the 600 ISIC 2017 test images; and how many dermoscopy images it wrongly refuses (ISIC
2017 test, HAM10000 mel/nv/bkl). Writes benchmarks/results/ood/<label>.json and the table in BENCHMARKS.md.

    python benchmarks/ood.py --model runs/demo --label demo
    python benchmarks/ood.py --model runs/benchmark/lite0 --model runs/benchmark/lite2 --model runs/benchmark/linear \\
        --label ensemble
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_sets import NEAR_OOD_DX, OWN_DX, far_ood, ham_images  # noqa: E402
from tables import write_block  # noqa: E402

from skincancer.ensemble import load_models  # noqa: E402
from skincancer.metrics import wilson_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ISIC_TEST = ROOT / ".." / "shared" / "data" / "isic2017" / "test"
RESULTS = Path(__file__).resolve().parent / "results" / "ood"


def judge(classifier, images, batch_size: int) -> dict:
    judged = classifier.judge(images, batch_size=batch_size, num_workers=1)
    failed = {i for i, _ in judged.errors}
    keep = [i for i in range(len(images)) if i not in failed]
    return {"score": judged.ood_score[keep], "refused": np.array([bool(judged.refusals[i]) for i in keep]),
            "reasons": [judged.refusals[i] for i in keep], "failed": len(failed)}


def share(refused: np.ndarray) -> dict:
    k, n = int(refused.sum()), len(refused)
    return {"refused": k, "n": n, "share": k / n if n else float("nan"), "ci95": wilson_interval(k, n)}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="run folder; repeat for an ensemble")
    parser.add_argument("--label", required=True, help="the row's name (e.g. demo, ensemble)")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--ham-own", type=int, default=1000,
                        help="HAM10000 mel/nv/bkl images scored (a fixed random sample; 0: all 8,917)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    started = time.time()
    classifier = load_models(args.model, engine=args.engine)
    if not classifier.has_guard:
        sys.exit(f"{', '.join(args.model)}: no out-of-distribution guard (skincancer guard --model RUN)")
    isic = sorted(str(p) for p in ISIC_TEST.rglob("*.jpg"))
    far = far_ood()
    near = ham_images(NEAR_OOD_DX)
    own = ham_images(OWN_DX, args.ham_own or None)
    sets = {"isic_test": judge(classifier, isic, args.batch_size),
            "far": judge(classifier, [image for _, image in far], args.batch_size),
            "ham_near": judge(classifier, list(near["filepath"]), args.batch_size),
            "ham_own": judge(classifier, list(own["filepath"]), args.batch_size)}
    inside = sets["isic_test"]["score"]
    result = {
        "label": args.label, "models": args.model, "engine": classifier.engine_name,
        "command": "python benchmarks/ood.py " + " ".join(sys.argv[1:]),
        "far_auroc": auroc(inside, sets["far"]["score"]), "far_refused": share(sets["far"]["refused"]),
        "far_passed": [name for (name, _), refused in zip(far, sets["far"]["refused"], strict=True) if not refused],
        "near_auroc": auroc(inside, sets["ham_near"]["score"]), "near_refused": share(sets["ham_near"]["refused"]),
        "near_refused_by_dx": {dx: share(sets["ham_near"]["refused"][(near["dx"] == dx).to_numpy()])
                               for dx in NEAR_OOD_DX},
        "isic_test_refused": share(sets["isic_test"]["refused"]),
        "ham_own_refused": share(sets["ham_own"]["refused"]),
        "frame_refusals": {name: sum(bool(r) and "frame" in r for r in s["reasons"]) for name, s in sets.items()},
        "unreadable": {name: s["failed"] for name, s in sets.items()},
        "seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    write_table()


def write_table() -> None:
    """The table in BENCHMARKS.md between the ood markers, one row per results/ood/*.json."""
    rows = ["| model | far-OOD AUROC | far-OOD refused | near-OOD AUROC (HAM bcc/akiec/vasc/df) | near-OOD refused | "
            "ISIC 2017 test refused | HAM mel/nv/bkl refused | command |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())

        def pct(s: dict) -> str:
            return f"{s['share']:.1%} ({s['refused']}/{s['n']}; {s['ci95'][0]:.1%}-{s['ci95'][1]:.1%})"

        rows.append(f"| {r['label']} | {r['far_auroc']:.4f} | {pct(r['far_refused'])} | {r['near_auroc']:.3f} | "
                    f"{pct(r['near_refused'])} | {pct(r['isic_test_refused'])} | {pct(r['ham_own_refused'])} | "
                    f"`{r['command']}` ({r['seconds']:.0f} s) |")
    write_block("ood", "benchmarks/ood.py", rows, "Out-of-distribution guard (issue 22)")

if __name__ == "__main__":
    main()
