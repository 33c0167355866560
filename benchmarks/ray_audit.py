"""Audit throughput, local engine vs the Ray Data engine with 1 and 2 encoder actors, on the same data, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_audit.py [--repeats 3] [--cpus 2]

Data: the Fashion-MNIST test split (10 000 images, 28 px, idx files) when /usr/share/datasets/fashion-mnist exists,
else builtin:shapes?n=4000 at 32 px. The model is a β-VAE (width 32, latent 16) trained for one epoch on those same
images (its weights do not change the cost of encoding). One local Ray with --cpus CPUs is started once, before the timings. Per repeat, in
turn: local engine with an empty decode cache (decode + encode + density + writing the tables), local engine again
with the cache warm (encode + density + writing), Ray with 1 actor, Ray with 2 actors (each Ray run: actor start-up,
decode, encode, gather to the driver, density + writing; the report is off everywhere). Medians of the repeats;
JSON with every run in bench-out/ray_audit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

FASHION = Path("/usr/share/datasets/fashion-mnist")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--out", type=Path, default=Path("bench-out/ray_audit.json"))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="debias-ray-bench-"))
    os.environ["DEBIAS_CACHE_DIR"] = str(work / "cache")
    import ray

    from debias.pipelines.audit import AuditJob, run_audit
    from debias.pipelines.ray_audit import RayAuditOptions, run_ray_audit
    from debias.pipelines.train import TrainJob, run_train
    from debias.training.vae import TrainConfig

    if FASHION.exists():
        source, where, size = str(FASHION), ["split=test"], 28
    else:
        source, where, size = "builtin:shapes?n=4000", [], 32
    run_train(TrainJob(data=source, where=where, out=work / "run", image_size=size, latent_dim=16,
                       train=TrainConfig(epochs=1, batch_size=128, seed=0, device="cpu"), progress=False))

    def job(name: str) -> AuditJob:
        return AuditJob(model=work / "run", data=source, where=where, out=work / name, device="cpu", report=False,
                        progress=False)

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    runs: dict[str, list[dict]] = {"local, cold cache": [], "local, warm cache": [], "ray, 1 actor": [],
                                   "ray, 2 actors": []}
    for rep in range(args.repeats):
        os.environ["DEBIAS_CACHE_DIR"] = str(work / f"cache-{rep}")  # empty: the first local run decodes
        for name, fn in [
            ("local, cold cache", lambda: run_audit(job("local"))),
            ("local, warm cache", lambda: run_audit(job("local"))),
            ("ray, 1 actor", lambda: run_ray_audit(job("ray1"), RayAuditOptions(actors=1))),
            ("ray, 2 actors", lambda: run_ray_audit(job("ray2"), RayAuditOptions(actors=2))),
        ]:
            t0 = time.perf_counter()
            res = fn()
            wall = time.perf_counter() - t0
            n = res.summary["n_images"]
            eng = res.summary["engine"]
            stage = eng.get("decode_and_encode_s")
            runs[name].append({"n": n, "wall_s": wall, "images_per_s": n / wall,
                               "ray_stage_images_per_s": n / stage if stage else None,
                               "worker_decode_s": eng.get("worker_decode_s"), "worker_encode_s": eng.get("worker_encode_s")})
            print(f"repeat {rep}: {name}: {n} images in {wall:.2f} s = {n / wall:.0f} images/s", flush=True)
    ray.shutdown()

    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "median_images_per_s": statistics.median(r["images_per_s"] for r in rs),
            "median_wall_s": statistics.median(r["wall_s"] for r in rs),
        }
        if rs[0]["ray_stage_images_per_s"] is not None:
            summary[name]["median_stage_images_per_s"] = statistics.median(r["ray_stage_images_per_s"] for r in rs)
            summary[name]["median_per_worker_images_per_s"] = statistics.median(
                r["n"] / (r["worker_decode_s"] + r["worker_encode_s"]) for r in rs)
            summary[name]["median_worker_decode_ms_per_image"] = statistics.median(1e3 * r["worker_decode_s"] / r["n"] for r in rs)
            summary[name]["median_worker_encode_ms_per_image"] = statistics.median(1e3 * r["worker_encode_s"] / r["n"] for r in rs)
    print(f"\nsource {source} {where}, {runs['ray, 1 actor'][0]['n']} images, {size} px, local Ray with {args.cpus} CPUs")
    print("| engine | median wall s | images/s, whole audit | images/s, Ray stage | per worker: images/s (decode ms + encode ms per image) |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        stage = s.get("median_stage_images_per_s")
        worker = (f"{s['median_per_worker_images_per_s']:.0f} ({s['median_worker_decode_ms_per_image']:.3f} + "
                  f"{s['median_worker_encode_ms_per_image']:.3f})") if stage else "-"
        print(f"| {name} | {s['median_wall_s']:.2f} | {s['median_images_per_s']:.0f} | {f'{stage:.0f}' if stage else '-'} | {worker} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": source, "where": where, "image_size": size, "cpus": args.cpus,
                                    "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
