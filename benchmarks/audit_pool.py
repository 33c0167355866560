"""Issue 15: is the audit limited by what 2,000 images can teach a representation? The cut-class Fashion-MNIST sets
of `benchmarks/audit_contrastive.py` audited with a VAE and contrastive encoder trained once on a larger unlabelled
pool (the whole Fashion-MNIST training split, 60,000 images, every class at 10 %), against the models trained on each
2,000-image set itself (the default flow; their features from `audit_contrastive.py --dump`).

    OMP_NUM_THREADS=2 python benchmarks/audit_pool.py --out bench-out/audit-contrastive [--vae-epochs 5] \
        [--contrastive-epochs 5]

What a user does with `debias train --data POOL` then `debias audit --model RUN --data SUBSET`: the rarity is the
audit's default, fitted on the subset's rows; only the representation comes from the pool. Per class: AUROC of the
default rarity for the cut class, its mean-weight ratio, and the neighbourhood purity (the share of a cut-class row's
10 nearest rows, in the encoder's features, that are of its class: a group that kNN can find is its own neighbourhood).
Writes OUT/pool.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from audit_rarity import FMNIST, datasets, evaluate, purity  # noqa: E402

from debias.data import load_images  # noqa: E402
from debias.density.detector import embed_images  # noqa: E402
from debias.density.encoding import encode_images  # noqa: E402
from debias.density.rarity import AUDIT_EMBEDDING_READOUT, fit_audit_rarity  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/audit-contrastive"))
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--vae-epochs", type=int, default=5)
    ap.add_argument("--contrastive-epochs", type=int, default=5)
    args = ap.parse_args()
    pool_dir = args.out / "pool-fmnist"
    t0 = time.time()
    if not (pool_dir / "model.pt").exists() or not (pool_dir / "contrastive" / "encoder.pt").exists():
        pool = load_images(str(FMNIST), where=["split=train"], image_size=32, progress=False)
        if not (pool_dir / "model.pt").exists():
            desc = DataDescription(source="fmnist-train", where=[], fingerprint=pool.fingerprint, n_images=len(pool),
                                   n_skipped=0)
            train_vae(pool, vae_config(image_size=32, channels=1, latent_dim=32, beta=1.0, width=32),
                      TrainConfig(epochs=args.vae_epochs, device="cpu"), pool_dir, data_desc=desc, progress=False,
                      resume=(pool_dir / "checkpoint.pt").exists())
        enc_dir = pool_dir / "contrastive"
        train_contrastive(pool, ContrastiveConfig(image_size=32, channels=1),
                          ContrastiveTrainConfig(epochs=args.contrastive_epochs, device="cpu"), enc_dir,
                          data_desc={"fingerprint": pool.fingerprint}, progress=False,
                          resume=(enc_dir / "checkpoint.pt").exists())
        print(f"pool models trained in {time.time() - t0:.0f} s", flush=True)
    model, _ = load_model(pool_dir)
    encoder, _ = load_encoder(pool_dir / "contrastive" / "encoder.pt")
    results = {}
    for name, (data, rare, reference, _) in datasets(["fmnist"], 32, tuple(int(c) for c in args.classes.split(","))).items():
        enc = encode_images(model, data, progress=False)
        E = embed_images(encoder, data, readout=AUDIT_EMBEDDING_READOUT)
        row = {"pool": {**evaluate(fit_audit_rarity(enc.mu, enc.recon_error, embeddings=E).rarity, rare, reference),
                        "purity": purity(E, rare, cosine=True)}}
        own = args.out / name / "features.npz"
        if own.exists():  # the same rows' default with the models trained on the 2,000 images themselves
            f = np.load(own)
            own_rarity = fit_audit_rarity(f["mu"], f["recon_error"], embeddings=f[f"embedding_{AUDIT_EMBEDDING_READOUT}"])
            row["own"] = {**evaluate(own_rarity.rarity, rare, reference),
                          "purity": purity(f[f"embedding_{AUDIT_EMBEDDING_READOUT}"], rare, cosine=True)}
        results[name] = row
        print(name, {k: {m: round(v, 3) for m, v in r.items()} for k, r in row.items()}, flush=True)
    for which in ("own", "pool"):
        vals = [r[which]["auroc"] for r in results.values() if which in r]
        print(f"mean AUROC, {which} models: {np.mean(vals):.3f} over {len(vals)} classes")
    (args.out / "pool.json").write_text(json.dumps({"command": " ".join(sys.argv), "cases": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
