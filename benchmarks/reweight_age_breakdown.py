"""Accuracy by race x age band of a `debias compare` run on UTKFace (analysis after training, from predictions.csv).

Why the worst race moves so little under any reweighting: the per-race accuracy is a mix of age bands whose mix
differs by race in the balanced test split (half the asian test faces are 0-3 years old), and infants' gender is
near chance at this resolution for every method.

    python benchmarks/reweight_age_breakdown.py bench-out/reweight3/utk [--label gender]

Prints, per method (mean over seeds): accuracy per race x age band, and the test faces per race x age band.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

BANDS = [-1, 3, 9, 19, 39, 59, 200]
NAMES = ["0-3", "4-9", "10-19", "20-39", "40-59", "60+"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_dir", type=Path, help="--out of debias compare (holds runs/METHOD/seedS/)")
    ap.add_argument("--label", default="gender")
    args = ap.parse_args()

    runs = sorted(args.compare_dir.glob("runs/*/seed*/predictions.csv"))
    if not runs:
        raise SystemExit(f"no runs/*/seed*/predictions.csv under {args.compare_dir}")
    frames = []
    for p in runs:
        d = pd.read_csv(p)
        d["method"], d["seed"] = p.parent.parent.name, p.parent.name
        frames.append(d)
    d = pd.concat(frames, ignore_index=True)
    d["correct"] = (d["prediction"].astype(str) == d[args.label].astype(str)).astype(float) * 100
    d["age band"] = pd.cut(d["age"], BANDS, labels=NAMES)
    first = d[(d["method"] == d["method"].iloc[0]) & (d["seed"] == d["seed"].iloc[0])]
    print("test faces per race x age band")
    print(pd.crosstab(first["race"], first["age band"]).to_string(), "\n")
    for method, rows in d.groupby("method"):
        table = rows.pivot_table(index="race", columns="age band", values="correct", aggfunc="mean", observed=True)
        table["all"] = rows.groupby("race")["correct"].mean()
        print(f"{method}: accuracy % by race x age band, mean over {rows['seed'].nunique()} seeds")
        print(table.round(1).to_string(), "\n")


if __name__ == "__main__":
    main()
