"""Built-in shapes audit benchmark: is the planted 2 % rare group (white triangles) found?

Trains a VAE on builtin:shapes (or reuses a finished run) and compares the density settings side by side: AUROC of
rarity for the rare rows and mean weight of the rare rows / the rest.

    .venv/bin/python benchmarks/builtin_audit.py --epochs 12 --latent-dim 16 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from debias.data import load_images
from debias.density.encoding import encode_images, kl_per_dim
from debias.pipelines.train import TrainJob, run_train
from debias.training.vae import TrainConfig, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from density_settings import SETTINGS, score_settings  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="builtin:shapes")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args(argv)
    run = args.out / f"builtin_e{args.epochs}_l{args.latent_dim}_s{args.image_size}_b{args.beta}_seed{args.seed}"
    run_train(
        TrainJob(
            data=args.source, out=run, image_size=args.image_size, latent_dim=args.latent_dim, beta=args.beta,
            train=TrainConfig(epochs=args.epochs, seed=args.seed), resume=True,
        )
    )
    model, meta = load_model(run)
    data = load_images(args.source, image_size=args.image_size)
    enc = encode_images(model, data)
    rare = data.table["rare"].to_numpy() == 1
    rows = score_settings(enc.mu, rare, ~rare, SETTINGS)
    print(f"\n{args.source}: {rare.sum()} rare of {len(rare)}; {args.image_size} px, latent {args.latent_dim}, "
          f"beta {args.beta}, {args.epochs} epochs, {int((kl_per_dim(enc) > 0.01).sum())} active dims\n")
    print("| setting | AUROC(rare) | rare/rest mean weight | ESS |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['auroc']:.3f} | {r['weight_ratio']:.2f}x | {r['ess']:.0f} ({r['ess_fraction']:.0%}) |")
    (run / "benchmark.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
