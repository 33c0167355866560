"""Issue 15: the audit's default rarity with the run's contrastive encoder (what `debias train` trains beside the
VAE), against the same without it and PyOD, on the audit benchmark's data.

    OMP_NUM_THREADS=2 python benchmarks/audit_contrastive.py --out bench-out/audit-contrastive \
        [--datasets fmnist,shapes,spurious,utkface] [--classes 0,1,...,9] [--contrastive-epochs 15] [--min-steps 600] \
        [--pyod] [--readouts avg,max,avg+max] [--results NAME] [--dump] [--seed 0] [--jitter 0.4] [--rotation-weight 0]

Data as in benchmarks/audit_rarity.py: for each Fashion-MNIST class C, 2,000 images with C cut to 20 rows (1 %);
shapes (the planted 2 % group), spurious (2 % off-colour shapes: a rare combination), UTKFace black vs white faces. A
VAE at the audit benchmark's settings (32 px, latent 32, width 32; 5 epochs on Fashion-MNIST, 12 on shapes and
spurious, 8 on UTKFace) and the contrastive encoder at `debias train`'s defaults (15 epochs, at least ``--min-steps``
steps: more epochs on small sets) on the same images; both are cached under --out. Rarity, each on the fitted rows:
the audit's default (`knn-recon` with the encoder's term, as `debias audit` computes it), the same without the
encoder (`--no-encoder`, the default before), the k-th-neighbour distance among the encoder's features alone
(leave-one-out; k = 5, 20, 50, 100) and, with ``--pyod``, PyOD's KNN, IForest, HBOS and ECOD on the same latents and
KNN on pixels. AUROC of rarity for the rare group and its mean-weight ratio (weights tempered to ESS 0.5 n, as the
audit does), written to --out/NAME.json. ``--readouts``: the same encoder read out otherwise (its map's spatial mean,
maximum, or both: ``ContrastiveEncoder.forward``'s ``readout``, no retraining), the default rule and the kNN at k = 50 with each.
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

from audit_rarity import datasets, evaluate, nearest, pyod_rarities, robust_z  # noqa: E402

from debias.density.detector import embed_images  # noqa: E402
from debias.density.encoding import encode_images  # noqa: E402
from debias.density.rarity import AUDIT_EMBEDDING_READOUT, fit_audit_rarity  # noqa: E402
from debias.models.contrastive import ContrastiveConfig  # noqa: E402
from debias.training.contrastive import (  # noqa: E402
    ContrastiveTrainConfig,
    encoder_epochs,
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
    return nearest(E, k, cosine=True)[0][:, -1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/audit-contrastive"))
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--contrastive-epochs", type=int, default=15)
    ap.add_argument("--min-steps", type=int, default=ContrastiveTrainConfig.min_steps)
    ap.add_argument("--datasets", default="fmnist")
    ap.add_argument("--results", default="results")
    ap.add_argument("--pyod", action="store_true", help="also PyOD KNN, IForest, HBOS, ECOD on the latents, KNN on pixels")
    ap.add_argument("--readouts", default="", help="comma-separated encoder readouts to add (avg, max, avg+max)")
    ap.add_argument("--seed", type=int, default=0, help="the VAE's and the encoder's seed (folders NAME-sSEED above 0)")
    ap.add_argument("--jitter", type=float, default=ContrastiveConfig.jitter,
                    help="the encoder's brightness and contrast jitter (another value: its own folder)")
    ap.add_argument("--rotation-weight", type=float, default=0.0,
                    help="train the encoder with the rotation task at this weight (its own folder), and score its "
                         "rotation surprise")
    ap.add_argument("--dump", action="store_true", help="also write every row's features to OUT/NAME/features.npz")
    args = ap.parse_args()
    results = {}
    sets = datasets(args.datasets.split(","), 32, tuple(int(c) for c in args.classes.split(",")))
    for name, (data, rare, reference, epochs) in sets.items():
        t0 = time.time()
        run = args.out / (f"{name}-s{args.seed}" if args.seed else name)
        if not (run / "model.pt").exists():
            cfg = vae_config(image_size=32, channels=data.channels, latent_dim=32, beta=1.0, width=32)
            desc = DataDescription(source=name, where=[], fingerprint=data.fingerprint, n_images=len(data), n_skipped=0)
            train_vae(data, cfg, TrainConfig(epochs=epochs, device="cpu", seed=args.seed), run, data_desc=desc, progress=False,
                      resume=(run / "checkpoint.pt").exists())  # a run stopped mid-way continues
        train_config = ContrastiveTrainConfig(epochs=args.contrastive_epochs, min_steps=args.min_steps, device="cpu",
                                              seed=args.seed)
        enc_epochs = encoder_epochs(train_config, len(data))
        variant = (f"-rot{args.rotation_weight:g}" if args.rotation_weight else "") + (
            f"-j{args.jitter:g}" if args.jitter != ContrastiveConfig.jitter else "")
        encoder_dir = run / f"contrastive-e{enc_epochs}{variant}"
        if not (encoder_dir / "encoder.pt").exists():
            encoder_config = ContrastiveConfig(image_size=32, channels=data.channels, rotation_weight=args.rotation_weight,
                                               jitter=args.jitter)
            train_contrastive(data, encoder_config, train_config, encoder_dir,
                              data_desc={"fingerprint": data.fingerprint}, progress=False,
                              resume=(encoder_dir / "checkpoint.pt").exists())
        model, _ = load_model(run)
        encoder, _ = load_encoder(encoder_dir / "encoder.pt")
        enc = encode_images(model, data, progress=False)
        default = fit_audit_rarity(enc.mu, enc.recon_error).rarity
        readouts = list(filter(None, args.readouts.split(",")))
        # each readout's features once (the same weights): "avg" for the encoder kNN rows at k = 5..100, the audit's
        features = {r: embed_images(encoder, data, readout=r) for r in {"avg", AUDIT_EMBEDDING_READOUT, *readouts}}
        E = features["avg"]
        shipped = fit_audit_rarity(enc.mu, enc.recon_error,  # what `debias audit` now does
                                   embeddings=features[AUDIT_EMBEDDING_READOUT])
        rarities = {f"default (knn-recon + encoder, k = 50, readout {AUDIT_EMBEDDING_READOUT})": shipped.rarity,
                    "knn-recon without the encoder (--no-encoder)": default}
        for k in (5, 20, 50, 100):
            rarities[f"encoder kNN, k={k}"] = kth_neighbour_distance(E, k)
        for readout in readouts:
            E_r = features[readout]
            rarities[f"knn-recon + encoder, readout {readout}"] = fit_audit_rarity(enc.mu, enc.recon_error,
                                                                                    embeddings=E_r).rarity
            rarities[f"encoder kNN, k=50, readout {readout}"] = kth_neighbour_distance(E_r, 50)
        surprise = {}
        if encoder.rotation_head is not None:
            with torch.no_grad():
                surprise["rotation_surprise"] = np.concatenate([encoder.rotation_surprise(data.batch(slice(a, a + 256))).numpy()
                                                                for a in range(0, len(data), 256)])
            rarities["rotation surprise"] = surprise["rotation_surprise"]
            rarities["knn-recon + encoder + rotation surprise"] = shipped.rarity + robust_z(surprise["rotation_surprise"])
        pixels = np.asarray(data.images, dtype=np.float32).reshape(len(data), -1) / 255.0
        if args.pyod:
            rarities.update(pyod_rarities(enc.mu, pixels))
        if args.dump:  # every representation of the rows, for comparing rules offline on the same models
            np.savez_compressed(run / f"features{variant}.npz", mu=enc.mu, recon_error=enc.recon_error,
                                pixels=pixels, rare=rare, reference=reference, **surprise,
                                **{f"embedding_{r}": f for r, f in features.items()})
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
