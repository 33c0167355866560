"""Where a trained DB-VAE's sampling weights go: the share of the draws each group gets, next to its share of rows.

Analysis only, after training: it encodes the training rows with a finished run's classifier.pt, refits the latent
histograms with the run's own density options and sums the weights per group. Groups never reach training.

    python benchmarks/reweight_weight_shares.py RUN_DIR --group race [--group gender]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from debias.data import load_images
from debias.data.tensors import ImageTensor
from debias.density.estimators import LatentHistogramDensity
from debias.training.classifier import load_classifier
from debias.training.sampling import encode_latents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--group", action="append", required=True)
    args = ap.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    cfg = metrics["config"]
    model, _ = load_classifier(args.run)
    data = load_images(cfg["data"], where=cfg["where"], image_size=cfg["image_size"], progress=False)
    # the run's training rows are not stored; all rows of --where are close enough for shares (90 % are them)
    z = encode_latents(model, ImageTensor(data).batch, len(data))
    density = cfg["method_options"].get("density", {})
    w = LatentHistogramDensity(**density).fit(z).sampling_weights(z)
    for col in args.group:
        tbl = pd.DataFrame({"g": data.table[col].astype(str), "w": w})
        out = tbl.groupby("g").agg(rows=("w", "size"), draw_share=("w", "sum"))
        out["row_share"] = out["rows"] / len(tbl)
        out["ratio"] = out["draw_share"] / out["row_share"]
        print(out.round(4).to_string(), "\n")


if __name__ == "__main__":
    main()
