"""Which out-of-distribution score the guard uses: candidates compared on the demo probe's features (frozen ImageNet
EfficientNet-Lite0, multiscale pooled, 224 px, one view). Each is fitted on the 2000 ISIC 2017 training images, its
threshold chosen out of fold there at 2% false rejection, and scored on the sets of benchmarks/ood.py (HAM10000
samples of 600 mel/nv/bkl and 400 bcc/akiec/vasc/df).

    python benchmarks/ood_methods.py            # features once into /tmp/ood_features.npz, then the table
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_sets import NEAR_OOD_DX, OWN_DX, far_ood, ham_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ISIC = ROOT / ".." / "shared" / "data" / "isic2017"
CACHE = Path("/tmp/ood_features.npz")
STAGES = [40, 80, 112, 192, 320, 1280]  # Lite0's multiscale blocks: pooled stages 3-7 and the head


def features() -> dict[str, np.ndarray]:
    if CACHE.is_file():  # float64, as the guard fits them: the shrunk covariance is ill-conditioned in float32
        return {k: v.astype(np.float64) for k, v in np.load(CACHE).items()}
    from skincancer.backbones import build_model, preprocessing
    from skincancer.datasets import ImageDataset, build_transform
    from skincancer.engine import run_inference

    model = build_model("tf_efficientnet_lite0", 3, pretrained=True, pooling="multiscale").eval()
    prep = preprocessing(model)
    transform = build_transform(224, prep["mean"], prep["std"])

    def of(sources) -> np.ndarray:
        return run_inference(model, ImageDataset(sources, None, transform), 32, 0, output="features")[0]

    sets = {"train": of(sorted(str(p) for p in (ISIC / "train").rglob("*.jpg"))),
            "test": of(sorted(str(p) for p in (ISIC / "test").rglob("*.jpg"))),
            "far": of([image for _, image in far_ood()]),
            "ham_own": of(list(ham_images(OWN_DX, 600).filepath)),
            "ham_near": of(list(ham_images(NEAR_OOD_DX, 400).filepath))}
    np.savez(CACHE, **sets)
    return {k: v.astype(np.float64) for k, v in sets.items()}


def mahalanobis(fit: np.ndarray):
    fitted = LedoitWolf().fit(fit)
    mean, precision = fitted.location_, fitted.get_precision()
    return lambda x: np.sqrt(np.einsum("nd,de,ne->n", x - mean, precision, x - mean) / x.shape[1])


def knn_cosine(fit: np.ndarray, k: int = 10):
    unit = fit / np.linalg.norm(fit, axis=1, keepdims=True)
    return lambda x: -np.sort((x / np.linalg.norm(x, axis=1, keepdims=True)) @ unit.T, axis=1)[:, -k]


def stagewise(stages):
    cuts = np.cumsum([0, *STAGES])

    def make(fit):
        scores = [mahalanobis(fit[:, cuts[i]:cuts[i + 1]]) for i in stages]
        return lambda x: np.mean([f(x[:, cuts[i]:cuts[i + 1]]) for f, i in zip(scores, stages, strict=True)], 0)
    return make


def row(name: str, make, sets: dict) -> dict:
    train = sets["train"]
    held = np.empty(len(train))
    for kept, out in KFold(5, shuffle=True, random_state=0).split(train):
        held[out] = make(train[kept])(train[out])
    threshold = np.quantile(held, 0.98, method="higher")
    score = make(train)
    s = {k: score(sets[k]) for k in ("test", "far", "ham_own", "ham_near")}

    def auroc(outside):
        return roc_auc_score(np.r_[np.zeros(len(s["test"])), np.ones(len(outside))], np.r_[s["test"], outside])

    return {"score": name, "far AUROC": auroc(s["far"]), "far refused": np.mean(s["far"] > threshold),
            "ISIC test refused": np.mean(s["test"] > threshold), "HAM own refused": np.mean(s["ham_own"] > threshold),
            "near AUROC": auroc(s["ham_near"]), "near refused": np.mean(s["ham_near"] > threshold)}


def main() -> None:
    sets = features()
    candidates = [("Mahalanobis, all 2024 features (chosen)", mahalanobis), ("10-NN cosine, all features", knn_cosine)]
    candidates += [(f"Mahalanobis, stage {i + 3} only ({d})", stagewise([i])) for i, d in enumerate(STAGES)]
    candidates += [("mean of per-stage Mahalanobis, all stages", stagewise(range(6))),
                   ("mean of per-stage Mahalanobis, stages 5-7 + head", stagewise([2, 3, 4, 5]))]
    rows = [row(name, make, sets) for name, make in candidates]
    print("| " + " | ".join(rows[0]) + " |\n|" + " --- |" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in r.values()) + " |")


if __name__ == "__main__":
    main()
