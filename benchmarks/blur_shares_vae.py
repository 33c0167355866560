"""Issue 12, blur: the share of the draws each weighting gives the cue-conflicting groups (no model trained on them).

    python benchmarks/blur_shares_vae.py blur   # a beta-VAE's latents and reconstruction error (bench-out/augcue/blur/vae)

Reads the stored runs of benchmarks/debias_protocols.sh (bench-out/debias/). docs/benchmarks.md, "Session 7: blur".
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from debias.data import load_images
from debias.data.splits import validation_split
from debias.data.tensors import ImageTensor
from debias.density.encoding import encode_images
from debias.density.estimators import KNNDensity
from debias.training.classifier import load_classifier, predict_proba
from debias.training.sampling import ClassRarity, ClusterErrorWeights
from debias.training.vae import encode_labels, load_model


def ess(w): w = w / w.sum(); return 1 / (w ** 2).sum() / len(w)
def per_class_norm(w, y):
    w = w.astype(float).copy()
    for c in np.unique(y):
        r = y == c; w[r] = w[r] / w[r].sum() * r.mean()
    return w
def cluster_bal(X, y, K):
    w = np.zeros(len(y))
    for c in np.unique(y):
        r = np.flatnonzero(y == c)
        lab = KMeans(K, n_init=3, random_state=0).fit_predict(X[r])
        w[r] = 1.0 / np.bincount(lab, minlength=K)[lab]
    return w

for proto in sys.argv[1].split(","):
    seed = 0
    data = load_images(f"bench-out/debias/cues/{proto}/manifest.csv", where=["split=train"], image_size=32, progress=False)
    y, _ = encode_labels(data.table["gender"])
    fit, _ = validation_split(y, 0.1, seed)
    groups = data.table["group"].to_numpy()[fit]
    vae, _ = load_model(Path(f"bench-out/augcue/{proto}/vae"))
    enc = encode_images(vae, data, progress=False)
    mu, lr = enc.mu[fit], np.log(enc.recon_error[fit])
    yf = y[fit]
    print("mean log recon by group", pd.Series(lr).groupby(groups).mean().round(3).to_dict())
    model, _ = load_classifier(Path(f"bench-out/debias/{proto}/runs/cluster-errors/seed{seed}/stage1"))
    probs = predict_proba(model, ImageTensor(data, fit))
    err = probs.argmax(1) != yf
    mz = (mu - mu.mean(0)) / mu.std(0)
    zr = (lr - np.median(lr)) / (1.4826 * np.median(np.abs(lr - np.median(lr))))
    spaces = {"mu": mu, "mu+r": np.hstack([mu, zr[:, None]]), "mu+3r": np.hstack([mu, 3 * zr[:, None]]), "r": zr[:, None]}
    rows = {"uniform": np.ones(len(yf))}
    for name, X in spaces.items():
        for e in (0.25, 0.1):
            rows[f"knn {name} ess{e}"] = ClassRarity(lambda n_rows: KNNDensity(20, None), target_ess=e).fit(X, yf).weights_
        for K in (2, 4, 8):
            rows[f"kbal {name} K{K}"] = cluster_bal(X, yf, K)
        for K in (8, 16):
            rows[f"ce {name} K{K}"] = ClusterErrorWeights(K, 32, seed=seed).fit(X, yf, err).weights_
    print(f"== {proto}", pd.Series(groups).value_counts().to_dict())
    for name, w in rows.items():
        w = per_class_norm(w, yf)
        s = pd.Series(w / w.sum()).groupby(groups).sum()
        print(f"{name:18s} ess {ess(w):.2f} | " + " ".join(f"{g}:{100*v:.1f}" for g, v in s.items()))
