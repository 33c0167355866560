"""Issue 12, section 3: the table of benchmarks/augment_cue_protocols.sh.

For each protocol, the share of the ERM -> oracle worst-group gap that each augmented training set closes, with ERM
and with the default reweighting. ERM and the oracle are the runs of benchmarks/debias_protocols.sh on the original
data, paired by seed (same seed, same split, same validation carve-out).

    .venv/bin/python benchmarks/augment_cue_summary.py --out bench-out/augcue --baseline bench-out/debias
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def per_seed(comparison: dict, method: str, metric: str) -> dict[int, float]:
    m = comparison["methods"].get(method)
    if m is None:
        return {}
    return dict(zip(m["seeds"], m["metrics"][metric]["values"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/augcue"))
    ap.add_argument("--baseline", type=Path, default=Path("bench-out/debias"))
    args = ap.parse_args()

    rows = ["| protocol | training set | method | accuracy | worst group | gap closed | Δ gap vs original data, paired | seeds |",
            "|---|---|---|---|---|---|---|---|"]
    for proto_dir in sorted(p for p in args.out.iterdir() if p.is_dir()):
        base_file = args.baseline / proto_dir.name / "comparison.json"
        if not base_file.is_file():
            continue
        base = json.loads(base_file.read_text())
        erm = per_seed(base, "none", "worst_group_accuracy")
        oracle = per_seed(base, "oracle", "worst_group_accuracy")
        sets = [("original", base)] + [
            (name, json.loads((proto_dir / f"compare_{name}" / "comparison.json").read_text()))
            for name in ("gan", "cyclegan") if (proto_dir / f"compare_{name}" / "comparison.json").is_file()
        ]
        for set_name, comp in sets:
            for method in ("none", "cluster-errors"):
                worst = per_seed(comp, method, "worst_group_accuracy")
                acc = per_seed(comp, method, "accuracy")
                seeds = sorted(s for s in worst if s in erm and s in oracle)
                if set_name != "original":
                    seeds_used = seeds
                else:  # the original data's row over the same seeds as the augmented runs, for a paired reading
                    aug_seeds = {s for _, c in sets[1:] for s in per_seed(c, "none", "accuracy")}
                    seeds_used = [s for s in seeds if not aug_seeds or s in aug_seeds]
                if not seeds_used:
                    continue
                gaps = [(worst[s] - erm[s]) / (oracle[s] - erm[s]) for s in seeds_used]
                base_worst = per_seed(base, method, "worst_group_accuracy")
                delta = "–"
                if set_name != "original" and all(s in base_worst for s in seeds_used):
                    d = [(worst[s] - base_worst[s]) / (oracle[s] - erm[s]) for s in seeds_used]
                    delta = f"{np.mean(d):+.2f} ± {np.std(d):.2f}"
                a = np.array([acc[s] for s in seeds_used]) * 100
                w = np.array([worst[s] for s in seeds_used]) * 100
                rows.append(
                    f"| {proto_dir.name} | {set_name} | {method} | {a.mean():.1f} ± {a.std():.1f} | "
                    f"{w.mean():.1f} ± {w.std():.1f} | {np.mean(gaps):.2f} ± {np.std(gaps):.2f} | {delta} | "
                    f"{','.join(map(str, seeds_used))} |"
                )
    text = "\n".join(rows) + "\n"
    tmp = args.out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.out / "summary.md")
    print(text)


if __name__ == "__main__":
    main()
