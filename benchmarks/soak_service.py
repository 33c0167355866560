"""A bounded soak test of `debias serve` on loopback (issue 14): mixed valid and invalid uploads from concurrent
clients for a fixed time, with the server's RSS sampled every half second.

    .venv/bin/python benchmarks/soak_service.py --out bench-out/soak [--seconds 120] [--clients 16]
    .venv/bin/python benchmarks/soak_service.py --out bench-out/soak-nobudget --no-budget   # the budget lifted

Each request is drawn from a fixed mix: small valid images (1-3 PNG/JPEG), large PNGs (4096 x 4096 and 2048 x 2048,
small in bytes, 50 MB each once decoded: the issue's case), one bad file among good ones, only bad files, a missing
API key, and a decompression bomb. The server runs with its defaults (and an API key). Writes, atomically:
soak.json (every figure), soak.md (the table) and rss.png (RSS over time). "Flat" means the median RSS of the last
quarter of the run is within 10 % (or 100 MB) of the median of the second quarter, after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.service_load import free_port, wait_ready  # noqa: E402

KEY = "soak-key"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def corpus(seed: int = 0) -> dict[str, list[bytes]]:
    rng = np.random.default_rng(seed)
    smalls = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    grad = np.linspace(0, 255, 4096, dtype=np.uint8)
    large = np.stack([np.tile(grad, (4096, 1)), np.tile(grad[:, None], (1, 4096)), np.full((4096, 4096), 90, np.uint8)], -1)
    good = png(smalls[0])
    chunk = b"note\0\0" + zlib.compress(b"a" * (64 * 2**20), 9)
    bomb_chunk = len(chunk).to_bytes(4, "big") + b"zTXt" + chunk + zlib.crc32(b"zTXt" + chunk).to_bytes(4, "big")
    return {
        "small": [png(a) for a in smalls] + [jpeg(a) for a in smalls],
        "large": [png(large), png(large[:2048, :2048])],
        "bad": [b"", good[: len(good) // 2], b"plain text, not an image\n" * 10, good[:30]],
        "bomb": [good[:-12] + bomb_chunk + good[-12:]],
    }


# kind -> (share of requests, expected statuses)
MIX = {
    "small": (0.55, {200}),
    "large": (0.10, {200, 503}),
    "mixed": (0.15, {200}),
    "all_bad": (0.10, {400, 415}),
    "no_key": (0.05, {401}),
    "bomb": (0.05, {413}),
}


def request_files(kind: str, data: dict[str, list[bytes]], rnd: random.Random) -> list[tuple[str, tuple[str, bytes, str]]]:
    def f(name: str, b: bytes) -> tuple[str, tuple[str, bytes, str]]:
        return ("files", (name, b, "application/octet-stream"))

    if kind in ("small", "no_key"):
        return [f(f"s{i}.png", rnd.choice(data["small"])) for i in range(rnd.randint(1, 3))]
    if kind == "large":
        return [f(f"l{i}.png", rnd.choice(data["large"])) for i in range(rnd.randint(1, 8))]
    if kind == "mixed":
        return [f("a.png", rnd.choice(data["small"])), f("bad.png", rnd.choice(data["bad"])),
                f("b.png", rnd.choice(data["small"]))]
    if kind == "all_bad":
        return [f(f"x{i}.png", rnd.choice(data["bad"])) for i in range(rnd.randint(1, 3))]
    return [f("bomb.png", data["bomb"][0])]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def soak(base: str, seconds: float, clients: int, max_requests: int, seed: int) -> list[dict]:
    data = corpus(seed)
    kinds, shares = zip(*((k, v[0]) for k, v in MIX.items()))
    log: list[dict] = []
    deadline = time.monotonic() + seconds
    t_start = time.monotonic()

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        rnd = random.Random(seed * 1000 + worker)
        while time.monotonic() < deadline and len(log) < max_requests:
            kind = rnd.choices(kinds, shares)[0]
            files = request_files(kind, data, rnd)
            headers = {} if kind == "no_key" else {"X-API-Key": KEY}
            t0 = time.monotonic()
            try:
                r = await http.post(f"{base}/v1/score", files=files, headers=headers)
                status, body = r.status_code, r.json()
            except (httpx.HTTPError, ValueError) as exc:
                status, body = -1, {"error": type(exc).__name__}
            took = time.monotonic() - t0
            ok = status in MIX[kind][1]
            if ok and kind == "mixed":
                ok = body.get("n_scored") == 2 and body.get("n_failed") == 1
            log.append({"t": t0 - t_start, "kind": kind, "status": status, "seconds": took, "ok": ok,
                        "error": None if ok else str(body)[:200]})

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(w, http) for w in range(clients)))
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/soak"))
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None, help="A run directory (default: train a tiny one in --out).")
    ap.add_argument("--no-budget", action="store_true", help="Lift the decode budget (the behaviour before it).")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    debias = [sys.executable, "-m", "debias"]
    model = args.model or args.out / "model"
    if not (model / "model.pt").is_file():
        subprocess.run(debias + ["train", "--data", "builtin:shapes?n=600", "--image-size", "32", "--epochs", "2",
                                 "--out", str(model), "--quiet"], check=True)
    env = {**os.environ, "DEBIAS_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    if args.no_budget:
        env.update({"DEBIAS_MAX_DECODE_PIXELS": str(2**40), "DEBIAS_DECODE_THREADS": "64"})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = open(args.out / "server.log", "w")
    proc = subprocess.Popen(debias + ["serve", "--model", str(model), "--port", str(port), "--device", "cpu",
                                      "--log-level", "warning"], stdout=server_log, stderr=subprocess.STDOUT, env=env)
    rss: list[tuple[float, float]] = []
    try:
        wait_ready(base, proc, timeout=120)
        baseline = rss_mb(proc.pid)
        stop = threading.Event()
        t_start = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                rss.append((time.monotonic() - t_start, rss_mb(proc.pid)))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log = asyncio.run(soak(base, args.seconds, args.clients, args.max_requests, args.seed))
        load_end = time.monotonic() - t_start
        time.sleep(10)  # idle: does memory come back?
        stop.set()
        sampler.join()
        settled = rss_mb(proc.pid)
        alive = proc.poll() is None
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        server_log.close()

    by_kind: dict[str, list[dict]] = defaultdict(list)
    for e in log:
        by_kind[e["kind"]].append(e)
    rows = []
    for kind in MIX:
        es = by_kind.get(kind, [])
        if not es:
            continue
        lat = np.array([e["seconds"] for e in es]) * 1000
        statuses: dict[int, int] = defaultdict(int)
        for e in es:
            statuses[e["status"]] += 1
        rows.append({"kind": kind, "requests": len(es), "unexpected": sum(not e["ok"] for e in es),
                     "statuses": dict(sorted(statuses.items())), "p50_ms": float(np.percentile(lat, 50)),
                     "p99_ms": float(np.percentile(lat, 99))})
    during = [(t, m) for t, m in rss if t <= load_end]
    q = len(during) // 4
    second_q = float(np.median([m for _, m in during[q : 2 * q]])) if q else float("nan")
    last_q = float(np.median([m for _, m in during[3 * q :]])) if q else float("nan")
    flat = abs(last_q - second_q) <= max(0.10 * second_q, 100.0)
    lat_all = np.array([e["seconds"] for e in log]) * 1000
    summary = {
        "command": " ".join(sys.argv), "seconds": args.seconds, "clients": args.clients, "budget": not args.no_budget,
        "requests": len(log), "requests_per_s": len(log) / load_end, "unexpected": sum(not e["ok"] for e in log),
        "server_5xx": sum(e["status"] >= 500 and e["status"] != 503 for e in log),  # 503 = busy, counted by kind "transport_errors": sum(e["status"] == -1 for e in log),
        "p50_ms": float(np.percentile(lat_all, 50)), "p99_ms": float(np.percentile(lat_all, 99)),
        "rss_mb": {"baseline": baseline, "peak": max(m for _, m in rss), "second_quarter_median": second_q,
                   "last_quarter_median": last_q, "after_10s_idle": settled, "flat": bool(flat)},
        "server_alive": alive, "by_kind": rows,
        "decode_pixels_peak": next((float(line.split()[1]) for line in metrics.splitlines()
                                    if line.startswith("debias_decode_pixels_peak ")), None),
        "examples_of_unexpected": [e for e in log if not e["ok"]][:5],
    }
    write_atomic(args.out / "soak.json", json.dumps({**summary, "rss_series": rss}, indent=2).encode())
    md = [f"`{summary['command']}`", "",
          f"{len(log)} requests in {load_end:.0f} s ({summary['requests_per_s']:.1f}/s), {args.clients} clients, "
          f"decode budget {'on' if summary['budget'] else 'off'}; unexpected answers {summary['unexpected']}, "
          f"5xx other than 503 {summary['server_5xx']}, transport errors {summary['transport_errors']}; "
          f"p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms.", "",
          "| request kind | requests | statuses | unexpected | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        st = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        md.append(f"| {r['kind']} | {r['requests']} | {st} | {r['unexpected']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    m = summary["rss_mb"]
    md += ["", f"RSS (MB): baseline {m['baseline']:.0f}, peak {m['peak']:.0f}, median of the 2nd quarter "
               f"{m['second_quarter_median']:.0f}, of the last quarter {m['last_quarter_median']:.0f}, after 10 s idle "
               f"{m['after_10s_idle']:.0f}: {'flat' if m['flat'] else 'NOT flat'}. Peak pixels decoding at once: "
               f"{summary['decode_pixels_peak']:.0f}.", ""]
    write_atomic(args.out / "soak.md", "\n".join(md).encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([t for t, _ in rss], [m for _, m in rss])
    ax.axvline(load_end, color="grey", ls="--", lw=1)
    ax.set_xlabel("seconds (dashed: load ends)")
    ax.set_ylabel("server RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"soak: {args.clients} clients, decode budget {'on' if summary['budget'] else 'off'}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(args.out / "rss.png", buf.getvalue())
    print("\n".join(md))
    if summary["unexpected"] or not alive:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
