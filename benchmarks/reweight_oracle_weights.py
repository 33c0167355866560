"""Write group-balanced sampling weights from the true group labels: an oracle upper reference for reweighting.

This is NOT a debiasing method (it reads the group columns that the methods are never given). It answers one
question for the benchmark: how much can *any* per-row sampling weight lift the worst group, if it knew the groups
exactly? Each training row gets weight 1 / (rows in its group), so every group is drawn equally often. The file has
the ``path`` + ``weight`` columns that ``debias train-classifier --reweight two-stage --weights`` reads.

    python benchmarks/reweight_oracle_weights.py --by race,gender --out bench-out/oracle/race_gender.parquet
    python benchmarks/reweight_oracle_weights.py --by race,gender,age --age-bins 0,4,10,20,40,60 --out ...

``--age-bins`` cuts a numeric ``age`` column into the given left edges before grouping.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT = "/work/shared/data/utkface/manifest.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=DEFAULT)
    ap.add_argument("--split", default="train", help="rows with split == this value get weights")
    ap.add_argument("--by", required=True, help="comma-separated group columns")
    ap.add_argument("--age-bins", default=None, help="left edges for the age column, e.g. 0,4,10,20,40,60")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()

    table = pd.read_csv(args.manifest, dtype={"path": str})
    table = table[table["split"] == args.split].copy()
    by = [c.strip() for c in args.by.split(",") if c.strip()]
    if args.age_bins and "age" in by:
        edges = [float(e) for e in args.age_bins.split(",")] + [np.inf]
        table["age"] = pd.cut(table["age"], edges, right=False).astype(str)
    sizes = table.groupby(by)["path"].transform("size").to_numpy(dtype=np.float64)
    table["weight"] = 1.0 / sizes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table[["path", "weight"]].to_parquet(args.out, index=False)
    share = table.groupby(by)["weight"].sum() / table["weight"].sum()
    ess = table["weight"].sum() ** 2 / (table["weight"] ** 2).sum()
    print(f"{len(table)} rows, {len(share)} groups, each {share.iloc[0]:.4f} of the draws; ESS {ess:.0f} ({ess / len(table):.2f} n)")


if __name__ == "__main__":
    main()
