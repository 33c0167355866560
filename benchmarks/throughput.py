"""Throughput of the core stages, in images/s: decode (JPEG -> cache), train, audit (encode + density), cold and warm.

    .venv/bin/python benchmarks/throughput.py [--manifest ../shared/data/utkface/manifest.csv] [--repeats 3]

* decode, first run: JPEG files -> the uint8 cache store (empty cache folder each repeat);
* decode, cached: the same call again (memory-mapped store, nothing decoded);
* train step: one epoch over a fixed subset from the cache (forward + backward + Adam);
* audit: encode + reconstruction error from the cache, then the density fit and weights;
* first-run figures for train and audit add the cold decode time of their images.
Medians over the repeats, all measured in the same run. Pass --device cuda on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from debias.data import load_images
from debias.density.encoding import encode_images
from debias.density.estimators import LatentHistogramDensity
from debias.models import ConvVAE, VAEConfig, vae_loss
from debias.runtime.device import autocast, resolve_device

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface" / "manifest.csv"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=2048, help="subset size for the training epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench-out/throughput.json"))
    args = ap.parse_args(argv)
    if not args.manifest.exists():
        sys.exit(f"manifest not found: {args.manifest}")
    device = resolve_device(args.device)
    source, where = str(args.manifest), ["split=train"]

    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(timed(lambda: load_images(source, where=where, image_size=args.image_size, cache_dir=cache,
                                                  progress=False)))
            warm.append(timed(lambda: load_images(source, where=where, image_size=args.image_size, cache_dir=cache,
                                                  progress=False)))
    data = load_images(source, where=where, image_size=args.image_size, progress=False)
    n = len(data)
    decode_s = statistics.median(cold)

    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(image_size=args.image_size, channels=data.channels, latent_dim=32)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sub = data.subset(slice(0, min(args.train_images, n)))

    def train_epoch() -> None:
        model.train()
        for start in range(0, len(sub), 128):
            x = sub.batch(slice(start, start + 128)).to(device)
            with autocast(device):
                loss, _ = vae_loss(model, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def audit() -> None:
        enc = encode_images(model, data, progress=False)
        LatentHistogramDensity().fit(enc.mu).sampling_weights(enc.mu)

    train_epoch()  # warm-up (allocator, kernels)
    train = [timed(train_epoch) for _ in range(args.repeats)]
    aud = [timed(audit) for _ in range(args.repeats)]
    t_train, t_audit = statistics.median(train), statistics.median(aud)
    per_image_decode = decode_s / n
    result = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "images": n,
        "image_size": args.image_size,
        "decode_first_run_images_per_s": n / decode_s,
        "decode_cached_images_per_s": n / statistics.median(warm),
        "train_cached_images_per_s": len(sub) / t_train,
        "train_first_run_images_per_s": len(sub) / (t_train + per_image_decode * len(sub)),
        "audit_cached_images_per_s": n / t_audit,
        "audit_first_run_images_per_s": n / (t_audit + decode_s),
        "raw_seconds": {"decode_cold": cold, "decode_warm": warm, "train_epoch": train, "audit": aud},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "raw_seconds"}, indent=2))


if __name__ == "__main__":
    main()
