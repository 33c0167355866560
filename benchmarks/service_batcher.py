"""The micro-batcher without HTTP: many concurrent in-process clients call the service's scoring engine directly.

    python benchmarks/service_batcher.py --model RUN --data SOURCE [--where C=V] [--clients 64] [--requests 2000]

Same engine, settings and JPEG uploads as `benchmarks/service_load.py`, but the clients are asyncio tasks in the
server's own event loop calling ``engine.prepare`` (check + decode) and ``engine.score`` (queue -> model-owner
thread), so the figures isolate what batching changes from the cost of HTTP parsing, which on this CPU is the larger
part of a request. Modes as there: on = max batch 64, max wait 2 ms; off = max batch 1, max wait 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.service_load import load_jpegs  # noqa: E402
from debias.service.engine import ScoringEngine  # noqa: E402
from debias.service.prometheus_metrics import ServiceMetrics  # noqa: E402
from debias.service.settings import Settings  # noqa: E402

MODES = {"on": {"max_batch_size": 64, "max_wait_ms": 2.0}, "off": {"max_batch_size": 1, "max_wait_ms": 0.0}}


async def run_mode(args: argparse.Namespace, mode: str, jpegs: list[bytes]) -> dict:
    settings = Settings(model_dir=args.model, device=args.device, torch_threads=args.server_threads,
                        max_queue_images=100_000, **MODES[mode])
    engine = ScoringEngine(settings, ServiceMetrics())
    engine.start()
    while not engine.ready:
        if engine.state == "failed":
            raise RuntimeError(engine.error)
        await asyncio.sleep(0.05)

    async def drive(requests: int) -> tuple[float, list[float]]:
        latencies: list[float] = []
        counter = iter(range(requests))

        async def client() -> None:
            for i in counter:
                t0 = time.perf_counter()
                images = await engine.prepare([jpegs[i % len(jpegs)]])
                await engine.score(images)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        return time.perf_counter() - t0, latencies

    await drive(min(256, args.requests))  # warm-up
    b0 = engine.metrics.batch_size.collect()[0].samples
    wall, lat = await drive(args.requests)
    b1 = engine.metrics.batch_size.collect()[0].samples
    engine.stop()

    def total(samples, name):
        return sum(s.value for s in samples if s.name == name)

    batches = total(b1, "debias_model_batch_size_count") - total(b0, "debias_model_batch_size_count")
    imgs = total(b1, "debias_model_batch_size_sum") - total(b0, "debias_model_batch_size_sum")
    ms = sorted(1000 * v for v in lat)
    return {
        "mode": mode, "settings": MODES[mode], "requests": args.requests, "clients": args.clients,
        "images_per_s": round(args.requests / wall, 1), "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        "mean_batch_size": round(imgs / batches, 2) if batches else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--where", action="append", default=[])
    ap.add_argument("--send-size", type=int, default=28)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    jpegs = load_jpegs(args.data, args.where, 512, args.send_size)
    results = [asyncio.run(run_mode(args, m, jpegs)) for m in ("on", "off")]
    out = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "results": results,
           "throughput_ratio_on_over_off": round(results[0]["images_per_s"] / results[1]["images_per_s"], 2)}
    print(out["command"])
    for r in results:
        print(f"  batching {r['mode']:3s}: {r['images_per_s']:8.1f} images/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  mean batch {r['mean_batch_size']}  ({r['requests']} requests, "
              f"{r['clients']} clients)")
    print(f"  throughput on/off: {out['throughput_ratio_on_over_off']}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
