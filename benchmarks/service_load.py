"""The service under a bounded loopback load, micro-batching on vs off.

    python benchmarks/service_load.py --model RUN --data SOURCE [--where C=V] [--clients 64] [--requests 2000]

For each mode a fresh `debias serve` subprocess listens on a free 127.0.0.1 port; after a warm-up, --clients
concurrent clients (one asyncio process, httpx) send --requests POST /v1/score requests in total, each with one
JPEG image, and stop. Reported per mode: throughput (images/s), latency p50/p99, the mean model batch size (from
/metrics) and the server's CPU seconds per image (from /proc, which is less sensitive to other jobs on the machine
than wall time). "on" = --max-batch-size 64 --max-wait-ms 2; "off" = --max-batch-size 1 --max-wait-ms 0 (every
image is its own model call). Traffic goes to loopback only and every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"on": ["--max-batch-size", "64", "--max-wait-ms", "2"], "off": ["--max-batch-size", "1", "--max-wait-ms", "0"],
         # batching with a longer wait: fewer, larger model calls when the event loop is the bottleneck
         "on-wait10": ["--max-batch-size", "64", "--max-wait-ms", "10"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the server at ``base`` answers /readyz with 200; RuntimeError if it exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr is not None else "(see its log)"
            raise RuntimeError(f"server did not start: {err}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of its live descendants (the --workers processes)."""
    stats = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(proc.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    tree = {pid}
    for _ in range(4):  # parent -> supervisor children -> their children
        tree |= {p for p, (ppid, _) in stats.items() if ppid in tree}
    return sum(stats[p][1] for p in tree if p in stats)


def load_jpegs(source: str, where: list[str], n: int, size: int = 28) -> list[bytes]:
    import torch
    from PIL import Image

    from debias.data import load_images

    torch.set_num_threads(1)
    data = load_images(source, where=where, image_size=size, channels=None, progress=False)
    out = []
    for a in np.asarray(data.images[:n]):
        buf = io.BytesIO()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def drive(base: str, jpegs: list[bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    import httpx

    latencies: list[float] = []
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:  # shared iterator: exactly `requests` requests in all
            files = [("files", (f"img{i}.jpg", jpegs[i % len(jpegs)], "image/jpeg"))]
            t0 = time.perf_counter()
            r = await http.post(f"{base}/v1/score", files=files)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0, latencies


def run_mode(args: argparse.Namespace, mode: str, jpegs: list[bytes], workers: int = 1) -> dict:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DEBIAS_TORCH_THREADS": str(args.server_threads), "DEBIAS_MAX_QUEUE_IMAGES": "100000"}
    env.pop("DEBIAS_API_KEY", None)
    cmd = [sys.executable, "-m", "debias", "serve", "--model", str(args.model), "--port", str(port), "--device",
           args.device, "--log-level", "warning", "--workers", str(workers), *MODES[mode]]
    profile = None
    if args.py_spy:  # sample the server's stacks (collapsed, one line per stack) for where its CPU goes
        profile = args.profile_dir / f"server-{mode}-w{workers}-{port}.txt"
        profile.parent.mkdir(parents=True, exist_ok=True)
        cmd = [args.py_spy, "record", "--format", "raw", "--rate", "250", "--nonblocking", "--subprocesses",
               *(["--gil"] if args.profile_gil else []), "-o", str(profile), "--", *cmd]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(base, proc)
        if workers > 1:  # /readyz answered by one worker: warm up until every request succeeds
            time.sleep(5.0)
        asyncio.run(drive(base, jpegs, args.clients, min(256, args.requests)))  # warm-up
        before = httpx.get(f"{base}/metrics").text
        cpu0 = cpu_seconds(proc.pid)
        wall, lat = asyncio.run(drive(base, jpegs, args.clients, args.requests))
        cpu1 = cpu_seconds(proc.pid)
        after = httpx.get(f"{base}/metrics").text

        def metric(text: str, name: str) -> float:
            return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

        batches = metric(after, "debias_model_batch_size_count") - metric(before, "debias_model_batch_size_count")
        imgs = metric(after, "debias_model_batch_size_sum") - metric(before, "debias_model_batch_size_sum")
        lat_ms = sorted(1000 * v for v in lat)
        if workers > 1:  # each scrape reaches one worker: its counters are not the server's
            batches = 0
        return {
            "mode": mode,
            "workers": workers,
            "server_args": MODES[mode],
            "requests": args.requests,
            "clients": args.clients,
            "wall_s": round(wall, 2),
            "images_per_s": round(args.requests / wall, 1),
            "p50_ms": round(statistics.median(lat_ms), 1),
            "p99_ms": round(lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))], 1),
            "mean_batch_size": round(imgs / batches, 2) if batches else None,
            # under py-spy the pid is the profiler's, whose CPU is not the server's: no figure then
            "server_cpu_ms_per_image": None if profile else round(1000 * (cpu1 - cpu0) / args.requests, 2),
        }
    finally:
        proc.send_signal(signal.SIGINT if profile else signal.SIGTERM)  # py-spy writes its file on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, help="Images to send (as JPEG, quality 90).")
    ap.add_argument("--send-size", type=int, default=28, help="Side of the JPEGs sent, in pixels.")
    ap.add_argument("--where", action="append", default=[])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--modes", default="on,off")
    ap.add_argument("--workers", default="1", help="Comma-separated `debias serve --workers` values to run in turn.")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server's model owner.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--py-spy", help="Path of a py-spy binary: record the server's stacks while it runs (slows it).")
    ap.add_argument("--profile-dir", type=Path, default=Path("bench-out/service-profile"))
    ap.add_argument("--profile-gil", action="store_true",
                    help="py-spy samples only the thread holding the GIL: Python work, without idle waits")
    args = ap.parse_args()
    jpegs = load_jpegs(args.data, args.where, 512, args.send_size)
    results = [run_mode(args, m, jpegs, int(w)) for w in args.workers.split(",") for m in args.modes.split(",")]
    out = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "results": results}
    by = {r["mode"]: r for r in results if r["workers"] == results[0]["workers"]}
    if "on" in by and "off" in by:
        out["throughput_ratio_on_over_off"] = round(by["on"]["images_per_s"] / by["off"]["images_per_s"], 2)
        out["cpu_per_image_ratio_off_over_on"] = round(
            by["off"]["server_cpu_ms_per_image"] / by["on"]["server_cpu_ms_per_image"], 2
        )
    print(out["command"])
    for r in results:
        print(f"  workers {r['workers']}, batching {r['mode']:3s}: {r['images_per_s']:8.1f} images/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  mean batch {r['mean_batch_size']}  server CPU "
              f"{r['server_cpu_ms_per_image']} ms/image  ({r['requests']} requests, {r['clients']} clients)")
    if "throughput_ratio_on_over_off" in out:
        print(f"  throughput on/off: {out['throughput_ratio_on_over_off']}x; server CPU per image off/on: "
              f"{out['cpu_per_image_ratio_off_over_on']}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
