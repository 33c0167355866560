"""Issue 15: does the novelty score's contrastive encoder (what `debias train` now trains beside the VAE) help the
audit find a cut Fashion-MNIST class? A measured attempt, not a shipped estimator.

    OMP_NUM_THREADS=2 python benchmarks/audit_contrastive.py --out bench-out/audit-contrastive \
        [--datasets fmnist,shapes,spurious,utkface] [--classes 0,1,...,9] [--contrastive-epochs 15] [--min-steps 0]

For each class C: the 2,000-image set of benchmarks/audit_rarity.py with C cut to 20 rows (1 %), a VAE at the
audit benchmark's settings (32 px, latent 32, width 32, 5 epochs) and the contrastive encoder at `debias train`'s
defaults (15 epochs) on the same images. AUROC of rarity for the cut class: the audit's default (`knn-recon` on the
VAE), the k-th-neighbour distance among the encoder's features (leave-one-out; k = 5, 20, 50), and the sum of the two
rarities' robust z-scores. ``--min-steps``: train the encoder for at least this many steps (more epochs on small
sets). The other rows (shapes, spurious, UTKFace black vs white) as in benchmarks/audit_rarity.py; ratio = the rare
group's mean weight / the reference rows' (weights tempered to ESS 0.5 n, as the audit does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from audit_rarity import datasets, evaluate  # noqa: E402

from debias.density.detector import _embeddings  # noqa: E402
from debias.density.encoding import encode_images  # noqa: E402
from debias.density.rarity import fit_audit_rarity  # noqa: E402
from debias.models.contrastive import ContrastiveConfig  # noqa: E402
from debias.training.contrastive import (  # noqa: E402
    ContrastiveTrainConfig,
    load_encoder,
    train_contrastive,
)
from debias.training.vae import (  # noqa: E402
    DataDescription,
    TrainConfig,
    load_model,
    train_vae,
    vae_config,
)


def kth_neighbour_distance(E: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest other row of unit-norm features (sqrt(2 - 2 cos))."""
    e = torch.from_numpy(E.astype(np.float32))
    d = (2 - 2 * e @ e.T).clamp_min(0)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False).values[:, -1].sqrt().numpy()


def robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    return (v - med) / (np.median(np.abs(v - med)) * 1.4826 + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/audit-contrastive"))
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--contrastive-epochs", type=int, default=15)
    ap.add_argument("--min-steps", type=int, default=0)
    ap.add_argument("--datasets", default="fmnist")
    ap.add_argument("--results", default="results")
    args = ap.parse_args()
    results = {}
    sets = datasets(args.datasets.split(","), 32, tuple(int(c) for c in args.classes.split(",")))
    for name, (data, rare, reference, epochs) in sets.items():
        t0 = time.time()
        run = args.out / name
        if not (run / "model.pt").exists():
            cfg = vae_config(image_size=32, channels=data.channels, latent_dim=32, beta=1.0, width=32)
            desc = DataDescription(source=name, where=[], fingerprint=data.fingerprint, n_images=len(data), n_skipped=0)
            train_vae(data, cfg, TrainConfig(epochs=epochs, device="cpu"), run, data_desc=desc, progress=False)
        steps_per_epoch = max(1, len(data) // ContrastiveTrainConfig.batch_size)
        enc_epochs = max(args.contrastive_epochs, -(-args.min_steps // steps_per_epoch))
        encoder_dir = run / f"contrastive-e{enc_epochs}"
        if not (encoder_dir / "encoder.pt").exists():
            train_contrastive(data, ContrastiveConfig(image_size=32, channels=data.channels),
                              ContrastiveTrainConfig(epochs=enc_epochs, device="cpu"), encoder_dir,
                              data_desc={"fingerprint": data.fingerprint}, progress=False)
        model, _ = load_model(run)
        encoder, _ = load_encoder(encoder_dir / "encoder.pt")
        enc = encode_images(model, data, progress=False)
        default = fit_audit_rarity(enc.mu, enc.recon_error).rarity
        E = _embeddings(encoder, data, 256)
        rarities = {"default (knn-recon)": default}
        for k in (5, 20, 50, 100):
            r = kth_neighbour_distance(E, k)
            rarities[f"encoder kNN, k={k}"] = r
            rarities[f"default + encoder kNN, k={k}"] = robust_z(default) + robust_z(r)
        row = {key: evaluate(r, rare, reference) for key, r in rarities.items()}
        results[name] = {"encoder_epochs": enc_epochs, **row}
        print(name, f"encoder {enc_epochs} epochs", {a: f"{b['auroc']:.3f}/{b['weight_ratio']:.2f}" for a, b in row.items()},
              f"{time.time() - t0:.0f} s", flush=True)
    keys = list(rarities)
    fm = [r for n, r in results.items() if n.startswith("fmnist")]
    means = {k: float(np.mean([r[k]["auroc"] for r in fm])) for k in keys} if fm else {}
    print("Fashion-MNIST mean AUROC", {k: round(v, 3) for k, v in means.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.results}.json").write_text(json.dumps({"command": " ".join(sys.argv), "cases": results,
                                                               "fmnist_mean_auroc": means}, indent=1) + "\n")


if __name__ == "__main__":
    main()
