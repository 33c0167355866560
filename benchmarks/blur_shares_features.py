"""Issue 12, blur: the share of the draws each weighting gives the cue-conflicting groups (no model trained on them).

    python benchmarks/blur_shares_features.py blur,natural 0   # first-model features, activation statistics, local error rates, 1/p(y|x), JTT

Reads the stored runs of benchmarks/debias_protocols.sh (bench-out/debias/). docs/benchmarks.md, "Session 7: blur".
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from debias.data import load_images
from debias.data.splits import validation_split
from debias.data.tensors import ImageTensor
from debias.training.classifier import load_classifier, predict_proba
from debias.training.sampling import (
    ClusterErrorWeights,
    encode_features,
    jtt_upweight_auto,
    jtt_weights,
)
from debias.training.vae import encode_labels


def conflict_share(w, groups, y_names):
    g = pd.Series(w / w.sum()).groupby(groups).sum()
    return g

def ess(w): w = w / w.sum(); return 1 / (w ** 2).sum() / len(w)

def local_err(X, y, err, k, dims=32):
    out = np.zeros(len(y))
    for c in np.unique(y):
        r = np.flatnonzero(y == c)
        Z = PCA(min(dims, X.shape[1]), random_state=0).fit_transform(X[r])
        nn = NearestNeighbors(n_neighbors=k + 1).fit(Z)
        d, idx = nn.kneighbors(Z)
        out[r] = err[r][idx].mean(1)
    return out

def per_class_norm(w, y):
    w = w.astype(float).copy()
    for c in np.unique(y):
        r = y == c; w[r] = w[r] / w[r].sum() * r.mean()
    return w

cache = {}
def setup(proto, seed, method="cluster-errors"):
    model, ckpt = load_classifier(Path(f"bench-out/debias/{proto}/runs/{method}/seed{seed}/stage1"))
    data = load_images(f"bench-out/debias/cues/{proto}/manifest.csv", where=["split=train"], image_size=32, progress=False)
    y, _ = encode_labels(data.table["gender"])
    fit, _ = validation_split(y, 0.1, seed)
    col = "race" if proto == "natural" else "group"
    groups = (data.table[col].astype(str) + " " + data.table["gender"].astype(str)).to_numpy()[fit] if proto == "natural" else data.table["group"].to_numpy()[fit]
    images = ImageTensor(data, fit)
    feats = encode_features(model, images.batch, len(fit))
    probs = predict_proba(model, images)
    yf = y[fit]
    err = (probs.argmax(1) != yf).astype(float)
    import torch

    from debias.training.sampling import _encode_rows
    def style(x):
        sz = model.config.internal_size
        if x.shape[-1] != sz:
            x = torch.nn.functional.interpolate(x, size=(sz, sz), mode="bilinear", align_corners=False)
        outs = []
        for layer in model.encoder:
            x = layer(x)
            if isinstance(layer, torch.nn.SiLU):
                outs += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(outs, 1)
    st = _encode_rows(model, images.batch, len(fit), 512, style)
    st = (st - st.mean(0)) / (st.std(0) + 1e-6)
    return feats, yf, err, groups, probs, st

protos = sys.argv[1].split(",")
seeds = [int(s) for s in sys.argv[2].split(",")]
for proto in protos:
    for seed in seeds:
        X0, y, err, groups, probs, ST = setup(proto, seed)
        rows = {}
        # f: the first model's features; s: per-block activation statistics (mean, std of every block's channels)
        for X, tagx in ((X0, "f"), (ST, "s")):
            for K in (8, 16, 32):
                rows[f"{tagx} ce K{K}"] = ClusterErrorWeights(K, 32, seed=seed).fit(X, y, err.astype(bool)).weights_
            for k in (10, 30):
                le = local_err(X, y, err, k)
                for p in (1, 4):  # half the class's draws as in the data, half by the local error rate ** p
                    lp = le ** p + 1e-12
                    w = np.zeros(len(y))
                    for c in np.unique(y):
                        r = y == c
                        w[r] = 0.5 / r.sum() + 0.5 * lp[r] / lp[r].sum()
                    rows[f"{tagx} loc k{k} p{p}"] = w
        py = probs[np.arange(len(y)), y]
        print("mean p_y of errors by group", pd.Series(py[err > 0]).groupby(groups[err > 0]).mean().round(3).to_dict())
        print("quantiles of p_y among errors", np.quantile(py[err > 0], [0.1, 0.25, 0.5, 0.75, 0.9]).round(3))
        for a in (0.5, 1.0, 2.0):
            for clip in (0.01, 0.05):
                rows[f"ipw a{a} c{clip}"] = np.clip(py, clip, 1) ** -a
        for tau in (0.1, 0.2, 0.3):
            e = (py < tau).astype(float)
            rows[f"conf-err<{tau} jtt"] = jtt_weights(e.astype(bool), jtt_upweight_auto(e.astype(bool)))
        rows["uniform"] = np.ones(len(y))
        rows["jtt"] = jtt_weights(err.astype(bool), jtt_upweight_auto(err.astype(bool)))
        print("error rate by group", pd.Series(err).groupby(groups).mean().round(3).to_dict())
        print(f"== {proto} seed {seed}: err rate {err.mean():.3f}; group sizes", pd.Series(groups).value_counts().to_dict())
        for name, w in rows.items():
            w = per_class_norm(w, y)
            s = pd.Series(w / w.sum()).groupby(groups).sum()
            print(f"{name:14s} ess {ess(w):.2f} | " + " ".join(f"{g}:{100*v:.1f}" for g, v in s.items()))
