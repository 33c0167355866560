"""Cost of DB-VAE training next to ERM, measured side by side in one process.

Per repetition, interleaved so that load from other processes hits every measurement alike:
  - ``steps`` ERM training steps (cross-entropy on the encoder + head),
  - ``steps`` DB-VAE training steps (the joint loss: encoder, decoder, reconstruction and KL),
  - one re-encoding of the whole training set as Algorithm 1 does at every epoch (encoder + head only, eval mode,
    inference mode, batches of 512, uint8 images held in memory) plus the histogram fit and the weights.
Medians over the repetitions are scaled to one epoch (n / batch_size steps).

    python benchmarks/reweight_cost.py --data /work/shared/data/utkface/manifest.csv --where split=train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from debias.data import load_images
from debias.data.tensors import ImageTensor
from debias.density.estimators import LatentHistogramDensity
from debias.models import ConvVAE, VAEConfig
from debias.training.classifier import classifier_loss
from debias.training.sampling import encode_latents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:spurious?n=4000")
    ap.add_argument("--where", action="append", default=[])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--vae-weight", type=float, default=0.001)
    ap.add_argument("--steps", type=int, default=10, help="training steps per method per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    data = load_images(args.data, where=args.where, image_size=args.image_size, progress=False)
    images = ImageTensor(data)
    n = len(images)
    cfg = VAEConfig(image_size=args.image_size, channels=data.channels, latent_dim=args.latent_dim,
                    width=args.width, n_classes=2, classes=["0", "1"])
    torch.manual_seed(0)
    models = {m: ConvVAE(cfg).to(memory_format=torch.channels_last) for m in ("none", "dbvae")}  # as the loop
    opts = {m: torch.optim.Adam(models[m].parameters(), lr=1e-3) for m in models}
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 2, n))
    times: dict[str, list[float]] = {"none": [], "dbvae": [], "reencode": [], "fit": []}

    for _ in range(args.reps + 1):  # the first repetition warms up and is dropped
        for method, objective in (("none", "ce"), ("dbvae", "dbvae")):
            model, opt = models[method], opts[method]
            model.train()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                idx = rng.integers(0, n, args.batch_size)
                loss, _ = classifier_loss(model, images.batch(idx), y[idx], objective, args.vae_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[method].append((time.perf_counter() - t0) / args.steps)
        t0 = time.perf_counter()
        z = encode_latents(models["dbvae"], images.batch, n)
        t1 = time.perf_counter()
        LatentHistogramDensity().fit(z).sampling_weights(z)
        times["reencode"].append(t1 - t0)
        times["fit"].append(time.perf_counter() - t1)

    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    steps = int(np.ceil(n / args.batch_size))
    erm_epoch = med["none"] * steps
    weights = med["reencode"] + med["fit"]
    dbvae_epoch = med["dbvae"] * steps + weights
    out = {
        "n": n,
        "image_size": args.image_size,
        "width": args.width,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "erm_step_ms": 1e3 * med["none"],
        "dbvae_step_ms": 1e3 * med["dbvae"],
        "reencode_s": med["reencode"],
        "density_fit_s": med["fit"],
        "erm_epoch_s": erm_epoch,
        "dbvae_epoch_s": dbvae_epoch,
        "dbvae_over_erm": dbvae_epoch / erm_epoch,
        "reweighting_share_of_dbvae_epoch": weights / dbvae_epoch,
        "reweighting_over_erm_epoch": weights / erm_epoch,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
