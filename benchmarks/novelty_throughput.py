"""Scoring throughput of the novelty detector, without HTTP: images/s from tensors and from JPEG bytes.

    python benchmarks/novelty_throughput.py --model RUN --data SOURCE [--where C=V] [--n 2048] [--threads 1]

- tensors: images already in memory as float tensors, scored in batches of --batch-size (encode, statistics,
  p-values, top dimensions), and one image at a time for comparison;
- JPEG bytes: the same images as in-memory JPEGs (quality 90), checked and decoded on the CPU (Pillow, one
  thread, as `debias.data.intake.decode_upload` does for the service) and then scored in batches;
- on CUDA (--device cuda): the same with bf16 autocast, and JPEGs decoded on the GPU (nvJPEG) where torchvision can.

Each figure is the median of --repeats timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from debias.data import load_images  # noqa: E402
from debias.data.gpu_decode import decode_jpegs_on_device, gpu_jpeg_available  # noqa: E402
from debias.data.intake import decode_upload  # noqa: E402
from debias.density.detector import open_detector  # noqa: E402
from debias.runtime.device import (  # noqa: E402
    PRECISIONS,
    effective_precision,
    resolve_device,
    set_precision,
)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--where", action="append", default=[])
    ap.add_argument("--fit-data", default=None, help="In-distribution images to fit the scorer on, when the run has "
                    "no novelty.pt and does not record a loadable training source (as `debias score --fit-data`).")
    ap.add_argument("--fit-where", action="append", default=[])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--single", type=int, default=256, help="Images scored one at a time.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compare-previous", action="store_true",
                    help="Also time the previous default scorer (l1 of posterior_knn + recon_error, no pixel density) "
                         "fitted on the same data, alternating with the shipped one (issue 16).")
    ap.add_argument("--compare-vae-only", action="store_true",
                    help="Also time the same run's detector without its contrastive encoder (the VAE statistics only, "
                         "as --contrastive-epochs 0 gives), fitted on the same data, alternating with the shipped one.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    set_precision(args.precision)
    det = open_detector(args.model, device=device, progress=False, fit_data=args.fit_data,
                        fit_where=args.fit_where or None)
    data = load_images(args.data, where=args.where, image_size=det.image_size, channels=det.channels, progress=False)
    n = min(args.n, len(data))
    x = data.batch(slice(0, n))
    arrays = np.asarray(data.images[:n])
    jpegs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    bs = args.batch_size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def from_tensors() -> None:
        for s in range(0, n, bs):
            det.score_batch(x[s : s + bs].to(device))
        sync()

    def one_at_a_time() -> None:
        for i in range(min(args.single, n)):
            det.score_batch(x[i : i + 1].to(device))
        sync()

    def from_jpeg_cpu() -> None:
        for s in range(0, n, bs):
            dec = [decode_upload(b, det.image_size, det.channels, max_pixels=1 << 26) for b in jpegs[s : s + bs]]
            t = torch.from_numpy(np.stack(dec)).permute(0, 3, 1, 2).float().div_(255.0)
            det.score_batch(t.to(device))
        sync()

    def cpu_decode(b: bytes) -> np.ndarray:
        return decode_upload(b, det.image_size, det.channels, max_pixels=1 << 26)

    def from_jpeg_gpu() -> None:
        for s in range(0, n, bs):
            det.score_batch(decode_jpegs_on_device(jpegs[s : s + bs], det.image_size, det.channels, device, cpu_decode))
        sync()

    res = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": str(device),
        "precision": effective_precision(device),
        "cuda_device": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "model": str(args.model),
        "image_size": det.image_size,
        "channels": det.channels,
        "latent_dim": det.model.config.latent_dim,
        "n_images": n,
        "batch_size": bs,
        "images_per_s": {
            f"tensors, batches of {bs}": n / timed(from_tensors, args.repeats),
            "tensors, one image per call": min(args.single, n) / timed(one_at_a_time, max(1, args.repeats // 2)),
            f"JPEG bytes, CPU decode (1 thread), batches of {bs}": n / timed(from_jpeg_cpu, args.repeats),
        },
    }
    if args.compare_previous or args.compare_vae_only:
        from debias.density.detector import fit_detector
        from debias.density.novelty import NoveltyScorer

        fitted = det.card["fitted_on"]
        fit_data = load_images(fitted["source"], where=fitted.get("where", []), image_size=det.image_size,
                               channels=det.channels, progress=False)
        if args.compare_vae_only:
            previous = fit_detector(det.model, fit_data, progress=False)  # no encoder: the VAE's statistics only
        else:
            previous = fit_detector(det.model, fit_data, scorer=NoveltyScorer(
                statistics=("posterior_knn", "recon_error"), combine="l1", one_sided=("posterior_knn",)),
                progress=False)
        pairs = {"shipped": [], "previous": []}
        for _ in range(args.repeats):  # alternating, so that load from other jobs hits both alike
            for name, d in (("shipped", det), ("previous", previous)):
                t0 = time.perf_counter()
                for s in range(0, n, bs):
                    d.score_batch(x[s : s + bs].to(device))
                pairs[name].append(n / (time.perf_counter() - t0))
        res["side_by_side_images_per_s"] = {k: statistics.median(v) for k, v in pairs.items()}
        res["side_by_side_ratio_shipped_over_previous"] = statistics.median(
            a / b for a, b in zip(pairs["shipped"], pairs["previous"]))
    if gpu_jpeg_available(device):
        res["images_per_s"][f"JPEG bytes, GPU decode, batches of {bs}"] = n / timed(from_jpeg_gpu, args.repeats)
    print(res["command"])
    where = res["cuda_device"] or f"{res['torch_threads']} torch threads"
    print(f"device {res['device']} ({where}, {res['precision']}), model {res['image_size']} px x {res['channels']} ch, "
          f"latent {res['latent_dim']}, {n} images")
    for k, v in res["images_per_s"].items():
        print(f"  {k:52s} {v:10.0f} images/s")
    if "side_by_side_images_per_s" in res:
        print(f"  side by side, tensors: {res['side_by_side_images_per_s']} images/s, shipped / previous "
              f"{res['side_by_side_ratio_shipped_over_previous']:.2f}x (median of {args.repeats} pairs)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
