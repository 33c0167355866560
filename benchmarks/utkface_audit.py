"""UTKFace audit benchmark: does the density give the rare black faces more weight than the common white faces?

For each trained run directory, encode the UTKFace train split once and fit several density settings side by side:
the public lab's max rule, the paper's untempered product, a fixed temperature and the auto-tempered variants.
Reports, per run and setting: mean weight of black faces / mean weight of white faces, the AUROC of rarity for black
faces, and the effective sample size of the weights.

    .venv/bin/python benchmarks/utkface_audit.py --runs bench-out/utk_vae32 bench-out/utk_dbvae --out bench-out/utk.json

Train the runs first, e.g.:
    debias train --data ../shared/data/utkface/manifest.csv --where split=train --out bench-out/utk_vae32 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from debias.data import load_images
from debias.density import LatentHistogramDensity
from debias.scoring import encode_images, kl_per_dim
from debias.training import load_model

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface" / "manifest.csv"

SETTINGS: dict[str, dict] = {
    "max (lab), bins 10, alpha 1e-3": dict(combine="max", bins=10, alpha=0.001, whiten=False),
    "product, T=1 (paper, untempered)": dict(temperature=1.0, whiten=False),
    "product, T=0.1": dict(temperature=0.1, whiten=False),
    "product, auto T (ESS 0.5)": dict(whiten=False),
    "product, auto T (ESS 0.5), active dims": dict(whiten=False, dims="active"),
    "product, auto T (ESS 0.3)": dict(whiten=False, target_ess=0.3),
    "whitened product, auto T (ESS 0.5) [default]": dict(),
    "whitened product, auto T (ESS 0.5), leading PCs": dict(dims="active"),
    "whitened product, auto T (ESS 0.3)": dict(target_ess=0.3),
    "whitened product, auto T (ESS 0.5), bins 5": dict(bins=5),
    "whitened product, auto T (ESS 0.5), bins 20": dict(bins=20),
    "whitened product, auto T (ESS 0.5), alpha 0.01": dict(alpha=0.01),
    "whitened max, bins 10, alpha 1e-3": dict(combine="max"),
}


def evaluate(run: Path, manifest: Path, settings: dict[str, dict]) -> list[dict]:
    model, meta = load_model(run)
    cfg = model.config
    data = load_images(str(manifest), where=["split=train"], image_size=cfg.image_size, channels=cfg.channels)
    enc = encode_images(model, data)
    race = data.table["race"].astype(str).to_numpy()
    black, white = race == "black", race == "white"
    kl = kl_per_dim(enc)
    rows = []
    for name, params in settings.items():
        d = LatentHistogramDensity(**params).fit(enc.mu)
        w = d.sampling_weights(enc.mu)
        rarity = -d.score_samples(enc.mu)
        rows.append(
            {
                "run": run.name,
                "model": f"latent {cfg.latent_dim}, beta {cfg.beta}, {'DB-VAE ' + str(cfg.classes) if cfg.n_classes else 'VAE'}",
                "epochs": len(meta["history"]),
                "active_dims": int((kl > 0.01).sum()),
                "setting": name,
                "black_white_weight_ratio": float(w[black].mean() / w[white].mean()),
                "auroc_black": float(roc_auc_score(black, rarity)),
                "ess": float(d.ess_),
                "ess_fraction": float(d.ess_ / len(w)),
                "temperature": float(d.temperature_),
            }
        )
        print(f"{run.name:24s} {name:44s} black/white {rows[-1]['black_white_weight_ratio']:.2f}x  "
              f"AUROC {rows[-1]['auroc_black']:.3f}  ESS {d.ess_:.0f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--out", type=Path, default=Path("bench-out/utkface_audit.json"))
    args = ap.parse_args(argv)
    if not args.manifest.exists():
        sys.exit(f"UTKFace manifest not found at {args.manifest}")
    rows = [r for run in args.runs for r in evaluate(run, args.manifest, SETTINGS)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print("\n| run | model | setting | black/white mean weight | AUROC(black) | ESS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['model']}, {r['epochs']} ep | {r['setting']} | {r['black_white_weight_ratio']:.2f}x "
              f"| {r['auroc_black']:.3f} | {r['ess']:.0f} ({r['ess_fraction']:.0%}) |")


if __name__ == "__main__":
    main()
