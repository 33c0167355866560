"""How much of the draws can a density alone give the cue-conflicting rows? (issue 12, the mission's mechanism)

For one cue protocol and one first model (the ``stage1/`` of a `rarity` or `cluster-errors` run), this computes the
sampling weights of several label-free, error-free density weightings of the training rows, and prints the share of
the draws each cue x gender group gets. Group-balanced sampling (the oracle) gives every group 25 %; the two
cue-conflicting groups together 50 %. No model is trained: the figures are shares of the weights themselves.

    python benchmarks/density_only_shares.py --protocol bench-out/debias/cues/tint \\
        --first-model bench-out/debias/tint/runs/rarity/seed0/stage1 [--vae RUN_DIR]

Weightings, each within every class (the label is read; no group column is):
- kNN inverse density in the first model's features (PCA 32), tempered to ESS 0.5 / 0.25 / 0.1 of the class;
- k-means cluster balancing (every cluster of the class drawn equally often), K = 2, 4, 8, 16;
- the same kNN weighting in the first model's logits;
- with ``--vae``: kNN inverse density in a separately trained beta-VAE's posterior means, and the paper's
  per-dimension histogram product there (whitened, ESS 0.25);
- for reference, the first model's errors alone (JTT's error set, an error signal).

With ``--k-grid`` (session 9): instead, the kNN weighting at k = 20, 100, 300 and 400 and at `rarity`'s default
(5 % of each class's rows), each at ESS 0.25 and 0.1, and the two-sided (typicality) variant at k = 20: a row
whose density is *higher* than usual for its class counts as rare too.

With ``--feature-grid`` (session 11): `rarity`'s own density (k = 5 % of the class, ESS 0.1) on transformed features:
whitened, standardised, log, per-feature quantiles among all rows, the local encoder's channel means or maxima alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from debias.data import load_images
from debias.data.splits import validation_split
from debias.data.tensors import ImageTensor
from debias.density.estimators import KNNDensity, LatentHistogramDensity
from debias.training.classifier import load_classifier, predict_proba
from debias.training.sampling import ClassRarity, encode_features, neighbours_for_class
from debias.training.vae import encode_labels


def shares(w: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    return (pd.Series(w / w.sum()).groupby(groups).sum()).to_dict()


def cluster_balanced(X: np.ndarray, y: np.ndarray, K: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    w = np.zeros(len(y))
    for k in np.unique(y):
        r = np.flatnonzero(y == k)
        lab = KMeans(K, n_init=3, random_state=0).fit_predict(PCA(32, random_state=0).fit_transform(X[r]))
        wk = 1.0 / np.bincount(lab, minlength=K)[lab]
        w[r] = wk / wk.sum() * len(r) / len(y)
    return w


class TwoSided:
    """A kNN density whose rarity is the distance of a row's log density from its class's median, either way (robust
    z): too dense counts as much as too sparse (the typicality view of Nalisnick et al. 2019)."""

    def __init__(self, k: int) -> None:
        self.density = KNNDensity(k, 32)

    def fit(self, X: np.ndarray) -> "TwoSided":
        fitted = self.density.fit(X).score_fitted()
        self.median_ = np.median(fitted)
        self.scale_ = 1.4826 * np.median(np.abs(fitted - self.median_)) + 1e-9
        return self

    def score_fitted(self) -> np.ndarray:
        return -np.abs(self.density.score_fitted() - self.median_) / self.scale_

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return -np.abs(self.density.score_samples(X) - self.median_) / self.scale_


def k_grid(feats: np.ndarray, yf: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {"uniform (ERM)": shares(np.ones(len(yf)), groups)}
    for k in (20, 100, 300, 400, None):
        for ess in (0.25, 0.1):
            name = f"kNN, k {k}" if k else "kNN, k = 5 % of the class (`rarity`'s default)"
            w = ClassRarity(lambda n_rows, k=k: KNNDensity(k or neighbours_for_class(n_rows), 32), target_ess=ess).fit(feats, yf)
            rows[f"{name}, ESS {ess}"] = shares(w.weights_, groups)
    w = ClassRarity(lambda n_rows: TwoSided(20), target_ess=0.25).fit(feats, yf).weights_
    rows["two-sided kNN (too dense is rare too), k 20, ESS 0.25"] = shares(w, groups)
    return rows


def feature_grid(feats: np.ndarray, yf: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """`rarity`'s own density (kNN, k = 5 % of the class, PCA 32, ESS 0.1) on transformed first-model features."""
    from sklearn.preprocessing import QuantileTransformer, StandardScaler

    half = feats.shape[1] // 2  # the local encoder's features: each channel's mean, then each channel's max
    variants = {
        "as is (`rarity --no-rarity-quantiles`)": (feats, False),
        "whitened principal axes": (feats, True),
        "each feature standardised": (StandardScaler().fit_transform(feats), False),
        "log(1 + feature)": (np.log1p(np.maximum(feats, 0)), False),
        "each feature's quantile among all rows (`rarity`'s default)": (
            QuantileTransformer(n_quantiles=200, random_state=0).fit_transform(feats), False),
        "channel means only": (feats[:, :half], False),
        "channel maxima only": (feats[:, half:], False),
    }
    rows: dict[str, dict[str, float]] = {"uniform (ERM)": shares(np.ones(len(yf)), groups)}
    for name, (X, whiten) in variants.items():
        w = ClassRarity(lambda n_rows, whiten=whiten: KNNDensity(neighbours_for_class(n_rows), 32, whiten=whiten),
                        target_ess=0.1).fit(X, yf).weights_
        rows[name] = shares(w, groups)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", type=Path, required=True, help="folder with the protocol's manifest.csv")
    ap.add_argument("--first-model", type=Path, required=True)
    ap.add_argument("--vae", type=Path, default=None, help="a `debias train` run on the protocol's training rows")
    ap.add_argument("--seed", type=int, default=0, help="the seed of the run (its validation split)")
    ap.add_argument("--k-grid", action="store_true", help="the neighbourhood-size screen of session 9 instead")
    ap.add_argument("--feature-grid", action="store_true",
                    help="`rarity`'s density on transformed features instead (session 11)")
    args = ap.parse_args()

    model, ckpt = load_classifier(args.first_model)
    size = model.config.image_size
    data = load_images(str(args.protocol / "manifest.csv"), where=["split=train"], image_size=size, progress=False)
    y, _ = encode_labels(data.table[ckpt["meta"]["label"]])
    fit, _ = validation_split(y, 0.1, args.seed)  # the rows the first model was trained on
    yf, groups = y[fit], data.table["group"].to_numpy()[fit]
    images = ImageTensor(data, fit)
    feats = encode_features(model, images.batch, len(fit))
    if args.k_grid:
        print_table(k_grid(feats, yf, groups))
        return
    if args.feature_grid:
        print_table(feature_grid(feats, yf, groups))
        return
    probs = predict_proba(model, images)
    rows: dict[str, dict[str, float]] = {"uniform (ERM)": shares(np.ones(len(fit)), groups)}
    for ess in (0.5, 0.25, 0.1):
        w = ClassRarity(lambda n_rows: KNNDensity(20, 32), target_ess=ess).fit(feats, yf).weights_
        rows[f"kNN in first-model features, ESS {ess}"] = shares(w, groups)
    for K in (2, 4, 8, 16):
        rows[f"k-means cluster balancing, K {K}"] = shares(cluster_balanced(feats, yf, K), groups)
    logits = np.log(np.clip(probs, 1e-12, 1.0))
    w = ClassRarity(lambda n_rows: KNNDensity(20, None), target_ess=0.25).fit(logits, yf).weights_
    rows["kNN in first-model log-probabilities, ESS 0.25"] = shares(w, groups)
    if args.vae:
        from debias.density.encoding import encode_images
        from debias.training.vae import load_model

        vae, _ = load_model(args.vae)
        mu = encode_images(vae, data, progress=False).mu[fit]
        w = ClassRarity(lambda n_rows: KNNDensity(20, None), target_ess=0.25).fit(mu, yf).weights_
        rows["kNN in a beta-VAE's latents, ESS 0.25"] = shares(w, groups)
        w = np.zeros(len(fit))
        for k in np.unique(yf):
            r = np.flatnonzero(yf == k)
            w[r] = LatentHistogramDensity(target_ess=0.25).fit(mu[r]).sampling_weights(mu[r]) * len(r) / len(fit)
        rows["histogram product (paper Eq. 3-4) in the beta-VAE's latents, ESS 0.25"] = shares(w, groups)
    errors = (probs.argmax(1) != yf).astype(float)
    rows["reference: the first model's errors (an error signal)"] = shares(errors, groups)

    print_table(rows)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    names = sorted(next(iter(rows.values())))
    print("| weighting | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, s in rows.items():
        print(f"| {label} | " + " | ".join(f"{100 * s.get(g, 0.0):.1f} %" for g in names) + " |")


if __name__ == "__main__":
    main()
