"""The gate value of `auto` and `rarity` for stored runs: the ESS fraction of the biased first model's training
losses (`debias.training.sampling.first_epoch_concentration`); at most `--auto-gate` (0.35) means a shortcut.

    python benchmarks/first_model_gate.py --data SOURCE RUN [RUN ...]

Each RUN is a `train-classifier` run directory with a `stage1/` first model (the rows are split as the run split
them, by its seed). Used to check that a gate added after a run would have let it through (issue 12, session 11).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from debias.data import load_images  # noqa: E402
from debias.data.splits import validation_split  # noqa: E402
from debias.data.tensors import ImageTensor  # noqa: E402
from debias.training.classifier import cross_entropy_of, load_classifier, predict_proba  # noqa: E402
from debias.training.sampling import first_epoch_concentration  # noqa: E402
from debias.training.vae import encode_labels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="The runs' data source (their --data).")
    ap.add_argument("--where", action="append", default=["split=train"])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    for run in args.runs:
        model, ckpt = load_classifier(run / "stage1")
        meta = json.loads((run / "metrics.json").read_text())
        seed, val_fraction = meta["seed"], meta["config"]["val_fraction"]
        data = load_images(args.data, where=args.where, image_size=model.config.image_size, progress=False)
        y, _ = encode_labels(data.table[ckpt["meta"]["label"]])
        fit, _ = validation_split(y, val_fraction, seed)
        losses = cross_entropy_of(predict_proba(model, ImageTensor(data, fit)), y[fit])
        value = first_epoch_concentration(losses, y[fit])
        print(f"{run}: first-model epochs {len(ckpt['history'])}, gate value {value:.3f}")


if __name__ == "__main__":
    main()
