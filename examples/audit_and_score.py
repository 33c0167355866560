"""Audit a dataset and score new images from Python: the README's "Python API" section, runnable.

    python examples/audit_and_score.py                      # the built-in shapes set, a few seconds per epoch
    python examples/audit_and_score.py --data faces/manifest.csv --where split=train --epochs 10

It trains a VAE (or reuses the run in --out), audits the training images for rarity, prints the rarest ones and
the share of the sampling weight they get, then fits a novelty detector and scores images it has never seen:
held-out in-distribution ones and, for contrast, the same images turned upside down and colour-inverted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import debias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:shapes?n=1200&rare=0.03")
    ap.add_argument("--where", action="append", default=[], help="COL=VALUE (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/example"))
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--contrastive-min-steps", type=int, default=600, help="the contrastive encoder's minimum steps")
    args = ap.parse_args()

    where = dict(w.split("=", 1) for w in args.where)
    imgs = debias.load_images(args.data, where=where, image_size=args.image_size)
    print(f"{len(imgs)} images, {imgs.images.shape[1]} px, columns: {', '.join(imgs.table.columns)}")
    # Hold out a fifth of the images: the detector must call most of them typical.
    rng = np.random.default_rng(0)
    order = rng.permutation(len(imgs))
    train, held_out = imgs.subset(order[len(imgs) // 5 :]), imgs.subset(order[: len(imgs) // 5])

    if (args.out / "model.pt").exists():
        vae = debias.load_vae(args.out)
    else:
        vae = debias.train_vae(train, out=args.out, epochs=args.epochs, latent_dim=16, width=args.width,
                               contrastive_min_steps=args.contrastive_min_steps)
    encoder = debias.load_encoder(args.out)  # trained beside the VAE: the audit's and the detector's second view

    audit = debias.RarityAudit(vae, encoder=encoder).fit(train)
    top = audit.scores_.sort_values("rarity", ascending=False).head(5)
    print("rarest training images:")
    print(top.drop(columns=[c for c in ("recon_error",) if c in top]).to_string(index=False))
    rare_share = audit.scores_["weight"].nlargest(len(train) // 20).sum()
    print(f"the rarest 5 % of the images get {rare_share:.0%} of the sampling weight")

    det = debias.NoveltyDetector(vae, encoder=encoder, target_fpr=0.05).fit(train)
    odd = 255 - held_out.images[:, ::-1]  # upside down and colour-inverted: images the model has never seen
    typical_rate = float(np.mean(det.predict(held_out) == 1))
    novel_rate = float(np.mean(det.predict(odd) == -1))
    print(f"held-out images called typical: {typical_rate:.0%} (target about 95 %)")
    print(f"upside-down, inverted images called novel: {novel_rate:.0%}")
    print(det.explain(odd[:3])[["novelty", "p_value", "is_novel", "driver"]].to_string(index=False))


if __name__ == "__main__":
    main()
