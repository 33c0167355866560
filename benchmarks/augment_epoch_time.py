"""Training time per epoch of the two augmentation models (GAN and CycleGAN) on the CPU, side by side in one run.

The real training loops run (debias.training.gan.train_gan, debias.training.cyclegan.train_cyclegan, with their
checkpoints, sample grids and the `debias augment` defaults), interleaved epoch by epoch: GAN epoch 1, CycleGAN epoch
1, GAN epoch 2, ... (each further epoch is a resume with one more epoch), so that load from other processes hits both
alike. The seconds are the loops' own per-epoch timings (loss.csv: the epoch's steps, without checkpoint and grid).

    python benchmarks/augment_epoch_time.py --epochs 3

GAN epoch: every image of the set once (rarity-weighted draws, here uniform). CycleGAN epoch: max(|A|, |B|) pairs,
A = the --from colour, B = the --to colour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import torch

from debias.data import load_images
from debias.models.cyclegan import CycleGANConfig
from debias.models.dcgan import DCGANConfig
from debias.training.cyclegan import CycleGANTrainConfig, train_cyclegan
from debias.training.gan import GANTrainConfig, train_gan
from debias.training.vae import DataDescription


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:shapes?n=512")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each model (the median is reported)")
    ap.add_argument("--from", dest="source", default="red", help="CycleGAN domain A: a colour of builtin:shapes")
    ap.add_argument("--to", dest="target", default="green", help="CycleGAN domain B")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    data = load_images(args.data, image_size=args.image_size, progress=False)
    colour = data.table["colour"].astype(str)
    domain_a = data.subset((colour == args.source).to_numpy())
    domain_b = data.subset((colour == args.target).to_numpy())
    desc = DataDescription(source=args.data, where=[], fingerprint=data.fingerprint, n_images=len(data), n_skipped=0)
    gan_cfg = DCGANConfig(image_size=args.image_size, channels=data.channels)  # defaults of `debias augment`
    cg_cfg = CycleGANConfig(image_size=args.image_size, channels=data.channels)
    with tempfile.TemporaryDirectory() as tmp:
        gan_dir, cg_dir = Path(tmp) / "gan", Path(tmp) / "cyclegan"
        for epoch in range(1, args.epochs + 1):
            resume = epoch > 1
            gan_train, cg_train = GANTrainConfig(epochs=epoch, device="cpu"), CycleGANTrainConfig(epochs=epoch, device="cpu")
            train_gan(data, gan_cfg, gan_train, gan_dir, data_desc=desc, resume=resume, progress=False)
            train_cyclegan(domain_a, domain_b, cg_cfg, cg_train, cg_dir, data_desc=desc, resume=resume, progress=False)
        gan_hist, cg_hist = pd.read_csv(gan_dir / "loss.csv"), pd.read_csv(cg_dir / "loss.csv")

    gan_s, cg_s = statistics.median(gan_hist["seconds"]), statistics.median(cg_hist["seconds"])
    pairs = max(len(domain_a), len(domain_b))
    figures = {
        "data": args.data,
        "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "gan": {"images_per_epoch": len(data), "batch_size": gan_train.batch_size, "width": gan_cfg.width,
                "seconds_per_epoch": gan_s, "images_per_s": len(data) / gan_s,
                "all_epochs_s": gan_hist["seconds"].round(2).tolist()},
        "cyclegan": {"pairs_per_epoch": pairs, "domain_sizes": [len(domain_a), len(domain_b)], "batch_size": cg_train.batch_size,
                     "width": cg_cfg.width, "n_blocks": cg_cfg.n_blocks, "seconds_per_epoch": cg_s,
                     "pairs_per_s": pairs / cg_s, "all_epochs_s": cg_hist["seconds"].round(2).tolist()},
        "cyclegan_s_per_pair_over_gan_s_per_image": (cg_s / pairs) / (gan_s / len(data)),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
