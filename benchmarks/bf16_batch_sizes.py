"""bfloat16 against float32 on this CPU, by batch size: the isolated training step of the default 64-px VAE and
`encode_batch` (encode + decode, what scoring runs) of a small and the default model, fp32 and bf16 alternating in one
process, median of 3 rounds: where bf16 pays (docs/benchmarks.md, "Session 12: bfloat16").

    OMP_NUM_THREADS=1 python benchmarks/bf16_batch_sizes.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debias.density.encoding import encode_batch  # noqa: E402
from debias.models.vae import ConvVAE, VAEConfig, vae_loss  # noqa: E402
from debias.runtime.device import cpu_has_bf16, set_precision  # noqa: E402


def rate(fn, images: int, calls: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls * images / (time.perf_counter() - t)


def side_by_side(fn_for: dict[str, object], images: int, calls: int) -> tuple[float, float]:
    r: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(3):
        for p in ("fp32", "bf16"):
            set_precision(p)
            r[p].append(rate(fn_for[p], images, calls))
    return statistics.median(r["fp32"]), statistics.median(r["bf16"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not cpu_has_bf16():
        sys.exit("this CPU has neither AMX nor AVX-512-BF16: nothing to compare")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = ConvVAE(VAEConfig(image_size=64, width=32)).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(128, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def step(bf16: bool):
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = vae_loss(model, x)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    model.train()
    f, b = side_by_side({"fp32": step(False), "bf16": step(True)}, 128, 5)
    print(f"training step, 64 px, width 32, batch 128: fp32 {f:7.0f}  bf16 {b:7.0f} images/s  ratio {b / f:.2f}")

    for size, channels, width, latent in ((28, 1, 16, 16), (64, 3, 32, 32)):
        model = ConvVAE(VAEConfig(image_size=size, channels=channels, width=width, latent_dim=latent)).eval()
        for batch in (1, 4, 16, 64, 256):
            xb = torch.rand(batch, channels, size, size)
            calls = max(3, 2048 // batch // (4 if size == 64 else 1))
            f, b = side_by_side({p: (lambda: encode_batch(model, xb)) for p in ("fp32", "bf16")}, batch, calls)
            print(f"encode_batch, {size} px, width {width}, {batch:4d} images per call: fp32 {f:7.0f}  bf16 {b:7.0f} "
                  f"images/s  ratio {b / f:.2f}", flush=True)
    set_precision("auto")


if __name__ == "__main__":
    main()
