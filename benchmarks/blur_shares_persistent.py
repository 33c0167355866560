"""Issue 12, blur: the share of the draws each weighting gives the cue-conflicting groups (no model trained on them).

    python benchmarks/blur_shares_persistent.py blur,natural 6   # per-epoch errors of a 6-epoch first model

Reads the stored runs of benchmarks/debias_protocols.sh (bench-out/debias/). docs/benchmarks.md, "Session 7: blur".
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from debias.data import load_images
from debias.data.splits import validation_split
from debias.data.tensors import ImageTensor
from debias.training.vae.classifier import (
    ClassifierTrainConfig,
    predict_proba,
    train_classifier,
)
from debias.training.vae.sampling import (
    ClusterErrorWeights,
    Uniform,
    encode_features,
    jtt_upweight_auto,
    jtt_weights,
)
from debias.training.vae.vae import encode_labels, vae_config


class Recorder(Uniform):
    def __init__(self, n, images, y):
        super().__init__(n); self.images, self.y, self.errs = images, y, []
    def weights(self, epoch, model):
        if epoch > 0:
            self.errs.append(predict_proba(model, self.images).argmax(1) != self.y)
        return super().weights(epoch, model)

def ess(w): w = w / w.sum(); return 1 / (w ** 2).sum() / len(w)
for proto in sys.argv[1].split(","):
    seed = 0
    data = load_images(f"bench-out/debias/cues/{proto}/manifest.csv", where=["split=train"], image_size=32, progress=False)
    y, classes = encode_labels(data.table["gender"])
    fit, _ = validation_split(y, 0.1, seed)
    yf = y[fit]
    col = "race" if proto == "natural" else "group"
    groups = (data.table["race"] + " " + data.table["gender"]).to_numpy()[fit] if proto == "natural" else data.table["group"].to_numpy()[fit]
    imgs = ImageTensor(data, fit)
    cfg = vae_config(image_size=32, channels=3, latent_dim=32, beta=1.0, width=16, n_classes=2, classes=classes, vae_class=None)
    rec = Recorder(len(fit), imgs, yf)
    E = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    first = train_classifier(cfg, ClassifierTrainConfig(epochs=E, seed=seed, select="last"), imgs, yf, rec,
                             Path(f"/tmp/persist/{proto}"), meta={"x": 1}, progress=False)
    rec.errs.append(predict_proba(first.model, imgs).argmax(1) != yf)
    errs = np.array(rec.errs)  # (E, n)
    print(f"== {proto}: error rate by group and epoch")
    print(pd.DataFrame({f"e{k+1}": pd.Series(errs[k]).groupby(groups).mean() for k in range(len(errs))}).round(3).to_string())
    feats = encode_features(first.model, imgs.batch, len(fit))
    for name, sel in {"last": errs[-1], "all epochs": errs.all(0), "epochs 2+": errs[1:].all(0), "freq>=0.5": errs.mean(0) >= 0.5, "freq": errs.mean(0)}.items():
        e = np.asarray(sel, float)
        rows = {}
        if name != "freq":
            rows["jtt"] = jtt_weights(e.astype(bool), jtt_upweight_auto(e.astype(bool)))
            rows["cluster-errors"] = ClusterErrorWeights(8, 32, seed=seed).fit(feats, yf, e.astype(bool)).weights_
        for nm, w in rows.items():
            w2 = np.zeros(len(w))
            for c in np.unique(yf):
                r = yf == c; w2[r] = w[r] / w[r].sum() * r.mean()
            s = pd.Series(w2).groupby(groups).sum()
            print(f"{name:11s} {nm:15s} ess {ess(w2):.2f} | " + " ".join(f"{g}:{100*v:.1f}" for g, v in s.items()))
