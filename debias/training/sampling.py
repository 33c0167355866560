"""Where each epoch's training batches come from: uniform (ERM), fixed weights (an audit, JTT) or the DB-VAE's
adaptive weights, refitted from the model's own latents at the start of every epoch (Amini et al., AIES 2019,
Algorithm 1).

Every scheme answers one question per epoch, ``weights(epoch, model)``: ``None`` for a uniform pass over the data
(each row once, shuffled), or sampling probabilities that sum to 1, from which the epoch's n rows are drawn with
replacement. Only labels and images reach this module; group columns never do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from debias.density.estimators import LatentHistogramDensity, effective_sample_size
from debias.errors import DebiasError
from debias.models import ConvVAE
from debias.runtime.device import CLASSIFIER_BF16_WHEN_AUTO, autocast

BatchFn = Callable[[np.ndarray], torch.Tensor]  # row indices -> float (B, C, H, W) in [0, 1]


class Scheme(Protocol):
    name: str

    def weights(self, epoch: int, model: ConvVAE) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Sampling probabilities for this epoch (None = uniform) and what to log about them."""
        ...


def draw_epoch(weights: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """The row indices of one epoch: a permutation, or n draws ∝ ``weights`` in random order.

    The weighted draws are systematic (one uniform offset, n evenly spaced points on the cumulative weights): row i
    is drawn floor(n p_i) or ceil(n p_i) times, never 0 times when n p_i >= 1. Independent draws with replacement
    leave about a third of the rows out of every epoch even at near-uniform weights (measured on natural UTKFace:
    2-3 points of accuracy over 8 epochs); with uniform weights the systematic draw is exactly a permutation."""
    if weights is None:
        return rng.permutation(n)
    p = np.asarray(weights, dtype=np.float64)
    cum = np.cumsum(p / p.sum())
    cum[-1] = 1.0
    points = (rng.random() + np.arange(n)) / n
    rows = np.minimum(np.searchsorted(cum, points, side="right"), len(p) - 1)
    return rng.permutation(rows)


def _info(weights: np.ndarray | None, n: int) -> dict[str, Any]:
    ess = float(n) if weights is None else effective_sample_size(weights)
    return {"ess": ess, "ess_fraction": ess / n if n else 0.0}


class Uniform:
    """ERM: every training row once per epoch, in a fresh random order."""

    name = "none"

    def __init__(self, n: int) -> None:
        self.n = n

    def weights(self, epoch: int, model: ConvVAE) -> tuple[None, dict[str, Any]]:
        return None, _info(None, self.n)


class Fixed:
    """The same probabilities every epoch (a WeightedRandomSampler): audit weights (two-stage) or JTT's upweighting."""

    def __init__(self, name: str, weights: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise DebiasError(f"{name}: sampling weights must be finite, non-negative and not all zero")
        self.name = name
        self.p = w / w.sum()

    def weights(self, epoch: int, model: ConvVAE) -> tuple[np.ndarray, dict[str, Any]]:
        return self.p, _info(self.p, len(self.p))


def jtt_upweight_auto(misclassified: np.ndarray, cap: float = 100.0) -> float:
    """A label-free lambda_up: (1 - e) / e for an error rate e, so that the error set and the other rows are drawn
    equally often. JTT's paper tunes lambda_up on worst-group validation accuracy, which needs group labels this
    project does not use; a fixed lambda_up fails when the first model is weak (lambda_up = 20 with e = 0.35 gives
    the error set 90 % of the draws and the second model learns to get the easy rows wrong)."""
    e = float(np.mean(misclassified))
    if e <= 0.0:
        return 1.0
    return float(np.clip((1.0 - e) / e, 1.0, cap))


def jtt_weights(misclassified: np.ndarray, upweight: float) -> np.ndarray:
    """Just Train Twice (Liu et al., ICML 2021, Algorithm 1 step 2): the error set of the first model is upsampled
    ``upweight`` (lambda_up) times, every other row kept once; returned as probabilities."""
    err = np.asarray(misclassified, dtype=bool)
    w = np.where(err, float(upweight), 1.0)
    return w / w.sum()


def read_scores(scores_path: str | Path, column: str = "weight") -> pd.DataFrame:
    """An audit's scores file (``--weights``: Parquet or CSV) with its ``path`` and ``column`` columns checked."""
    p = Path(scores_path)
    if not p.is_file():
        raise DebiasError(f"--weights: no such file {p} (expected scores.parquet or scores.csv from 'debias audit')")
    try:
        scores = pd.read_parquet(p) if p.suffix.lower() in (".parquet", ".pq") else pd.read_csv(p)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many kinds
        raise DebiasError(f"--weights: cannot read {p}: {type(exc).__name__}") from None
    for col in ("path", column):
        if col not in scores.columns:
            raise DebiasError(f"--weights: {p} has no {col!r} column")
    return scores


def audit_weights(scores_path: str | Path, paths: pd.Series, column: str = "weight") -> np.ndarray:
    """Sampling probabilities for the training rows from an audit's scores file (joined on ``path``)."""
    p = Path(scores_path)
    scores = read_scores(p, column).drop_duplicates("path")
    lookup = pd.Series(scores[column].to_numpy(dtype=np.float64), index=scores["path"].astype(str).to_numpy())
    keys = paths.astype(str)
    missing = ~keys.isin(lookup.index)
    if missing.any():
        raise DebiasError(
            f"--weights: {int(missing.sum())} of {len(keys)} training rows have no weight in {p} "
            f"(first: {keys[missing].iloc[0]}); audit the same rows you train on"
        )
    w = lookup.loc[keys.to_numpy()].to_numpy()
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DebiasError(f"--weights: the {column!r} column of {p} must be finite, non-negative and not all zero")
    return w / w.sum()


def encode_latents(model: ConvVAE, batch: BatchFn, n: int, batch_size: int = 512) -> np.ndarray:
    """Posterior means of n rows. Encoder and head only (the decoder is not run), eval mode, large batches: this is
    what keeps the per-epoch re-encoding of Algorithm 1 cheap next to a training epoch."""
    return _encode_rows(model, batch, n, batch_size, lambda x: model.encode(x)[0]).astype(np.float64)


def encode_features(model: ConvVAE, batch: BatchFn, n: int, batch_size: int = 512) -> np.ndarray:
    """The encoder's last hidden features (the input of the head: what the classifier reads), float32 (n, F)."""
    return _encode_rows(model, batch, n, batch_size, model.features)


@torch.inference_mode()
def _encode_rows(
    model: ConvVAE, batch: BatchFn, n: int, batch_size: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> np.ndarray:
    """``fn`` of n rows, in eval mode and batches of ``batch_size``, as float32 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        with autocast(device, bf16_when_auto=CLASSIFIER_BF16_WHEN_AUTO):  # part of classifier training
            out.append(fn(batch(idx).to(device, non_blocking=True)).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 1), dtype=np.float32)


class DBVAEAdaptive:
    """Algorithm 1 of Amini et al.: at the start of each epoch encode the training rows with the current DB-VAE,
    fit the per-dimension latent histograms (Eq. 3) and sample rows ∝ prod_i 1 / (Q_i(z_i) + alpha) (Eq. 4), tempered
    as set in ``density`` (see :class:`LatentHistogramDensity`).

    ``warmup_epochs``: epochs of uniform sampling first, while the latent space is still untrained noise.
    ``labels`` (optional, per-class mode): fit one density per class and keep every class's share of the draws as in
    the data, so that the resampling changes which faces are seen, not how often each label is.
    """

    name = "dbvae"

    def __init__(
        self,
        batch: BatchFn,
        n: int,
        density: Callable[[], LatentHistogramDensity],
        *,
        warmup_epochs: int = 0,
        labels: np.ndarray | None = None,
        encode_batch_size: int = 512,
    ) -> None:
        self.batch, self.n, self.density = batch, n, density
        self.warmup_epochs = warmup_epochs
        self.labels = labels
        self.encode_batch_size = encode_batch_size

    def weights(self, epoch: int, model: ConvVAE) -> tuple[np.ndarray | None, dict[str, Any]]:
        if epoch < self.warmup_epochs:
            return None, {**_info(None, self.n), "encode_s": 0.0, "fit_s": 0.0}
        t0 = time.perf_counter()
        z = encode_latents(model, self.batch, self.n, self.encode_batch_size)
        t1 = time.perf_counter()
        info: dict[str, Any] = {}
        if self.labels is None:
            est = self.density().fit(z)
            w = est.sampling_weights(z)
            info["temperature"] = est.temperature_
        else:
            w = np.zeros(self.n)
            temps = []
            for k in np.unique(self.labels):
                rows = np.flatnonzero(self.labels == k)
                est = self.density().fit(z[rows])
                w[rows] = est.sampling_weights(z[rows]) * (len(rows) / self.n)  # keep the class's share
                temps.append(est.temperature_)
            info["temperature"] = float(np.mean(temps))
        t2 = time.perf_counter()
        return w, {**_info(w, self.n), **info, "encode_s": t1 - t0, "fit_s": t2 - t1}


#: rarity's default kNN bandwidth, as a share of the class: groups up to about this share of their class read as sparse
NEIGHBOURS_SHARE = 0.05


def neighbours_for_class(n_rows: int, share: float = NEIGHBOURS_SHARE, minimum: int = 20) -> int:
    """k of the kNN density within a class of ``n_rows``: ``share`` of its rows, at least ``minimum``.

    Inverse density equalises volume, not groups: with a small k, a cue-conflicting group of a few hundred rows is its
    own dense neighbourhood and keeps its small share of the draws (issue 12, "Why sampling by density alone falls
    short"). Once k reaches the group's size, the k-th neighbours of its rows lie in the majority of the class, far
    away, and the whole group reads as sparse. Groups up to about 5 % of their class are seen this way; a larger
    group stays its own neighbourhood (set k by hand then)."""
    return max(1, min(max(minimum, int(round(share * n_rows))), n_rows - 1))


class ClassRarity:
    """Inverse-density sampling weights within each class: w_i ∝ p(x_i | y_i)^-T, tempered per class to an effective
    sample size of ``target_ess`` × the class's rows, every class keeping its share of the draws.

    The density is fitted per class because a shortcut is rare only jointly with the label: a warm-tinted male face
    is common in the data as a whole (most female faces are warm) and rare among the male faces. With one density
    over all classes it looks typical (issue 12, cause 2). The label is the training label; no group column is read.

    ``density``: a factory called as ``density(n_rows=...)`` with the class's number of rows (so that a bandwidth can
    scale with the class; a keyword, so that a factory that does not expect it fails loudly instead of taking it as
    its first parameter) that returns an estimator with ``fit``, ``score_fitted`` (the fitted rows, leave-one-out)
    and ``score_samples`` (new rows), e.g. ``lambda n_rows: KNNDensity(neighbours_for_class(n_rows))``
    (:class:`debias.density.estimators.KNNDensity`).
    """

    def __init__(self, density: Callable[[int], Any], target_ess: float = 0.25) -> None:
        if not 0 < target_ess <= 1:
            raise DebiasError(f"target ESS must be in (0, 1], got {target_ess}")
        self.density = density
        self.target_ess = target_ess

    def fit(self, X: np.ndarray, y: np.ndarray) -> "ClassRarity":
        from debias.density.estimators import temperature_for_ess

        y = np.asarray(y)
        self.classes_ = np.unique(y)
        self.estimators_, self.temperatures_, self.shares_ = {}, {}, {}
        self.rarity_ = np.zeros(len(y))
        for k in self.classes_:
            rows = np.flatnonzero(y == k)
            est = self.density(n_rows=len(rows)).fit(X[rows])
            rarity = -est.score_fitted()
            self.estimators_[k] = est
            self.temperatures_[k] = temperature_for_ess(rarity, self.target_ess) if len(rows) > 1 else 0.0
            self.shares_[k] = len(rows) / len(y)
            self.rarity_[rows] = rarity
        self.weights_ = self._weights(self.rarity_, y)
        return self

    def weights(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Weights of new rows (for example the validation rows), scored against the fitted rows of their class.
        Probabilities that sum to 1, with every class at its share of the fitted data."""
        y = np.asarray(y)
        rarity = np.zeros(len(y))
        for k in np.unique(y):
            rows = np.flatnonzero(y == k)
            if k in self.estimators_:
                rarity[rows] = -self.estimators_[k].score_samples(X[rows])
        return self._weights(rarity, y)

    def _weights(self, rarity: np.ndarray, y: np.ndarray) -> np.ndarray:
        w = np.zeros(len(y))
        present = [k for k in np.unique(y) if k in self.temperatures_]
        total_share = sum(self.shares_[k] for k in present) or 1.0
        for k in present:
            rows = np.flatnonzero(y == k)
            logits = self.temperatures_[k] * rarity[rows]
            wk = np.exp(logits - logits.max())
            w[rows] = wk / wk.sum() * self.shares_[k] / total_share
        return w


def mix_within_classes(scores: np.ndarray, y: np.ndarray, mix: float) -> np.ndarray:
    """Probabilities: within each class, ``mix`` of the class's draws ∝ ``scores`` (non-negative) and the rest spread
    evenly over its rows; every class keeps its share of the rows. A class whose scores are all 0 is drawn evenly."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y)
    if not 0.0 <= mix <= 1.0:
        raise DebiasError(f"mix must be in [0, 1], got {mix}")
    w = np.zeros(len(y))
    for k in np.unique(y):
        rows = y == k
        s = scores[rows]
        part = s / s.sum() if s.sum() > 0 else np.full(rows.sum(), 1.0 / rows.sum())
        w[rows] = (mix * part + (1.0 - mix) / rows.sum()) * rows.mean()
    return w / w.sum()


def over_class_maximum(values: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``values`` divided by their maximum within each class (LfF's normalisation of the per-row losses)."""
    out = np.asarray(values, dtype=np.float64).copy()
    y = np.asarray(y)
    for k in np.unique(y):
        rows = y == k
        out[rows] /= max(out[rows].max(), 1e-12)
    return out


def first_epoch_concentration(bias_losses: np.ndarray, y: np.ndarray, mix: float = 0.5) -> float:
    """How concentrated a biased model's losses are: the effective sample size, as a fraction of the rows, of the
    relative-difficulty weights of :class:`RelativeDifficulty` before the second model has learned anything (its
    losses all equal, so W = L_B / (L_B + 1) with L_B over its class maximum).

    LfF's premise is a bias that is easier to learn than the task: a model trained with the generalized
    cross-entropy then fits the rows that agree with the cue almost perfectly and fails the few that do not, and the
    weights sit on those few (measured with the local first model after 4 epochs: 0.17-0.29 on the three face cue
    protocols, 0.07-0.08 on the built-in spurious set, near the oracle's group balancing at 0.18-0.20 and 0.08).
    Without such a cue the biased model is unsure of many rows and the weights stay spread (0.72-0.86 on natural
    UTKFace). docs/benchmarks.md, issue 12, sessions 8 and 10."""
    lb = over_class_maximum(bias_losses, y)
    p = mix_within_classes(lb / (lb + 1.0), y, mix)
    return float(1.0 / np.sum(p**2) / len(p))


class RelativeDifficulty:
    """LfF's relative difficulty (Nam et al., NeurIPS 2020, Eq. 3) as per-epoch sampling weights.

    A biased model B (the first model, trained with the generalized cross-entropy so that it leans on the easiest cue)
    is frozen; at the start of every epoch the model being trained, D, is scored on the training rows, and

        W(x) = L_B(x) / (L_B(x) + L_D(x))

    with L the cross-entropy, L_D an exponential moving average over epochs (LfF's ``ema``), each divided by its
    class's maximum as LfF does. A row B gets wrong and D gets right weighs most (a cue's exception D has learned);
    a row both get wrong (a hard example) weighs about half as much; a row B gets right weighs little. ``mix`` of each
    class's draws follows W, the rest is uniform, and every class keeps its share.

    Differences from the paper, both for the CPU budget: B is trained first and frozen instead of alongside D, and W
    is refreshed once per epoch instead of per batch. On resume the moving average restarts from that epoch's losses.
    """

    name = "lff"

    def __init__(
        self, bias_losses: np.ndarray, losses: Callable[[ConvVAE], np.ndarray], y: np.ndarray,
        mix: float = 0.5, ema: float = 0.7,
    ) -> None:
        self.bias_losses = np.asarray(bias_losses, dtype=np.float64)
        self.losses = losses
        self.y = np.asarray(y)
        self.mix = mix
        self.ema = ema
        self.average: np.ndarray | None = None

    def weights(self, epoch: int, model: ConvVAE) -> tuple[np.ndarray, dict[str, Any]]:
        t0 = time.perf_counter()
        now = np.asarray(self.losses(model), dtype=np.float64)
        self.average = now if self.average is None else self.ema * self.average + (1.0 - self.ema) * now
        lb, ld = over_class_maximum(self.bias_losses, self.y), over_class_maximum(self.average, self.y)
        p = mix_within_classes(lb / (lb + ld + 1e-8), self.y, self.mix)
        return p, {**_info(p, len(p)), "encode_s": time.perf_counter() - t0}


class ClusterErrorWeights:
    """cluster-errors' weights: inverse cluster density times a first model's error rate, within each class.

    Each class's rows are clustered (k-means, ``n_clusters``, on the leading ``n_components`` principal axes of a
    first model's features): a coarse density Q(c) = n_c / n_k, a histogram whose cells follow the data. Half of the
    class's draws go to the rows as in the data; the other half is spread over the clusters in proportion to the
    first model's error rate e_c on them, whatever their size, so a row's weight is

        w_i ∝ 1/2 · 1/n_k + 1/2 · e_c(i) / (n_c(i) · Σ_c e_c)        (class share n_k / n kept)

    i.e. error rate × inverse density. A shortcut shows as a small cluster the first model gets almost always wrong
    (the cue-conflicting rows): it gets a share of the draws near that of the oracle's group balancing. Hard but
    unbiased rows spread their errors over every cluster, so the weights stay close to uniform and natural data are
    not distorted, which is where plain error upweighting (JTT) loses accuracy. No group column is read: only the
    training label, the first model's features and whether it got each row right.
    """

    def __init__(self, n_clusters: int = 8, n_components: int = 32, seed: int = 0) -> None:
        self.n_clusters = n_clusters
        self.n_components = n_components
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray, errors: np.ndarray) -> "ClusterErrorWeights":
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        X, y, errors = np.asarray(X, dtype=np.float64), np.asarray(y), np.asarray(errors, dtype=bool)
        self.share_ = {k: float(np.mean(y == k)) for k in np.unique(y)}
        self.models_: dict[Any, tuple[Any, Any, np.ndarray]] = {}
        labels = np.zeros(len(y), dtype=np.int64)
        for k in self.share_:
            rows = np.flatnonzero(y == k)
            n_k = len(rows)
            K = max(1, min(self.n_clusters, n_k))
            if n_k < 3:  # too few rows to cluster: weights as in the data
                self.models_[k] = (None, None, np.full(1, 1.0 / n_k))
                continue
            pca = PCA(max(1, min(self.n_components, n_k - 1, X.shape[1])), random_state=self.seed).fit(X[rows])
            km = KMeans(K, n_init=3, random_state=self.seed).fit(pca.transform(X[rows]))
            lab = km.labels_
            n_c = np.bincount(lab, minlength=K).astype(np.float64)
            e_c = np.bincount(lab, weights=errors[rows], minlength=K) / np.maximum(n_c, 1.0)
            # per-row weight inside the class, before the class share: data half + error-rate-per-cluster half
            err_part = e_c / np.maximum(n_c, 1.0) / e_c.sum() if e_c.sum() > 0 else np.zeros(K)
            self.models_[k] = (pca, km, 0.5 * err_part + 0.5 / n_k)
            labels[rows] = lab
        self.clusters_ = labels
        self.weights_ = self.weights(X, y)
        return self

    def weights(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Weights of rows (the fitted ones, or new ones such as the validation rows, assigned to the nearest cluster
        of their class): probabilities that sum to 1, every class at its share of the fitted rows."""
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        w = np.zeros(len(y))
        present = [k for k in np.unique(y) if k in self.models_]
        total = sum(self.share_[k] for k in present) or 1.0
        for k in present:
            rows = np.flatnonzero(y == k)
            pca, km, row_weight = self.models_[k]
            wk = row_weight[km.predict(pca.transform(X[rows]))] if km is not None else np.ones(len(rows))
            w[rows] = wk / wk.sum() * self.share_[k] / total
        return w
