"""Training throughput of `debias train`: one process against `torchrun` data-parallel processes (gloo on CPU).

Each repetition runs every setting once, interleaved, so that load from other processes hits them alike:
  - ``1 process x T threads``   (T = --threads, default all cores: the fair single-process baseline),
  - ``1 process x 1 thread``    (what one DDP rank has),
  - ``torchrun N x 1 thread``   (N = --nproc, OMP_NUM_THREADS=1 per rank, the global --batch-size split over ranks).
Figures: training images/s as the loop logs it (rank 0's epoch time, all-reduce waits included; the first epoch
is dropped as warm-up), and the wall time of the whole command (start-up, data loading and process group included).
Medians over the repetitions.

    python benchmarks/ddp_train.py --reps 3
    python benchmarks/ddp_train.py --device cuda --nproc 1   # one GPU: plain process against a 1-rank NCCL group

With ``--device cuda`` the settings are ``1 process`` and ``torchrun N`` (one GPU per rank, NCCL); threads do not
apply.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def run(cmd: list[str], threads: int, cache: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DEBIAS_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:shapes?n=2000")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split over the DDP ranks)")
    ap.add_argument("--epochs", type=int, default=3, help="per run; the first is dropped as warm-up")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    common = [
        "train", "--data", args.data, "--image-size", str(args.image_size), "--width", str(args.width),
        "--latent-dim", str(args.latent_dim), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
        "--device", args.device, "-q",
    ]  # fmt: skip
    single = [sys.executable, "-m", "debias"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", "debias"]  # fmt: skip
    if args.device == "cpu":
        settings = {
            f"1 process x {args.threads} threads": (single, args.threads),
            "1 process x 1 thread": (single, 1),
            f"torchrun {args.nproc} x 1 thread": (ddp, 1),
        }
    else:  # each rank owns one GPU: the cores feed it, so every process keeps all its threads
        settings = {"1 process": (single, args.threads), f"torchrun {args.nproc} (NCCL)": (ddp, args.threads)}
    results: dict[str, dict[str, list[float]]] = {k: {"images_per_s": [], "wall_s": []} for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        run([*single, *common, "--epochs", "1", "--out", f"{tmp}/warm"], 1, cache)  # decode the images once
        for rep in range(args.reps):
            for name, (launcher, threads) in settings.items():
                out = Path(tmp) / f"{rep}-{len(results[name]['wall_s'])}-{name.replace(' ', '_')}"
                wall = run([*launcher, *common, "--out", str(out)], threads, cache)
                log = pd.read_csv(out / "loss.csv")
                results[name]["images_per_s"].append(float(log["images_per_s"].iloc[1:].median()))
                results[name]["wall_s"].append(wall)
                print(f"rep {rep}  {name:<24} {results[name]['images_per_s'][-1]:8.0f} images/s  {wall:6.1f} s wall",
                      flush=True)

    base = statistics.median(results[next(iter(settings))]["images_per_s"])
    print(f"\n{args.data}, {args.image_size} px, width {args.width}, global batch {args.batch_size}, "
          f"{args.epochs} epochs, {os.cpu_count()} cores, {args.reps} repetitions (medians)\n")
    print("| setting | training images/s | vs 1 process | wall time per run (s) |")
    print("|---|---|---|---|")
    summary = {}
    for name, r in results.items():
        ips, wall = statistics.median(r["images_per_s"]), statistics.median(r["wall_s"])
        summary[name] = {"images_per_s": ips, "ratio": ips / base, "wall_s": wall, "runs": r}
        print(f"| {name} | {ips:.0f} | {ips / base:.2f}x | {wall:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
