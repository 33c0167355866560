"""Which training rows does a first model get wrong, per group? (issue 12, session 10)

The first model of `auto` and `lff` is meant to learn the shortcut and nothing else, so that its failures are the
rows without it. This prints, for stored runs, each group's share of rows the first model (``RUN/stage1``) gets wrong,
on the rows it was trained on (the run's seed decides which rows were held out for validation).

    python benchmarks/first_model_errors.py PROTOCOL_MANIFEST RUN_DIR [RUN_DIR ...]

e.g. the full-image first model of session 8 against the local one of session 10 on blur, seed 0:

    python benchmarks/first_model_errors.py bench-out/debias/cues/blur/manifest.csv \\
        bench-out/debias/blur/runs/auto/seed0 bench-out/debias-s10/blur/runs/auto/seed0

With ``--rarity``, also what `rarity` sees in each first model's features: within each class, how well the kNN
rarity (k = 5 % of the class, as `rarity`) ranks the class's smallest group above its other rows (AUROC), and that
group's share of the class's rarest 5 % and 1 % of rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from debias.data import load_images
from debias.data.splits import validation_split
from debias.data.tensors import ImageTensor
from debias.density.estimators import KNNDensity
from debias.training.classifier import load_classifier, predict_proba
from debias.training.sampling import encode_features, neighbours_for_class
from debias.training.vae import encode_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="the protocol's manifest.csv (or a builtin: source)")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories with a stage1/ first model")
    ap.add_argument("--groups", default="group", help="the column(s), comma-separated, whose values make the groups")
    ap.add_argument("--rarity", action="store_true", help="also the kNN rarity of the smallest group in each class")
    args = ap.parse_args()
    rows = {}
    for run in args.runs:
        model, ckpt = load_classifier(run / "stage1")
        seed = json.loads((run / "metrics.json").read_text())["seed"]
        data = load_images(args.data, where=["split=train"], image_size=model.config.image_size, progress=False)
        y, _ = encode_labels(data.table[ckpt["meta"]["label"]])
        fit, _ = validation_split(y, 0.1, seed)
        wrong = predict_proba(model, ImageTensor(data, fit)).argmax(1) != y[fit]
        groups = data.table[args.groups.split(",")].astype(str).agg(" x ".join, axis=1).to_numpy()[fit]
        rows[f"{run} ({model.config.encoder})"] = pd.Series(wrong).groupby(groups).mean()
        if args.rarity:
            print_rarity(f"{run} ({model.config.encoder})", encode_features(model, ImageTensor(data, fit).batch, len(fit)),
                         y[fit], groups)
    table = pd.DataFrame(rows).T
    print("| first model | " + " | ".join(table.columns) + " |")
    print("|---|" + "---|" * len(table.columns))
    for name, r in table.iterrows():
        print(f"| {name} | " + " | ".join(f"{100 * v:.0f} %" for v in r) + " |")


def print_rarity(name: str, feats: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
    from sklearn.metrics import roc_auc_score

    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        smallest = pd.Series(groups[rows]).value_counts().index[-1]
        rarity = -KNNDensity(neighbours_for_class(len(rows)), 32).fit(feats[rows]).score_fitted()
        is_small = groups[rows] == smallest
        ranked = is_small[np.argsort(-rarity)]
        top = {q: ranked[: max(1, int(q * len(rows)))].mean() for q in (0.05, 0.01)}
        print(f"{name}: {smallest}: rarity AUROC {roc_auc_score(is_small, rarity):.3f} within its class; "
              f"{100 * top[0.05]:.0f} % of the rarest 5 %, {100 * top[0.01]:.0f} % of the rarest 1 %")


if __name__ == "__main__":
    main()
