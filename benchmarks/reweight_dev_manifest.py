"""Write a copy of the UTKFace manifest with a development split carved out of its training rows.

Used to choose the DB-VAE's settings (VAE weight, tempering, warm-up, ...) without ever looking at the test rows:
a seeded sample of PER_GROUP training faces of every race x gender group is relabelled ``split=dev``; tuning runs
train on ``--where split=train`` (the rest) and evaluate on ``--eval-where split=dev``. The final benchmark uses the
original manifest (train vs test) with the settings chosen here.

    python benchmarks/reweight_dev_manifest.py --out /tmp/utk-dev   # writes /tmp/utk-dev/manifest.csv

Paths in the copy are absolute, so the images are read from their original folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT = "/work/shared/data/utkface/manifest.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=DEFAULT)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--per-group", type=int, default=24, help="dev faces per race x gender group")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    src = Path(args.manifest).resolve()
    table = pd.read_csv(src)
    table["path"] = [os.path.join(src.parent, p) for p in table["path"]]
    rng = np.random.default_rng(args.seed)
    train = table.index[table["split"] == "train"]
    for _, rows in table.loc[train].groupby(["race", "gender"]).groups.items():
        dev = rng.permutation(np.asarray(rows))[: args.per_group]
        table.loc[dev, "split"] = "dev"
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "manifest.csv", index=False)
    print(table.groupby(["split", "race"]).size().unstack().to_string())


if __name__ == "__main__":
    main()
