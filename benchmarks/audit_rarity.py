"""Issue 15: does the audit find the rare groups? Every rarity estimator of debias.density.rarity side by side with PyOD's
detectors on the same latents (and kNN on pixels), on data where the rare group is known.

    .venv/bin/python benchmarks/audit_rarity.py --out bench-out/audit15 [--datasets shapes,spurious,fmnist,utkface]
        [--image-size 32] [--latent-dim 32] [--beta 1] [--seeds 0,1,2]

Data (built in memory; nothing is written but the models and the tables):
- shapes: builtin:shapes (4,000 rows), the planted 2 % group (`rare`);
- spurious: builtin:spurious (4,000 rows): circles mostly red and squares mostly blue; the rare group is the
  off-colour shapes, a rare *combination* of a common shape and a common colour (2 %);
- fmnist-C: 2,000 Fashion-MNIST training images (/usr/share/datasets/fashion-mnist) with class C cut to 1 % (20 rows)
  and the other nine equal, for every class C in turn;
- utkface: the UTKFace training split (../shared), black faces (2.7 %) against white faces.

A VAE is trained per dataset and seed with the given options (the defaults of `debias train` except the image
size, 32 px here for time); finished runs are reused. For each estimator: AUROC of rarity for the rare group
(against every other row; UTKFace: against the white rows), the rare group's mean sampling weight / the others' (the
weights ∝ exp(T rarity) at an effective sample size of 0.5 n, the audit's default, for every method alike), and ESS.
Writes OUT/results.json and OUT/results.md (median over seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from debias.data import load_images  # noqa: E402
from debias.density.encoding import encode_images  # noqa: E402
from debias.density.rarity import (  # noqa: E402
    RARITY_ESTIMATORS,
    audit_features,
    build_rarity_estimator,
    fitted_rarity,
    rarity_weights,
)
from debias.training.vae import (  # noqa: E402
    DataDescription,
    TrainConfig,
    load_model,
    train_vae,
    vae_config,  # noqa: E402
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
UTK = ROOT.parent / "shared" / "data" / "utkface" / "manifest.csv"
FMNIST_CLASSES = tuple(range(10))


def datasets(
    names: list[str], image_size: int, fmnist_classes: tuple[int, ...] = FMNIST_CLASSES
) -> dict[str, tuple[object, np.ndarray, np.ndarray, int]]:
    """name -> (ImageSet, rare mask, reference mask, epochs)."""
    out = {}
    if "shapes" in names:
        d = load_images("builtin:shapes?n=4000", image_size=image_size, progress=False)
        rare = d.table["rare"].to_numpy().astype(bool)
        out["shapes"] = (d, rare, ~rare, 12)
    if "spurious" in names:
        d = load_images("builtin:spurious?n=4000", image_size=image_size, progress=False)
        t = d.table
        rare = ((t["label"] == "circle") & (t["colour"] != "red") | (t["label"] == "square") & (t["colour"] != "blue")).to_numpy()
        out["spurious"] = (d, rare, ~rare, 12)
    if "fmnist" in names and FMNIST.is_dir():
        full = load_images(str(FMNIST), where=["split=train"], image_size=image_size, progress=False)
        labels = full.table["label"].astype(int).to_numpy()
        for c in fmnist_classes:
            rng = np.random.default_rng(c)
            keep = [rng.choice(np.flatnonzero(labels == c), 20, replace=False)]
            for other in range(10):
                if other != c:
                    keep.append(rng.choice(np.flatnonzero(labels == other), 220, replace=False))
            idx = np.sort(np.concatenate(keep))
            d = full.subset(idx)
            rare = (d.table["label"].astype(int) == c).to_numpy()
            out[f"fmnist-{c}"] = (d, rare, ~rare, 5)
    if "utkface" in names and UTK.is_file():
        d = load_images(str(UTK), where=["split=train"], image_size=image_size, progress=False)
        race = d.table["race"].astype(str).to_numpy()
        out["utkface"] = (d, race == "black", race == "white", 8)
    return out


def pyod_rarities(Z: np.ndarray, pixels: np.ndarray) -> dict[str, np.ndarray]:
    from pyod.models.ecod import ECOD
    from pyod.models.hbos import HBOS
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN

    out = {}
    for name, det, X in (("PyOD KNN (latents)", KNN(), Z), ("PyOD IForest (latents)", IForest(random_state=0), Z),
                         ("PyOD HBOS (latents)", HBOS(), Z), ("PyOD ECOD (latents)", ECOD(), Z),
                         ("PyOD KNN (pixels)", KNN(), pixels)):
        det.fit(X)
        out[name] = np.asarray(det.decision_scores_, dtype=np.float64)  # higher = more outlying, on the fitted rows
    return out


def nearest(X: np.ndarray, k: int, cosine: bool) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (n, k): every row's k nearest other rows (a row is not its own neighbour), by
    Euclidean distance, or between unit-normalised rows (sqrt(2 - 2 cos)) with ``cosine``."""
    import torch

    x = torch.from_numpy(np.asarray(X, np.float32))
    if cosine:
        x = torch.nn.functional.normalize(x, dim=1)
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    d.fill_diagonal_(float("inf"))
    top = d.topk(k, largest=False)
    return top.values.sqrt().numpy(), top.indices.numpy()


def purity(X: np.ndarray, rare: np.ndarray, cosine: bool, k: int = 10) -> float:
    """Mean share of a rare row's k nearest other rows that are rare: whether the group is its own neighbourhood."""
    return float(rare[nearest(X, k, cosine)[1][rare]].mean())


def robust_z(v: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 MAD), as the audit standardises its terms (the standard deviation if the MAD is 0)."""
    c = np.median(v)
    s = 1.4826 * np.median(np.abs(v - c))
    return (v - c) / (s if s > 0 else (v.std() or 1.0))


def evaluate(rarity: np.ndarray, rare: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    w, t = rarity_weights(rarity, 0.5)
    ess = 1.0 / float(np.sum(w**2))
    both = rare | reference
    return {
        "auroc": float(roc_auc_score(rare[both], rarity[both])),
        "weight_ratio": float(w[rare].mean() / w[reference].mean()),
        "ess_fraction": ess / len(w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/audit15"))
    ap.add_argument("--datasets", default="shapes,spurious,fmnist,utkface")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="Train every dataset this long (default: per dataset).")
    ap.add_argument("--results", default="results", help="Name of the results files in --out.")
    ap.add_argument("--fmnist-classes", default=",".join(map(str, FMNIST_CLASSES)))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: list[dict] = []
    tag = f"s{args.image_size}_l{args.latent_dim}_b{args.beta:g}" + (f"_e{args.epochs}" if args.epochs else "")
    classes = tuple(int(c) for c in args.fmnist_classes.split(","))
    for name, (data, rare, reference, epochs) in datasets(args.datasets.split(","), args.image_size, classes).items():
        epochs = args.epochs or epochs
        for seed in seeds if name == "utkface" else seeds[:1]:
            run = args.out / "runs" / f"{name}_{tag}_seed{seed}"
            t0 = time.time()
            if not (run / "model.pt").is_file():
                cfg = vae_config(image_size=args.image_size, channels=data.channels, latent_dim=args.latent_dim,
                                 beta=args.beta)
                desc = DataDescription(source=name, where=[], fingerprint=data.fingerprint, n_images=len(data),
                                       n_skipped=0, label=None)
                train_vae(data, cfg, TrainConfig(epochs=epochs, seed=seed), run, data_desc=desc, resume=True,
                          progress=False)
            model, _ = load_model(run, "cpu")
            enc = encode_images(model, data, progress=False)
            X = audit_features(enc.mu, enc.recon_error)
            rarities = {est: fitted_rarity(build_rarity_estimator(est), X) for est in RARITY_ESTIMATORS}
            pixels = np.asarray(data.images, dtype=np.float32).reshape(len(data), -1) / 255.0
            rarities.update(pyod_rarities(enc.mu, pixels))
            for method, r in rarities.items():
                results.append({"dataset": name, "seed": seed, "method": method, "rare": int(rare.sum()),
                                "n": len(rare), **evaluate(r, rare, reference)})
            print(f"{name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
            (args.out / f"{args.results}.json").write_text(json.dumps({"options": vars(args) | {"out": str(args.out)},
                                                               "results": results}, indent=1))
    df = pd.DataFrame(results)
    med = df.groupby(["dataset", "method"], sort=False)[["auroc", "weight_ratio", "ess_fraction"]].median()
    lines = [f"Options: image size {args.image_size}, latent {args.latent_dim}, beta {args.beta:g}, epochs "
             f"{args.epochs or 'per dataset'}; median over seeds "
             f"{args.seeds} (utkface), seed {seeds[0]} (others).", "",
             "| dataset | method | AUROC | mean-weight ratio | ESS / n |", "|---|---|---|---|---|"]
    for (ds, method), row in med.iterrows():
        lines.append(f"| {ds} | {method} | {row.auroc:.3f} | {row.weight_ratio:.2f} | {row.ess_fraction:.2f} |")
    text = "\n".join(lines) + "\n"
    (args.out / f"{args.results}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
