"""Issue 12: every label-free method measured on blur against what it costs on natural UTKFace, as one chart.

    python benchmarks/debias_frontier.py --out docs/debias_frontier.png \
        [--attempts bench-out/error_signal_attempts/*.jsonl] [--persistent bench-out/persistent_errors.jsonl]

x: the share of the ERM -> oracle worst-group gap closed on the blur protocol (mean over seeds, paired by seed);
y: accuracy on natural UTKFace minus ERM's (mean over the same seeds, paired). The issue's targets are the corner
x >= 0.70, y >= -1. The stored runs of benchmarks/debias_protocols.sh give the methods of `debias compare`; the JSON
lines of benchmarks/error_signal_attempts.py (and persistent_errors.py, when given) add the attempts. Error bars: the
standard deviation over seeds (n - 1). A method is plotted only where both protocols have the same seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from debias.runtime.checkpoint import atomic_savefig  # noqa: E402

RUNS = Path("bench-out/debias")
STORED = ("auto", "cluster-errors", "lff", "jtt", "rarity")


def stored_rows() -> pd.DataFrame:
    rows = []
    for proto in ("blur", "natural"):
        for method_dir in (RUNS / proto / "runs").iterdir():
            for seed_dir in method_dir.glob("seed*"):
                m = json.loads((seed_dir / "metrics.json").read_text())
                rows.append({"protocol": proto, "variant": method_dir.name, "seed": int(seed_dir.name[4:]),
                             "accuracy": m["accuracy"], "worst": m["worst_group_accuracy"]})
    return pd.DataFrame(rows)


def points(stored: pd.DataFrame, attempts: pd.DataFrame) -> pd.DataFrame:
    """Per variant: mean and std over seeds of the blur gap closed and the natural accuracy change."""
    ref = stored[stored.variant.isin(["none", "oracle"])].pivot_table(index=["protocol", "seed"], columns="variant",
                                                                       values=["accuracy", "worst"])
    both = pd.concat([stored[stored.variant.isin(STORED)], attempts], ignore_index=True)
    out = []
    for variant, g in both.groupby("variant", sort=False):
        blur = g[g.protocol == "blur"].set_index("seed")
        natural = g[g.protocol == "natural"].set_index("seed")
        seeds = sorted(set(blur.index) & set(natural.index))
        if not seeds:
            continue
        gap = [(blur.worst[s] - ref.loc[("blur", s), ("worst", "none")])
               / (ref.loc[("blur", s), ("worst", "oracle")] - ref.loc[("blur", s), ("worst", "none")]) for s in seeds]
        dacc = [100 * (natural.accuracy[s] - ref.loc[("natural", s), ("accuracy", "none")]) for s in seeds]
        out.append({"variant": variant, "seeds": len(seeds), "blur_gap": np.mean(gap), "blur_gap_sd": np.std(gap, ddof=1),
                    "natural_dacc": np.mean(dacc), "natural_dacc_sd": np.std(dacc, ddof=1)})
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/debias_frontier.png"))
    ap.add_argument("--attempts", nargs="*", type=Path, default=[])
    args = ap.parse_args()
    lines = [json.loads(line) for path in args.attempts for line in path.read_text().splitlines() if line.strip()]
    attempts = pd.DataFrame(lines, columns=["protocol", "variant", "seed", "accuracy", "worst"]) if lines else \
        pd.DataFrame(columns=["protocol", "variant", "seed", "accuracy", "worst"])
    table = points(stored_rows(), attempts[["protocol", "variant", "seed", "accuracy", "worst"]])
    print("| method | seeds | blur: gap closed | natural: accuracy - ERM's (points) |\n|---|---|---|---|")
    for _, r in table.iterrows():
        print(f"| {r.variant} | {r.seeds} | {r.blur_gap:.2f} ± {r.blur_gap_sd:.2f} | {r.natural_dacc:+.1f} ± {r.natural_dacc_sd:.1f} |")
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.fill_between([0.7, 1.1], -1, 2, color="tab:green", alpha=0.12, label="issue 12 target")
    for _, r in table.iterrows():
        ax.errorbar(r.blur_gap, r.natural_dacc, xerr=r.blur_gap_sd, yerr=r.natural_dacc_sd, fmt="o", capsize=3)
        ax.annotate(f"{r.variant} ({r.seeds})", (r.blur_gap, r.natural_dacc), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("blur: share of the ERM -> oracle worst-group gap closed")
    ax.set_ylabel("natural UTKFace: accuracy - ERM's (points)")
    ax.set_title("Label-free debiasing: the blur cue against natural data (mean ± sd over seeds)")
    ax.set_xlim(min(-0.3, table.blur_gap.min() - 0.1), 1.1)
    ax.set_ylim(min(-9, table.natural_dacc.min() - 1), 2)
    ax.legend(loc="lower left", fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, args.out, dpi=120)
    print(f"chart: {args.out}")


if __name__ == "__main__":
    main()
