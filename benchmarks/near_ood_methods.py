"""The methods of benchmarks/near_ood.py's ``analyse``: every statistic, combination and baseline, on cached arrays.

Each method is fitted on the ``fit`` part only, its scores on the ``cal`` part set the conformal threshold at the
target FPR, and it is judged on ``in`` (negatives) and ``ood`` (positives): AUROC, FPR at 95 % TPR, and the
conformal decision's realised FPR on ``in`` and TPR on ``ood``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from debias.density.calibration import ConformalCalibrator  # noqa: E402
from debias.density.novelty import (  # noqa: E402
    DEFAULT_EMBEDDING_READOUT,
    DEFAULT_STATISTICS,
    DEFAULT_STATISTICS_WITH_EMBEDDING,
    DEFAULT_WEIGHTS_WITH_EMBEDDING,
    NoveltyScorer,
    PixelDensity,
    tail_log_p,
)
from debias.models.contrastive import READOUTS  # noqa: E402

TARGET_FPR = 0.05
PARTS = ("fit", "cal", "in", "ood")


def load_case(path: Path) -> dict[str, dict[str, np.ndarray]]:
    z = np.load(path)
    out: dict[str, dict[str, np.ndarray]] = {p: {} for p in PARTS}
    for key in z.files:
        part, name = key.split("/", 1)
        out[part][name] = z[key]
    return out


def fpr_at_tpr(y: np.ndarray, s: np.ndarray, tpr: float = 0.95) -> float:
    fpr, tprs, _ = roc_curve(y, s)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def feature_matrix(p: dict[str, np.ndarray], pixel: np.ndarray | None = None) -> np.ndarray:
    cols = [p["mu"], p["logvar"], p["mse"][:, None]] + ([pixel[:, None]] if pixel is not None else [])
    return np.hstack(cols).astype(np.float64)


def images_nchw(p: dict[str, np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    """The cached uint8 pixels (n, H*W*C, HWC order) as ImageSet.batch gives them: float (n, C, H, W) in [0, 1]."""
    h, w, c = shape
    return (p["pixels"].reshape(-1, h, w, c).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def shipped(case, shape, with_encoder: bool = True) -> dict[str, np.ndarray]:
    """The library's default detector, exactly as fit_detector builds it: PixelDensity and NoveltyScorer at the
    default statistics fitted on the fit part; with the run's contrastive encoder (``embedding``) as `debias train`
    makes it, or without (a run trained with --contrastive-epochs 0)."""
    dens = PixelDensity().fit(images_nchw(case["fit"], shape))
    X = {p: feature_matrix(case[p], dens.score_samples(images_nchw(case[p], shape))) for p in PARTS}
    if not with_encoder:
        scorer = NoveltyScorer(statistics=DEFAULT_STATISTICS).fit(X["fit"])
        return {p: scorer.novelty(X[p]) for p in ("cal", "in", "ood")}
    key = embedding_key(DEFAULT_EMBEDDING_READOUT)  # how the detector reads the run's encoder
    E = {p: case[p][key].astype(np.float64) for p in PARTS}
    scorer = NoveltyScorer(statistics=DEFAULT_STATISTICS_WITH_EMBEDDING, weights=DEFAULT_WEIGHTS_WITH_EMBEDDING).fit(
        X["fit"], embeddings=E["fit"])
    return {p: scorer.novelty(X[p], embeddings=E[p]) for p in ("cal", "in", "ood")}


def embedding_key(readout: str) -> str:
    """The cache's key of the encoder's features at a readout (benchmarks/near_ood.py, ``readout_arrays``)."""
    return "embedding" if readout == "avg" else f"embedding_{readout}"


def pixels(p: dict[str, np.ndarray]) -> np.ndarray:
    return p["pixels"].astype(np.float32) / 255.0


def neg_elbo(p: dict[str, np.ndarray]) -> np.ndarray:
    return (p["bce"] + p["kl"]).astype(np.float64)


# ------------------------------------------------------------------------------------------------ building blocks
def knn_distance(ref: np.ndarray, q: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Mean Euclidean distance from each query row to its k nearest reference rows (brute force, torch)."""
    import torch

    R = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    r2 = (R * R).sum(1)
    out = np.empty(len(q))
    for a in range(0, len(q), 512):
        Q = torch.from_numpy(np.ascontiguousarray(q[a : a + 512], dtype=np.float32))
        d2 = ((Q * Q).sum(1)[:, None] + r2[None, :] - 2 * Q @ R.T).clamp_min_(0)
        if exclude_self:
            idx = torch.arange(a, a + len(Q))
            d2[torch.arange(len(Q)), idx] = float("inf")
        out[a : a + len(Q)] = torch.topk(d2, k, dim=1, largest=False).values.sqrt().mean(1).numpy()
    return out


class PixelHistogram:
    """HBOS-style log density of the pixels: one histogram per pixel (and channel), summed log frequencies."""

    def __init__(self, bins: int = 16, alpha: float = 1.0) -> None:
        self.bins, self.alpha = bins, alpha

    def fit(self, P: np.ndarray) -> "PixelHistogram":
        b = np.minimum((P * self.bins).astype(np.int64), self.bins - 1)
        counts = np.stack([np.bincount(b[:, j], minlength=self.bins) for j in range(P.shape[1])])
        self.logp_ = np.log((counts + self.alpha) / (len(P) + self.alpha * self.bins))  # (features, bins)
        return self

    def score(self, P: np.ndarray) -> np.ndarray:
        b = np.minimum((P * self.bins).astype(np.int64), self.bins - 1)
        return self.logp_[np.arange(P.shape[1])[None, :], b].sum(1)


def standardise(fit_values: np.ndarray):
    m, s = fit_values.mean(), fit_values.std() + 1e-12
    return lambda v: (v - m) / s


# ------------------------------------------------------------------------------------------------ statistics
def statistics(case: dict[str, dict[str, np.ndarray]], k: int = 5) -> dict[str, dict[str, np.ndarray]]:
    """name -> part -> raw statistic (direction: as computed; the combiners decide one- or two-sided)."""
    fit = case["fit"]
    stats: dict[str, dict[str, np.ndarray]] = {}
    ship = NoveltyScorer(statistics=("posterior_knn", "recon_error", "latent_mahalanobis", "kl",
                                     "posterior_logvar", "latent_norm", "latent_density")).fit(feature_matrix(fit))
    # fit-part values: leave-one-out for kNN statistics, as NoveltyScorer's fit does
    fit_ship = ship._statistics(feature_matrix(fit), self_rows=np.arange(len(fit["mu"])))
    for j, name in enumerate(ship.statistics):
        stats[name] = {p: (fit_ship[:, j] if p == "fit" else ship.statistic_matrix(feature_matrix(case[p]))[:, j])
                       for p in PARTS}
    stats["neg_elbo"] = {p: np.log(neg_elbo(case[p])) for p in PARTS}
    stats["bce"] = {p: np.log(case[p]["bce"]) for p in PARTS}
    # Serra et al. (ICLR 2020), input complexity: NLL in bits minus the PNG code length in bits
    stats["elbo_minus_complexity"] = {p: neg_elbo(case[p]) / np.log(2) - 8 * case[p]["png_bytes"] for p in PARTS}
    stats["png_bytes"] = {p: np.log(case[p]["png_bytes"]) for p in PARTS}
    hist = PixelHistogram().fit(pixels(fit))
    stats["pixel_hbos"] = {p: -hist.score(pixels(case[p])) for p in PARTS}
    F_fit = fit["features"].astype(np.float32)
    stats["feature_knn"] = {p: np.log(knn_distance(F_fit, case[p]["features"], k, exclude_self=(p == "fit")) + 1e-12)
                            for p in PARTS}
    # the contrastive encoder's features: embedding_knn of the shipped scorer, at each readout the cache holds
    # ("embedding_knn" = the mean; "embedding_knn[max]" the novelty score's since session 15, the audit's since 16)
    for readout in READOUTS:
        key = embedding_key(readout)
        if key in fit:
            R_fit = fit[key].astype(np.float32)
            name = "embedding_knn" if readout == "avg" else f"embedding_knn[{readout}]"
            stats[name] = {p: np.log(knn_distance(R_fit, case[p][key], k, exclude_self=(p == "fit")) + 1e-12)
                           for p in PARTS}
    Pf = pixels(fit)
    stats["pixel_knn"] = {p: np.log(knn_distance(Pf, pixels(case[p]), k, exclude_self=(p == "fit")) + 1e-12)
                          for p in PARTS}
    return stats


ONE_SIDED = {"posterior_knn", "feature_knn", "pixel_knn", "embedding_knn"} | {f"embedding_knn[{r}]" for r in READOUTS}


def l1_combo(stats, names, one_sided=ONE_SIDED) -> dict[str, np.ndarray]:
    out = {p: np.zeros_like(stats[names[0]][p]) for p in PARTS}
    for n in names:
        z = standardise(stats[n]["fit"])
        for p in PARTS:
            v = z(stats[n][p])
            out[p] += np.maximum(v, 0) if n in one_sided else np.abs(v)
    return out


def neg_log_tails(stats, name: str, one_sided) -> dict[str, np.ndarray]:
    """Per part, -log of the statistic's empirical tail p-value among the fit part (+1 smoothed): the upper tail if
    one-sided, twice the smaller tail otherwise (as NoveltyScorer's fisher)."""
    ref = np.sort(stats[name]["fit"])
    return {p: -tail_log_p(ref, stats[name][p], name in one_sided) for p in PARTS}


def max_tail_combo(stats, names, one_sided=ONE_SIDED) -> dict[str, np.ndarray]:
    """-log of the smallest per-statistic empirical tail p-value (two-sided unless one-sided): a rank combination
    that lets the one statistic that sees the image decide, instead of averaging it away."""
    tails = [neg_log_tails(stats, n, one_sided) for n in names]
    return {p: np.max([t[p] for t in tails], axis=0) for p in PARTS}


def fisher_combo(stats, names, one_sided=ONE_SIDED, weights=None) -> dict[str, np.ndarray]:
    """Fisher's method over the statistics' tails: sum of -log p (the ranking of -2 sum log p); ``weights`` (one
    per name) weigh the terms (Good's weighted Fisher)."""
    tails = [neg_log_tails(stats, n, one_sided) for n in names]
    w = weights or [1.0] * len(names)
    return {p: np.sum([wi * t[p] for wi, t in zip(w, tails)], axis=0) for p in PARTS}


def gmm_combo(stats, names, n_components: int = 8) -> dict[str, np.ndarray]:
    """Minus the log density of a Gaussian mixture over the standardised statistics (fitted on the fit part)."""
    from sklearn.mixture import GaussianMixture

    cols = {p: np.column_stack([standardise(stats[n]["fit"])(stats[n][p]) for n in names]) for p in PARTS}
    g = GaussianMixture(n_components, covariance_type="full", random_state=0, reg_covar=1e-3).fit(cols["fit"])
    return {p: -g.score_samples(cols[p]) for p in PARTS}


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(scores: dict[str, np.ndarray]) -> dict[str, float]:
    y = np.r_[np.zeros(len(scores["in"])), np.ones(len(scores["ood"]))]
    s = np.r_[scores["in"], scores["ood"]]
    out = {"auroc": float(roc_auc_score(y, s)), "fpr_at_95_tpr": fpr_at_tpr(y, s)}
    if "cal" in scores:
        cal = ConformalCalibrator(TARGET_FPR).fit(scores["cal"])
        out["fpr_in"] = float(cal.is_novel(scores["in"]).mean())
        out["tpr_ood"] = float(cal.is_novel(scores["ood"]).mean())
    return out


def pyod_baselines(case, n_fit: int = 10000) -> dict[str, dict[str, np.ndarray]]:
    from pyod.models.ecod import ECOD
    from pyod.models.hbos import HBOS
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN

    rng = np.random.default_rng(1)
    fit_rows = rng.choice(len(case["fit"]["mu"]), size=min(n_fit, len(case["fit"]["mu"])), replace=False)
    out = {}
    for space in ("pixels", "latents"):
        get = pixels if space == "pixels" else (lambda p: p["mu"].astype(np.float64))
        X_fit = get(case["fit"])[fit_rows]
        for name, det in (("KNN", KNN(n_neighbors=5, n_jobs=1, algorithm="brute")), ("IForest", IForest(random_state=0)),
                          ("HBOS", HBOS()), ("ECOD", ECOD())):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                det.fit(X_fit)
                out[f"PyOD {name} on {space}"] = {p: det.decision_function(get(case[p])) for p in ("cal", "in", "ood")}
    return out


def methods(stats) -> dict[str, dict[str, np.ndarray]]:
    two = ("posterior_knn", "recon_error")
    m = {
        "previous default: l1(posterior_knn+, recon_error±)": l1_combo(stats, list(two), one_sided={"posterior_knn"}),
        "fisher(posterior_knn+, recon_error+, pixel_hbos±)": fisher_combo(
            stats, ["posterior_knn", "recon_error", "pixel_hbos"], one_sided={"posterior_knn", "recon_error"}),
        "raw ELBO (one-sided)": {p: stats["neg_elbo"][p] for p in PARTS},
    }
    for name in stats:
        m[f"{name}, two-sided"] = l1_combo(stats, [name], one_sided=set())
        m[f"{name}, one-sided high"] = {p: stats[name][p] for p in PARTS}
    sets = {
        "A": ["posterior_knn", "recon_error", "neg_elbo"],
        "B": ["posterior_knn", "recon_error", "pixel_hbos"],
        "C": ["posterior_knn", "recon_error", "neg_elbo", "pixel_hbos"],
        "D": ["posterior_knn", "recon_error", "neg_elbo", "pixel_hbos", "feature_knn"],
        "E": ["posterior_knn", "recon_error", "neg_elbo", "pixel_hbos", "feature_knn", "pixel_knn"],
        "F": ["posterior_knn", "recon_error", "elbo_minus_complexity", "pixel_hbos", "feature_knn"],
        "G": ["feature_knn", "pixel_knn", "pixel_hbos", "neg_elbo"],
    }
    if "embedding_knn" in stats:  # issue 16, session 13: the contrastive encoder's kNN beside the VAE's statistics
        vae3, recon_one = ["posterior_knn", "recon_error", "pixel_hbos"], {"posterior_knn", "recon_error", "embedding_knn"}
        for names in (vae3 + ["embedding_knn"], ["posterior_knn", "pixel_hbos", "embedding_knn"],
                      ["recon_error", "pixel_hbos", "embedding_knn"], ["posterior_knn", "recon_error", "embedding_knn"],
                      ["pixel_hbos", "embedding_knn"]):
            m[f"fisher({'+'.join(names)})"] = fisher_combo(stats, names, one_sided=recon_one)
        for w in (1.5, 2.0, 3.0):
            m[f"fisher(posterior_knn+recon_error+pixel_hbos+{w:g} x embedding_knn)"] = fisher_combo(
                stats, vae3 + ["embedding_knn"], one_sided=recon_one, weights=[1.0, 1.0, 1.0, w])
        # session 15: the encoder's other readouts, in its place (weight 2, as shipped) or beside it
        for readout in READOUTS[1:]:
            name = f"embedding_knn[{readout}]"
            if name not in stats:
                continue
            one = recon_one | {name}
            m[f"fisher(posterior_knn+recon_error+pixel_hbos+2 x {name})"] = fisher_combo(
                stats, vae3 + [name], one_sided=one, weights=[1.0, 1.0, 1.0, 2.0])
            for w in (1.0, 2.0):
                m[f"fisher(posterior_knn+recon_error+pixel_hbos+2 x embedding_knn+{w:g} x {name})"] = fisher_combo(
                    stats, vae3 + ["embedding_knn", name], one_sided=one, weights=[1.0, 1.0, 1.0, 2.0, w])
    for tag, names in sets.items():
        m[f"l1 {tag} {'+'.join(names)}"] = l1_combo(stats, names)
        m[f"maxtail {tag}"] = max_tail_combo(stats, names)
        m[f"fisher {tag}"] = fisher_combo(stats, names)
        m[f"gmm {tag}"] = gmm_combo(stats, names)
    return m


def analyse(args) -> None:
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "target_fpr": TARGET_FPR, "cases": {}}
    for case in args.cases:
        path = args.out / "cache" / f"{case}.npz"
        if not path.exists():
            print(f"{case}: not cached yet", flush=True)
            continue
        t0 = time.perf_counter()
        data = load_case(path)
        stats = statistics(data)
        results = {}
        side = int(round(np.sqrt(data["fit"]["pixels"].shape[1] / (3 if "utkface" in case else 1))))
        shape = (side, side, 3 if "utkface" in case else 1)
        extra = {VAE_ONLY: shipped(data, shape, with_encoder=False)} if "embedding" in data["fit"] else {}
        for name, sc in {"debias novelty (shipped default)": shipped(data, shape, "embedding" in data["fit"]), **extra,
                         **methods(stats),
                         **pyod_baselines(data)}.items():
            results[name] = evaluate(sc)
        report["cases"][case] = {"n": {p: int(len(data[p]["mu"])) for p in PARTS}, "results": results}
        print(f"{case}: {time.perf_counter() - t0:.0f} s", flush=True)
    out = args.out / "analysis.json"
    if args.merge and out.exists():  # keep the other cases of an earlier run (the same methods on each)
        earlier = json.loads(out.read_text())
        report["cases"] = {**earlier["cases"], **report["cases"]}
        report["command"] = f"{earlier['command']} ; {report['command']}"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


SHIPPED = "debias novelty (shipped default)"
VAE_ONLY = "debias novelty, VAE statistics only (--contrastive-epochs 0; the default before session 13)"
PREVIOUS = "previous default: l1(posterior_knn+, recon_error±)"
PYOD_PIXELS = [f"PyOD {m} on pixels" for m in ("KNN", "IForest", "HBOS", "ECOD")]
ELBO = "raw ELBO (one-sided)"


def case_label(case: str) -> str:
    from near_ood import FMNIST_CLASSES

    if case == "fmnist-all":
        return "far: Fashion-MNIST -> MNIST"
    if case == "mnist-all":
        return "far: MNIST -> Fashion-MNIST"
    if case == "utkface":
        return "far: UTKFace -> MNIST"
    kind, k = case.split("-")
    return f"Fashion-MNIST, held out {k} ({FMNIST_CLASSES[int(k)]})" if kind == "fmnist" else f"MNIST, held out {k}"


def summarise(report: dict) -> str:
    """The Markdown table of docs/benchmarks.md: per case AUROC of the shipped score, the previous default, the best
    PyOD pixel baseline and the raw ELBO, the acceptance floor, the best of every method (a ceiling that picks the
    method per case, with hindsight), FPR at 95 % TPR and the conformal decision."""
    with_encoder = any(VAE_ONLY in body["results"] for body in report["cases"].values())
    lines = [f"| case | shipped | {'VAE statistics only' if with_encoder else 'previous default'} | best PyOD on pixels | raw ELBO | floor (best - 0.02) | shipped >= floor | "
             "best of all methods (which) | shipped FPR@95TPR | realised FPR at 5 % | TPR at 5 % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    near = {"shipped": [], "previous": [], "ceiling": []}
    for case, body in report["cases"].items():
        r = body["results"]
        ship, prev = r[SHIPPED], r.get(VAE_ONLY, r[PREVIOUS])
        pyod = max(PYOD_PIXELS, key=lambda m: r[m]["auroc"])
        floor = max(r[pyod]["auroc"], r[ELBO]["auroc"]) - 0.02
        best = max(r, key=lambda m: r[m]["auroc"])
        far = case in ("fmnist-all", "mnist-all", "utkface")
        ok = ship["auroc"] >= (0.995 if far else floor)
        lines.append(
            f"| {case_label(case)} | **{ship['auroc']:.3f}** | {prev['auroc']:.3f} | {r[pyod]['auroc']:.3f} "
            f"({pyod.split()[1]}) | {r[ELBO]['auroc']:.3f} | {'0.995 (far)' if far else f'{floor:.3f}'} | "
            f"{'yes' if ok else '**no**'} | {r[best]['auroc']:.3f} ({best}) | {ship['fpr_at_95_tpr']:.3f} | "
            f"{ship['fpr_in']:.3f} | {ship['tpr_ood']:.3f} |")
        if case.startswith("fmnist-") and not far:
            near["shipped"].append(ship["auroc"])
            near["previous"].append(prev["auroc"])
            near["ceiling"].append(r[best]["auroc"])
    if near["shipped"]:
        lines.append("")
        lines.append(f"Fashion-MNIST leave-one-class-out, mean AUROC over {len(near['shipped'])} classes: shipped "
                     f"**{np.mean(near['shipped']):.3f}**, {'VAE statistics only' if with_encoder else 'previous default'} "
                     f"{np.mean(near['previous']):.3f}, best method per class chosen with hindsight "
                     f"{np.mean(near['ceiling']):.3f}.")
    combos = [m for m in next(iter(report["cases"].values()))["results"]
              if m.startswith("fisher(") or m in (SHIPPED, VAE_ONLY)
              or (m.startswith("embedding_knn") and m.endswith("one-sided high"))]
    fm = [c for c in report["cases"] if c.startswith("fmnist-") and c != "fmnist-all"]
    far = [c for c in ("fmnist-all", "mnist-all", "utkface") if c in report["cases"]]
    if combos and fm:
        lines += ["", "| method | Fashion-MNIST mean AUROC | classes at or above the floor | lowest far-OOD AUROC |",
                  "|---|---|---|---|"]
        for m in combos:
            rs = [report["cases"][c]["results"] for c in fm]
            floors = [max(max(r[x]["auroc"] for x in PYOD_PIXELS), r[ELBO]["auroc"]) - 0.02 for r in rs]
            low = min((report["cases"][c]["results"][m]["auroc"] for c in far), default=float("nan"))
            lines.append(f"| {m} | {np.mean([r[m]['auroc'] for r in rs]):.3f} | "
                         f"{sum(r[m]['auroc'] >= f for r, f in zip(rs, floors))} of {len(rs)} | {low:.4f} |")
    return "\n".join(lines)
