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

from debias.data import load_images
from debias.density.encoding import encode_images, kl_per_dim
from debias.training.vae import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from density_settings import SETTINGS, score_settings  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface" / "manifest.csv"


def evaluate(run: Path, manifest: Path, settings: dict[str, dict]) -> list[dict]:
    model, meta = load_model(run)
    cfg = model.config
    data = load_images(str(manifest), where=["split=train"], image_size=cfg.image_size, channels=cfg.channels)
    enc = encode_images(model, data)
    race = data.table["race"].astype(str).to_numpy()
    black, white = race == "black", race == "white"
    kl = kl_per_dim(enc)
    rows = []
    for r in score_settings(enc.mu, black, white, settings):
        rows.append(
            {
                "run": run.name,
                "model": f"{cfg.image_size} px, latent {cfg.latent_dim}, beta {cfg.beta}, "
                + (f"DB-VAE on {meta['data']['label']}" if cfg.n_classes else "VAE"),
                "epochs": len(meta["history"]),
                "active_dims": int((kl > 0.01).sum()),
                **r,
            }
        )
        print(f"{run.name:24s} {r['setting']:48s} black/white {r['weight_ratio']:.2f}x  AUROC {r['auroc']:.3f}  "
              f"ESS {r['ess']:.0f}", flush=True)
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
        print(f"| {r['run']} | {r['model']}, {r['epochs']} ep | {r['setting']} | {r['weight_ratio']:.2f}x "
              f"| {r['auroc']:.3f} | {r['ess']:.0f} ({r['ess_fraction']:.0%}) |")


if __name__ == "__main__":
    main()
