"""Out-of-distribution detection benchmark for `debias score`'s novelty, side by side with the alternatives.

    python benchmarks/novelty_ood.py --model RUN --in SOURCE [--in-where C=V] --ood SOURCE [--ood-where C=V]

The model's training data (from RUN) is encoded and split exactly as `debias score` splits it (seed 0: 80 % fit,
20 % calibration). Every method is fitted on the same fit part and scored on the same in-distribution test images
(negatives) and out-of-distribution images (positives); the table gives AUROC and the FPR at 95 % TPR.

Methods: the shipped scorer (Fisher combination of the posterior kNN distance, the reconstruction error and the
per-pixel density, issue 16), the previous default (summed absolute z-scores of the first two), other combinations
(Mahalanobis, l1, the latent-histogram density added, all statistics, the five-statistic Mahalanobis score of the
first attempt), each statistic
alone two-sided and one-sided, the raw ELBO (the likelihood trap), and PyOD's KNN,
IForest and HBOS on raw pixels (fitted on a random --pyod-fit images of the fit part, stated in the output) and KNN on
the VAE latents. Also the conformal decision at the stored target FPR: the realised FPR on in-distribution test
images and the TPR on OOD images.

    python benchmarks/novelty_ood.py prepare-mnist --mnist DIR --out DIR

writes the 10k MNIST test digits as PNG files with a manifest (column part: train = a random 8,000, test = the
other 2,000, seed 0), so that an MNIST model can be trained on one part and tested on the other.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from debias.data import ImageSet, load_images  # noqa: E402
from debias.data.splits import DEFAULT_CALIBRATION_FRACTION
from debias.density.detector import open_detector
from debias.density.encoding import encode_images  # noqa: E402
from debias.density.novelty import (  # noqa: E402
    DEFAULT_STATISTICS,
    STATISTICS,
    NoveltyScorer,
    feature_matrix,
)
from debias.runtime.device import resolve_device  # noqa: E402
from debias.training.vae import load_model  # noqa: E402


def fpr_at_tpr(y: np.ndarray, s: np.ndarray, tpr: float = 0.95) -> float:
    fpr, tprs, _ = roc_curve(y, s)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


@torch.inference_mode()
def neg_elbo(model, data: ImageSet, batch_size: int = 512) -> np.ndarray:
    """-ELBO per image with z = mu (deterministic): Bernoulli NLL summed over pixels + KL, the training loss."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(data), batch_size):
        x = data.batch(slice(start, start + batch_size)).to(device)
        mu, logvar, _ = model.encode(x)
        rec = F.binary_cross_entropy_with_logits(model.decode(mu).float(), x, reduction="none").flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        out.append((rec + kl).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def pixels(data: ImageSet, rows: np.ndarray | None = None) -> np.ndarray:
    arr = np.asarray(data.images if rows is None else data.images[np.sort(rows)])
    return arr.reshape(len(arr), -1).astype(np.float32) / 255.0


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, meta = load_model(args.model, device)
    cfg = model.config
    t0 = time.perf_counter()
    det = open_detector(args.model, device=device, progress=False)
    t_fit = time.perf_counter() - t0

    trained = meta["data"]
    train = load_images(trained["source"], where=trained.get("where", []), image_size=cfg.image_size,
                        channels=cfg.channels, progress=False)
    n = len(train)
    order = np.random.default_rng(0).permutation(n)  # the split fit_detector makes
    fit_rows = order[int(round(n * DEFAULT_CALIBRATION_FRACTION)):]
    inn = load_images(args.in_source, where=args.in_where, image_size=cfg.image_size, channels=cfg.channels,
                      progress=False)
    ood = load_images(args.ood, where=args.ood_where, image_size=cfg.image_size, channels=cfg.channels, progress=False)

    def pixel_column(data: ImageSet) -> np.ndarray | None:  # the detector's pixel density, when it has one
        if det.pixel_density is None:
            return None
        return np.concatenate([det.pixel_scores(data.batch(slice(a, a + 512))) for a in range(0, len(data), 512)])

    X_fit = feature_matrix(encode_images(model, train, progress=False), pixel_column(train))[fit_rows]
    t0 = time.perf_counter()
    enc_in, enc_ood = encode_images(model, inn, progress=False), encode_images(model, ood, progress=False)
    t_enc = time.perf_counter() - t0
    X_in, X_ood = feature_matrix(enc_in, pixel_column(inn)), feature_matrix(enc_ood, pixel_column(ood))
    y = np.r_[np.zeros(len(inn)), np.ones(len(ood))]
    rows: list[dict] = []

    def add(name: str, s_in: np.ndarray, s_ood: np.ndarray, note: str = "") -> None:
        s = np.r_[s_in, s_ood]
        rows.append({"method": name, "auroc": float(roc_auc_score(y, s)), "fpr_at_95_tpr": fpr_at_tpr(y, s),
                     "note": note})

    add("debias novelty (shipped: fisher of posterior_knn, recon_error, pixel_density)", det.scorer.novelty(X_in),
        det.scorer.novelty(X_ood))
    variants = {
        "previous default: l1 of posterior_knn + recon_error (two-sided)": NoveltyScorer(
            statistics=("posterior_knn", "recon_error"), combine="l1", one_sided=("posterior_knn",)),
        "mahalanobis of the same 3 statistics": NoveltyScorer(combine="mahalanobis"),
        "l1 of the same 3 statistics": NoveltyScorer(combine="l1"),
        "fisher of the 3 + latent_density (histogram evidence)": NoveltyScorer(
            statistics=DEFAULT_STATISTICS + ("latent_density",)),
        f"fisher of all {len(STATISTICS)} statistics": NoveltyScorer(statistics=STATISTICS),
        "mahalanobis of 5 statistics (attempt 1)": NoveltyScorer(
            statistics=("latent_density", "latent_mahalanobis", "recon_error", "posterior_logvar", "kl"),
            combine="mahalanobis"),
    }
    for name, scorer in variants.items():
        scorer.fit(X_fit)
        add(name, scorer.novelty(X_in), scorer.novelty(X_ood))
    for stat in STATISTICS:
        one = NoveltyScorer(statistics=(stat,)).fit(X_fit)
        add(f"{stat}, two-sided", one.novelty(X_in), one.novelty(X_ood))
        # one-sided in the "naive" direction: high error / distance, low density = novel
        raw_in, raw_ood = one.statistic_matrix(X_in)[:, 0], one.statistic_matrix(X_ood)[:, 0]
        sign = -1.0 if stat in ("latent_density", "posterior_logvar") else 1.0
        add(f"{stat}, one-sided", sign * raw_in, sign * raw_ood,
            "low density = novel" if stat == "latent_density" else "")

    add("raw ELBO (-ELBO, z = mu)", neg_elbo(model, inn), neg_elbo(model, ood), "the likelihood trap")

    from pyod.models.hbos import HBOS
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN

    rng = np.random.default_rng(1)
    sub = rng.choice(fit_rows, size=min(args.pyod_fit, len(fit_rows)), replace=False)
    P_fit, P_in, P_ood = pixels(train, sub), pixels(inn), pixels(ood)
    note = f"raw pixels, fitted on {len(sub)} training images"
    for name, det_ in (("PyOD KNN", KNN(n_neighbors=5, n_jobs=1)), ("PyOD IForest", IForest(random_state=0)),
                       ("PyOD HBOS", HBOS())):
        t0 = time.perf_counter()
        det_.fit(P_fit)
        s_in, s_ood = det_.decision_function(P_in), det_.decision_function(P_ood)
        add(name, s_in, s_ood, f"{note} ({time.perf_counter() - t0:.0f} s)")
    knn = KNN(n_neighbors=5, n_jobs=1).fit(X_fit[:, : cfg.latent_dim])
    add("PyOD KNN on VAE latents (mu)", knn.decision_function(X_in[:, : cfg.latent_dim]),
        knn.decision_function(X_ood[:, : cfg.latent_dim]), f"fitted on all {len(X_fit)} fit latents")

    nov_in, nov_ood = det.scorer.novelty(X_in), det.scorer.novelty(X_ood)
    decision = {
        "target_fpr": det.calibrator.target_fpr,
        "threshold": det.calibrator.threshold_,
        "calibration_size": det.calibrator.n_calibration_,
        "fpr_in_distribution_test": float(det.calibrator.is_novel(nov_in).mean()),
        "tpr_ood": float(det.calibrator.is_novel(nov_ood).mean()),
    }
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": str(args.model),
        "trained_on": trained,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "latent_dim": cfg.latent_dim,
        "n_fit": int(len(fit_rows)),
        "n_in": len(inn),
        "n_ood": len(ood),
        "in": {"source": args.in_source, "where": args.in_where},
        "ood": {"source": args.ood, "where": args.ood_where},
        "detector_load_or_fit_s": round(t_fit, 1),
        "encode_images_per_s": round((len(inn) + len(ood)) / t_enc, 1),
        "decision": decision,
        "results": rows,
    }


def prepare_mnist(args: argparse.Namespace) -> None:
    from PIL import Image

    from debias.data.idx import find_idx_pairs, read_idx

    pairs = [p for p in find_idx_pairs(Path(args.mnist)) if p.split == "test"]
    if not pairs:
        raise SystemExit(f"no t10k idx files in {args.mnist}")
    images, _ = read_idx(pairs[0].images)
    labels, _ = read_idx(pairs[0].labels) if pairs[0].labels else (np.full(len(images), -1), None)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    part = np.full(len(images), "test", dtype=object)
    part[np.random.default_rng(0).permutation(len(images))[: args.n_train]] = "train"
    lines = ["path,label,part"]
    for i, img in enumerate(images):
        name = f"images/{i:05d}.png"
        if not (out / name).exists():
            Image.fromarray(img, "L").save(out / name)
        lines.append(f"{name},{int(labels[i])},{part[i]}")
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(images)} PNGs and {out / 'manifest.csv'} ({args.n_train} train, {len(images) - args.n_train} test)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "prepare-mnist":
        ap = argparse.ArgumentParser(prog="novelty_ood.py prepare-mnist")
        ap.add_argument("--mnist", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--n-train", type=int, default=8000)
        prepare_mnist(ap.parse_args(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--in", dest="in_source", required=True, help="In-distribution test images (negatives).")
    ap.add_argument("--in-where", action="append", default=[])
    ap.add_argument("--ood", required=True, help="Out-of-distribution images (positives).")
    ap.add_argument("--ood-where", action="append", default=[])
    ap.add_argument("--pyod-fit", type=int, default=10000, help="Training images the pixel baselines are fitted on.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    args = ap.parse_args()
    res = run(args)
    print(res["command"])
    print(f"model {res['model']} ({res['image_size']} px, {res['channels']} ch, latent {res['latent_dim']}); "
          f"fit {res['n_fit']} / in {res['n_in']} / ood {res['n_ood']}")
    print(f"{'method':58s} {'AUROC':>7s} {'FPR@95':>7s}  note")
    for r in res["results"]:
        print(f"{r['method']:58s} {r['auroc']:7.4f} {r['fpr_at_95_tpr']:7.4f}  {r['note']}")
    d = res["decision"]
    print(f"conformal decision at target FPR {d['target_fpr']}: FPR on in-distribution test {d['fpr_in_distribution_test']:.4f}, "
          f"TPR on OOD {d['tpr_ood']:.4f} (calibration {d['calibration_size']} images)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
