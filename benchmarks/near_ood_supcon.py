"""Issue 16: the contrastive encoder trained with the class labels (SupCon) against label-free (SimCLR), read by
kNN alone, on the Fashion-MNIST held-out-class cases of near_ood.py (the same training images, split and test sets).

    python benchmarks/near_ood_supcon.py --out bench-out/nearood-supcon --cases fmnist-2,fmnist-4 --losses supcon,simclr

Per case and loss: the encoder at `debias train`'s defaults on the case's 18,000 training images, its features of
the fit part (80 %, the split `debias score` makes) as the references, and the AUROC of the log mean distance to the
5 nearest references (`embedding_knn`) at the "avg" and "max" readouts, held-out class = positive.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from near_ood import case_data  # noqa: E402

from debias.data.splits import DEFAULT_CALIBRATION_FRACTION, calibration_split  # noqa: E402
from debias.density.detector import embed_images  # noqa: E402
from debias.models.contrastive import ContrastiveConfig  # noqa: E402
from debias.training.contrastive import (  # noqa: E402
    ContrastiveTrainConfig,
    load_encoder,
    train_contrastive,
)


def knn_log_distance(ref: np.ndarray, q: np.ndarray, k: int = 5) -> np.ndarray:
    d2 = (q * q).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2 * q @ ref.T
    part = np.sqrt(np.clip(np.partition(d2, k - 1, axis=1)[:, :k], 0, None))
    return np.log(part.mean(1) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-out/nearood-supcon"))
    ap.add_argument("--cases", default=",".join(f"fmnist-{k}" for k in range(10)))
    ap.add_argument("--losses", default="supcon,simclr")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for case in args.cases.split(","):
        train, inn, ood, opts = case_data(case)
        fit_rows, _ = calibration_split(len(train), DEFAULT_CALIBRATION_FRACTION, 0)
        raw = train.table["label"].astype(int).to_numpy()
        labels = np.unique(raw, return_inverse=True)[1]
        for loss in args.losses.split(","):
            key = f"{case}/{loss}"
            if key in results:
                print(key, results[key], flush=True)
                continue
            t0 = time.perf_counter()
            run = args.out / "models" / case / loss
            cfg = ContrastiveConfig(image_size=opts["image_size"], channels=train.channels)
            path = train_contrastive(train, cfg, ContrastiveTrainConfig(device="cpu"), run,
                                     data_desc={"fingerprint": train.fingerprint, "loss": loss},
                                     labels=labels if loss == "supcon" else None,
                                     resume=(run / "checkpoint.pt").exists(), progress=False)
            encoder, _ = load_encoder(path, "cpu")
            row = {"train_s": round(time.perf_counter() - t0, 1)}
            for readout in ("avg", "max"):
                ref = embed_images(encoder, train.subset(fit_rows), 512, readout)
                s_in, s_ood = (knn_log_distance(ref, embed_images(encoder, d, 512, readout)) for d in (inn, ood))
                y = np.r_[np.zeros(len(s_in)), np.ones(len(s_ood))]
                row[readout] = round(float(roc_auc_score(y, np.r_[s_in, s_ood])), 4)
            results[key] = row
            args.out.mkdir(parents=True, exist_ok=True)
            tmp = results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(results_path)
            print(key, row, flush=True)


if __name__ == "__main__":
    main()
