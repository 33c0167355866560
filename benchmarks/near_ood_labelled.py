"""Near-OOD with the class label (issue 16): does a model trained with the labels see held-out classes better?

    OMP_NUM_THREADS=1 python benchmarks/near_ood_labelled.py --out bench-out/nearood-labelled [--classes 0,1,...]

For each Fashion-MNIST class K, the case of benchmarks/near_ood.py (2,000 training images of each other class, 28 px,
latent 16, width 16, 5 epochs; in = the 9,000 test images of the kept classes, OOD = the 1,000 of K), but the model
is a DB-VAE trained with the 9 class labels (`debias train --label`: the VAE and a classification head on the same
encoder), on the 80 % fit part. Statistics of the test images, each one's AUROC (OOD = positive):

- ``msp``: 1 - the maximum softmax probability of the head (Hendrycks & Gimpel 2017);
- ``energy``: -logsumexp of the head's logits (Liu et al. 2020);
- ``featknn{1,10,50}``: distance to the k-th nearest fit image in the encoder's L2-normalised features (Sun et al.
  2022);
- ``muknn5``: the same on the standardised posterior means;
- ``maha``: the smallest class-conditional Mahalanobis distance in the features (64 principal axes, tied covariance;
  Lee et al. 2018).

Writes OUT/results.json and prints one line per class and the means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp, softmax
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from near_ood import case_data  # noqa: E402

from debias.data.splits import calibration_split  # noqa: E402
from debias.models import VAEConfig  # noqa: E402
from debias.training.vae import (  # noqa: E402
    DataDescription,
    TrainConfig,
    encode_labels,
    load_model,
    train_vae,
)


@torch.inference_mode()
def encode(model, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encoder features, posterior means and class logits of every image."""
    feats, mus, logits = [], [], []
    for start in range(0, len(data), 512):
        x = data.batch(slice(start, start + 512))
        mu, _, lg = model.encode(x)
        feats.append(model.features(x).flatten(1).numpy())
        mus.append(mu.numpy())
        logits.append(lg.numpy())
    return np.concatenate(feats), np.concatenate(mus), np.concatenate(logits)


def unit(a: np.ndarray) -> np.ndarray:
    return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-8)


def kth_distance(ref: np.ndarray, queries: list[np.ndarray], k: int) -> np.ndarray:
    nn = NearestNeighbors(n_neighbors=k).fit(ref)
    return np.concatenate([nn.kneighbors(q)[0][:, -1] for q in queries])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for K in [int(k) for k in args.classes.split(",")]:
        t0 = time.time()
        train, inn, ood, _ = case_data(f"fmnist-{K}")
        y, classes = encode_labels(train.table["label"])
        fit, _ = calibration_split(len(train), 0.2, 0)
        part, y_fit = train.subset(fit), y[fit]
        run = args.out / "models" / f"fmnist-{K}"
        if not (run / "model.pt").exists():
            cfg = VAEConfig(image_size=28, channels=1, latent_dim=16, beta=1.0, width=16, n_classes=len(classes),
                            classes=classes)
            desc = DataDescription(source=f"near_ood_labelled.py fmnist-{K}", where=[], fingerprint=part.fingerprint,
                                   n_images=len(part), n_skipped=0, label="label")
            train_vae(part, cfg, TrainConfig(epochs=args.epochs, device="cpu"), run, data_desc=desc, labels=y_fit,
                      progress=False)
        model, _ = load_model(run, "cpu")
        (f_fit, m_fit, _), (f_in, m_in, l_in), (f_ood, m_ood, l_ood) = (encode(model, d) for d in (part, inn, ood))
        truth = np.r_[np.zeros(len(f_in)), np.ones(len(f_ood))]
        closed = float((l_in.argmax(1) == encode_labels(inn.table["label"], classes)[0]).mean())
        stats: dict[str, np.ndarray] = {}
        stats["msp"] = -np.r_[softmax(l_in, axis=1).max(1), softmax(l_ood, axis=1).max(1)]
        stats["energy"] = -np.r_[logsumexp(l_in, 1), logsumexp(l_ood, 1)]
        for k in (1, 10, 50):
            stats[f"featknn{k}"] = kth_distance(unit(f_fit), [unit(f_in), unit(f_ood)], k)
        centre, scale = m_fit.mean(0), m_fit.std(0) + 1e-6
        stats["muknn5"] = kth_distance((m_fit - centre) / scale, [(m_in - centre) / scale, (m_ood - centre) / scale], 5)
        pca = PCA(64, random_state=0).fit(f_fit)
        z_fit, z_in, z_ood = pca.transform(f_fit), pca.transform(f_in), pca.transform(f_ood)
        means = np.stack([z_fit[y_fit == c].mean(0) for c in range(len(classes))])
        cov = sum(np.cov((z_fit[y_fit == c] - means[c]).T) * (y_fit == c).sum() for c in range(len(classes)))
        precision = np.linalg.inv(cov / len(z_fit) + 1e-6 * np.eye(cov.shape[0]))

        def mahalanobis(z: np.ndarray) -> np.ndarray:
            d = z[:, None, :] - means[None]
            return np.einsum("nkd,de,nke->nk", d, precision, d).min(1)

        stats["maha"] = np.r_[mahalanobis(z_in), mahalanobis(z_ood)]
        results[str(K)] = {name: float(roc_auc_score(truth, s)) for name, s in stats.items()}
        results[str(K)].update(closed_set_accuracy=closed, seconds=round(time.time() - t0, 1))
        print(K, json.dumps({k: round(v, 3) for k, v in results[str(K)].items()}), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
    names = [n for n in next(iter(results.values())) if n != "seconds"]
    print("mean over", len(results), "classes:", {n: round(float(np.mean([r[n] for r in results.values()])), 3)
                                                  for n in names})


if __name__ == "__main__":
    main()
