"""Kill `debias audit` and `debias score` with SIGKILL at random moments and check what they leave behind.

Every output file is written atomically (a temporary file in the same folder, then a rename), so after a kill each of
scores.parquet, scores.csv and summary.json is either absent or complete: readable, with one row per image. Leftover
temporary files of the killed process are allowed (the next run removes them) and counted.

    python benchmarks/kill_outputs.py [--runs 20] [--data builtin:shapes?n=2000] [--work bench-out/kill]

Loopback and local files only; bounded by --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

DEBIAS = [sys.executable, "-m", "debias"]


def check_outputs(out: Path, n_rows: int) -> tuple[str, list[str]]:
    """'complete', 'absent' or 'partial' (with the reason) for a killed run's output folder."""
    files = {name: out / name for name in ("scores.parquet", "scores.csv", "summary.json")}
    present = {name for name, p in files.items() if p.exists()}
    problems = []
    if "scores.parquet" in present and len(pd.read_parquet(files["scores.parquet"])) != n_rows:
        problems.append("scores.parquet has the wrong number of rows")
    if "scores.csv" in present and len(pd.read_csv(files["scores.csv"])) != n_rows:
        problems.append("scores.csv has the wrong number of rows")
    if "summary.json" in present:
        json.loads(files["summary.json"].read_text())  # raises on a torn file
    if problems:
        return "partial", problems
    return ("complete" if present == set(files) else "absent" if not present else "some"), []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--data", default="builtin:shapes?n=2000")
    ap.add_argument("--work", type=Path, default=Path("bench-out/kill"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    model = args.work / "model"
    if not (model / "model.pt").exists():
        subprocess.run([*DEBIAS, "train", "--data", args.data, "--out", str(model), "--epochs", "1", "--image-size", "32",
                        "--latent-dim", "8", "--width", "8", "-q"], check=True)
    # one uninterrupted run of each gives the expected row count and the duration to draw kill times from
    timing = {}
    for command in ("audit", "score"):
        out = args.work / f"{command}-full"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run([*DEBIAS, command, "--model", str(model), "--data", args.data, "--out", str(out), "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        timing[command] = time.monotonic() - t0
    n_rows = len(pd.read_parquet(args.work / "audit-full" / "scores.parquet"))
    tally: dict[str, dict[str, int]] = {}
    leftovers = 0
    for i in range(args.runs):
        command = ("audit", "score")[i % 2]
        out = args.work / f"{command}-killed"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([*DEBIAS, command, "--model", str(model), "--data", args.data, "--out", str(out), "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.05) * timing[command])
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state, problems = check_outputs(out, n_rows) if out.exists() else ("absent", [])
        tally.setdefault(command, {}).setdefault(state, 0)
        tally[command][state] += 1
        leftovers += len(list(out.glob(".*.tmp"))) if out.exists() else 0
        if problems:
            print(f"run {i} ({command}): {problems}")
    print(json.dumps({"runs": args.runs, "rows": n_rows, "seconds_uninterrupted": timing, "outcomes": tally,
                      "temporary_files_left": leftovers}, indent=2))
    if any("partial" in t for t in tally.values()):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
