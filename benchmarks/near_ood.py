"""Near- and far-out-of-distribution benchmark of the novelty score (issue 16), every method on the same models.

    python benchmarks/near_ood.py cache   --out bench-out/nearood [--cases fmnist-0,...] [--threads 1]
    python benchmarks/near_ood.py analyse --out bench-out/nearood [--cases fmnist-0,...]
    python benchmarks/near_ood.py table   --out bench-out/nearood
    python benchmarks/near_ood.py fpr-unseen --out bench-out/nearood
    python benchmarks/near_ood.py fpr-heldout --out bench-out/nearood [--cases mnist-1,...]
    python benchmarks/near_ood.py readouts --out bench-out/nearood [--cases ...]   # adds them to an older cache

``cache`` trains one small VAE per case, and the contrastive encoder `debias train` trains beside it (its defaults,
on the same training images), and stores, per image of the case's four parts, everything the methods read: the
posterior (mu, log sigma^2), the reconstruction error, the ELBO terms, the VAE encoder's features, the contrastive
encoder's features (``embedding``; ``embedding_READOUT`` at each of its other readouts, ``READOUTS`` of
debias.models.contrastive, the same weights), the pixels and the PNG size of the image (its input complexity). ``analyse`` fits every method on the same fit part and
scores the same in-distribution test images (negatives) and out-of-distribution images (positives).

Cases (all models 28 px except UTKFace at 32 px; latent 16, width 16, beta 1, seed 0):

- ``fmnist-K`` (K = 0..9): Fashion-MNIST with class K held out. Trained on 2,000 random training images of each
  of the other 9 classes (18,000), 5 epochs; in = the 9,000 test images of the kept classes, OOD = the 1,000 of K.
- ``mnist-K`` (K = 1, 4, 9 by default): the 10k MNIST digits of ../shared split 8,000 / 2,000 (seed 0); trained
  on the 8,000 without digit K, 10 epochs; in = the 2,000 without K, OOD = the training and test digits K.
- far OOD: ``fmnist-all`` (all 10 classes, 20,000, 5 epochs) -> MNIST; ``mnist-all`` (8,000, 10 epochs) ->
  Fashion-MNIST test; ``utkface`` (UTKFace train split at 32 px, 3 channels, 10 epochs) -> MNIST.

The model's training images are split as ``debias score`` splits them (seed 0): 80 % fit, 20 % calibration.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from near_ood_methods import embedding_key  # noqa: E402  (benchmarks/ is the script's own folder)

from debias.data import ImageSet, load_images  # noqa: E402
from debias.data.splits import DEFAULT_CALIBRATION_FRACTION, calibration_split  # noqa: E402
from debias.density.detector import embed_images  # noqa: E402
from debias.models import VAEConfig  # noqa: E402
from debias.models.contrastive import READOUTS, ContrastiveConfig  # noqa: E402
from debias.training.contrastive import (  # noqa: E402
    ContrastiveTrainConfig,
    encoder_path,
    load_encoder,
    train_contrastive,
)
from debias.training.vae import DataDescription, TrainConfig, load_model, train_vae  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
MNIST = str(ROOT.parent / "shared" / "data" / "mnist")
UTKFACE = str(ROOT.parent / "shared" / "data" / "utkface" / "manifest.csv")
FMNIST_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
DEFAULT_CASES = [f"fmnist-{k}" for k in range(10)] + ["mnist-1", "mnist-4", "mnist-9", "fmnist-all", "mnist-all",
                                                      "utkface"]


# ------------------------------------------------------------------------------------------------ the cases' data
def _mnist_parts(size: int, channels: int) -> tuple[ImageSet, np.ndarray]:
    data = load_images(MNIST, image_size=size, channels=channels, progress=False)
    order = np.random.default_rng(0).permutation(len(data))
    part = np.zeros(len(data), dtype=bool)
    part[order[:8000]] = True  # True = training part
    return data, part


def case_data(case: str) -> tuple[ImageSet, ImageSet, ImageSet, dict]:
    """(train, in-distribution test, OOD, model settings) of a case."""
    rng = np.random.default_rng(0)
    if case.startswith("fmnist"):
        train_all = load_images(FMNIST, where=["split=train"], image_size=28, channels=1, progress=False)
        test_all = load_images(FMNIST, where=["split=test"], image_size=28, channels=1, progress=False)
        ytr = train_all.table["label"].astype(int).to_numpy()
        yte = test_all.table["label"].astype(int).to_numpy()
        held = None if case == "fmnist-all" else int(case.split("-")[1])
        keep = [c for c in range(10) if c != held]
        rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(ytr == c), 2000, replace=False) for c in keep]))
        train = train_all.subset(rows)
        if held is None:
            mnist, _ = _mnist_parts(28, 1)
            return train, test_all, mnist, {"image_size": 28, "epochs": 5}
        return (train, test_all.subset(np.flatnonzero(yte != held)), test_all.subset(np.flatnonzero(yte == held)),
                {"image_size": 28, "epochs": 5})
    if case.startswith("mnist"):
        data, part = _mnist_parts(28, 1)
        y = data.table["label"].astype(int).to_numpy()
        if case == "mnist-all":
            fm = load_images(FMNIST, where=["split=test"], image_size=28, channels=1, progress=False)
            return data.subset(np.flatnonzero(part)), data.subset(np.flatnonzero(~part)), fm, \
                {"image_size": 28, "epochs": 10}
        held = int(case.split("-")[1])
        return (data.subset(np.flatnonzero(part & (y != held))), data.subset(np.flatnonzero(~part & (y != held))),
                data.subset(np.flatnonzero(y == held)), {"image_size": 28, "epochs": 10})
    if case == "utkface":
        train = load_images(UTKFACE, where=["split=train"], image_size=32, channels=3, progress=False)
        test = load_images(UTKFACE, where=["split=test"], image_size=32, channels=3, progress=False)
        mnist, _ = _mnist_parts(32, 3)
        return train, test, mnist, {"image_size": 32, "epochs": 10}
    raise SystemExit(f"unknown case {case!r}")


# ------------------------------------------------------------------------------------------------ cache
@torch.inference_mode()
def encode_all(model, data: ImageSet, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per image: mu, logvar, MSE, Bernoulli NLL (sum over pixels, z = mu), KL, encoder features, pixels, PNG bytes."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("mu", "logvar", "mse", "bce", "kl", "features")}
    for start in range(0, len(data), batch_size):
        x = data.batch(slice(start, start + batch_size))
        h = model.features(x)
        mu, logvar, _ = model.encode(x)
        logits = model.decode(mu).float()
        parts["mu"].append(mu.numpy())
        parts["logvar"].append(logvar.numpy())
        parts["mse"].append((torch.sigmoid(logits) - x).pow(2).flatten(1).mean(1).numpy())
        parts["bce"].append(F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).numpy())
        parts["kl"].append((-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).numpy())
        parts["features"].append(h.flatten(1).numpy().astype(np.float16))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["pixels"] = np.ascontiguousarray(data.images).reshape(len(data), -1)
    out["png_bytes"] = np.array([_png_size(img) for img in np.asarray(data.images)], dtype=np.float64)
    return out


def _png_size(img: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG", optimize=True)
    return buf.tell()


def train_encoder(train: ImageSet, opts: dict, run_dir: Path) -> None:
    """`debias train`'s second model at its defaults, into ``run_dir/contrastive`` (kept when already there)."""
    if not encoder_path(run_dir).exists():
        train_contrastive(train, ContrastiveConfig(image_size=opts["image_size"], channels=train.channels),
                          ContrastiveTrainConfig(device="cpu"), run_dir / "contrastive",
                          data_desc={"fingerprint": train.fingerprint},
                          resume=(run_dir / "contrastive" / "checkpoint.pt").exists(), progress=False)


def cache(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    for case in args.cases:
        path = args.out / "cache" / f"{case}.npz"
        if path.exists():
            print(f"{case}: cached", flush=True)
            continue
        t0 = time.perf_counter()
        train, inn, ood, opts = case_data(case)
        run_dir = args.out / "models" / case
        if not (run_dir / "model.pt").exists():
            cfg = VAEConfig(image_size=opts["image_size"], channels=train.channels, latent_dim=16, beta=1.0, width=16)
            desc = DataDescription(source=f"near_ood.py case {case}", where=[], fingerprint=train.fingerprint,
                                   n_images=len(train), n_skipped=0)
            train_vae(train, cfg, TrainConfig(epochs=opts["epochs"], device="cpu"), run_dir, data_desc=desc,
                      resume=(run_dir / "checkpoint.pt").exists(), progress=False)
        t_vae = time.perf_counter() - t0
        train_encoder(train, opts, run_dir)
        t_train = time.perf_counter() - t0
        model, _ = load_model(run_dir, "cpu")
        encoder, _ = load_encoder(encoder_path(run_dir), "cpu")
        n = len(train)
        fit_rows, cal_rows = calibration_split(n, DEFAULT_CALIBRATION_FRACTION, 0)  # the split fit_detector makes
        split = {"fit": fit_rows, "cal": cal_rows}
        arrays = {}
        for part, data in (("fit", train.subset(split["fit"])), ("cal", train.subset(split["cal"])),
                           ("in", inn), ("ood", ood)):
            for key, value in encode_all(model, data).items():
                arrays[f"{part}/{key}"] = value
            arrays.update(readout_arrays(encoder, part, data))
        save_cache(path, arrays)
        print(f"{case}: n_train {n}, in {len(inn)}, ood {len(ood)}; train {t_train:.0f} s (VAE {t_vae:.0f} s), "
              f"total {time.perf_counter() - t0:.0f} s", flush=True)


def readout_key(part: str, readout: str) -> str:
    """The cache's key of a part's features at a readout (``PART/embedding`` for "avg", what it always held)."""
    return f"{part}/{embedding_key(readout)}"


def readout_arrays(encoder, part: str, data: ImageSet, readouts=READOUTS) -> dict[str, np.ndarray]:
    """The encoder's features of ``data`` at each of ``readouts`` (ContrastiveEncoder.forward's; the same weights)."""
    return {readout_key(part, r): embed_images(encoder, data, 512, r) for r in readouts}


def save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def readouts(args: argparse.Namespace) -> None:
    """Add the encoder's other readouts to cases cached before they existed (same models, same images)."""
    torch.set_num_threads(args.threads)
    for case in args.cases:
        path = args.out / "cache" / f"{case}.npz"
        if not path.exists():
            print(f"{case}: not cached yet", flush=True)
            continue
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        missing = [r for r in READOUTS if readout_key("fit", r) not in arrays]
        if not missing:
            print(f"{case}: has every readout", flush=True)
            continue
        train, inn, ood, _ = case_data(case)
        fit_rows, cal_rows = calibration_split(len(train), DEFAULT_CALIBRATION_FRACTION, 0)
        encoder, _ = load_encoder(encoder_path(args.out / "models" / case), "cpu")
        for part, data in (("fit", train.subset(fit_rows)), ("cal", train.subset(cal_rows)), ("in", inn), ("ood", ood)):
            arrays.update(readout_arrays(encoder, part, data, missing))
        save_cache(path, arrays)
        print(f"{case}: readouts added", flush=True)


def fpr_unseen(args: argparse.Namespace) -> None:
    """Realised FPR of the shipped detector of ``fmnist-all`` on the Fashion-MNIST test images, fitted and calibrated
    on the model's own 20,000 training images, then on 20,000 training images it never saw."""
    from debias.density.detector import fit_detector

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.out / "models" / "fmnist-all", "cpu")
    train_all = load_images(FMNIST, where=["split=train"], image_size=28, channels=1, progress=False)
    test = load_images(FMNIST, where=["split=test"], image_size=28, channels=1, progress=False)
    y = train_all.table["label"].astype(int).to_numpy()
    rng = np.random.default_rng(0)  # the draw case_data makes: these rows trained the model
    seen = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), 2000, replace=False) for c in range(10)]))
    unseen = np.sort(rng.choice(np.setdiff1d(np.arange(len(train_all)), seen), len(seen), replace=False))
    sd = float(np.sqrt(0.05 * 0.95 / len(test)))
    for name, rows in (("its own training images", seen), ("training images it never saw", unseen)):
        res = fit_detector(model, train_all.subset(rows), progress=False).score_dataset(test, progress=False)
        print(f"fitted on {len(rows)} {name}: realised FPR on {len(test)} test images {res.is_novel.mean():.4f} "
              f"(target 0.05, 1.5 binomial sd {1.5 * sd:.4f})", flush=True)


def fpr_heldout(args: argparse.Namespace) -> None:
    """The fix for the realised FPR (issue 16): the same case, its model trained on the fit part only (as `debias
    train --calibration-fraction` does), the shipped detector calibrated on the held-out part. Side by side with the
    model that saw its calibration images (``analyse``'s analysis.json)."""
    from sklearn.metrics import roc_auc_score

    from debias.density.calibration import ConformalCalibrator
    from debias.density.detector import fit_detector

    torch.set_num_threads(args.threads)
    before = json.loads((args.out / "analysis.json").read_text())["cases"] if (args.out / "analysis.json").exists() else {}
    rows = []
    for case in args.cases:
        train, inn, ood, opts = case_data(case)
        fit_rows, _ = calibration_split(len(train), DEFAULT_CALIBRATION_FRACTION, 0)  # the detector's own split
        run_dir = args.out / "models-heldout" / case
        t0 = time.perf_counter()
        if not (run_dir / "model.pt").exists():
            cfg = VAEConfig(image_size=opts["image_size"], channels=train.channels, latent_dim=16, beta=1.0, width=16)
            desc = DataDescription(source=f"near_ood.py case {case}", where=[], fingerprint=train.fingerprint,
                                   n_images=len(train), n_skipped=0, calibration_fraction=DEFAULT_CALIBRATION_FRACTION,
                                   n_calibration=len(train) - len(fit_rows))
            train_vae(train.subset(fit_rows), cfg, TrainConfig(epochs=opts["epochs"], device="cpu"), run_dir,
                      data_desc=desc, resume=(run_dir / "checkpoint.pt").exists(), progress=False)
        train_encoder(train.subset(fit_rows), opts, run_dir)  # as `debias train`: on the VAE's rows only
        model, _ = load_model(run_dir, "cpu")
        encoder, _ = load_encoder(encoder_path(run_dir), "cpu")
        det = fit_detector(model, train, encoder=encoder, progress=False)  # calibrates on rows neither model saw
        res_in, res_ood = det.score_dataset(inn, progress=False), det.score_dataset(ood, progress=False)
        auroc = roc_auc_score(np.r_[np.zeros(len(inn)), np.ones(len(ood))], np.r_[res_in.novelty, res_ood.novelty])
        old = before.get(case, {}).get("results", {}).get("debias novelty (shipped default)", {})
        # One calibration draw moves the threshold too (sd ~ sqrt(a (1 - a) / n_cal)). Every image of the pool
        # (held-out calibration + test) is new to the model and to the fitted score, so re-splitting the pool at
        # random many times gives the realised FPR averaged over calibration draws: 0.05 if nothing is biased.
        cal = np.asarray(det.calibrator.scores_)
        pool = np.r_[cal, res_in.novelty]
        rng = np.random.default_rng(1)
        draws = []
        for _ in range(400):
            perm = rng.permutation(len(pool))
            c = ConformalCalibrator(target_fpr=0.05).fit(pool[perm[: len(cal)]])
            draws.append(float(c.is_novel(pool[perm[len(cal):]]).mean()))
        row = {"case": case, "n_in": len(inn), "n_cal": len(cal), "fpr": float(res_in.is_novel.mean()),
               "fpr_mean_over_draws": float(np.mean(draws)), "fpr_sd_over_draws": float(np.std(draws)),
               "tpr": float(res_ood.is_novel.mean()), "auroc": float(auroc), "fpr_before": old.get("fpr_in"),
               "auroc_before": old.get("auroc"), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    sd = lambda n: 1.5 * float(np.sqrt(0.05 * 0.95 / n))  # noqa: E731
    print("\n| case | realised FPR, calibration held out | before (calibrated on seen images) | 1.5 sd bar (test count) "
          "| within | mean over 400 calibration draws (sd) | AUROC | before | TPR at 5 % |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fb = "–" if r["fpr_before"] is None else f"{r['fpr_before']:.3f}"
        ab = "–" if r["auroc_before"] is None else f"{r['auroc_before']:.3f}"
        print(f"| {r['case']} | {r['fpr']:.3f} | {fb} | {0.05 - sd(r['n_in']):.3f}-{0.05 + sd(r['n_in']):.3f} | "
              f"{'yes' if abs(r['fpr'] - 0.05) <= sd(r['n_in']) else 'no'} | {r['fpr_mean_over_draws']:.3f} "
              f"({r['fpr_sd_over_draws']:.3f}) | {r['auroc']:.3f} | {ab} | {r['tpr']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--out", type=Path, default=Path("bench-out/nearood"))
    c.add_argument("--cases", type=lambda s: s.split(","), default=DEFAULT_CASES)
    c.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("analyse")
    a.add_argument("--out", type=Path, default=Path("bench-out/nearood"))
    a.add_argument("--cases", type=lambda s: s.split(","), default=DEFAULT_CASES)
    a.add_argument("--merge", action="store_true", help="add these cases to an existing analysis.json")
    h = sub.add_parser("fpr-heldout", help="realised FPR with the calibration part held out of training")
    h.add_argument("--out", type=Path, default=Path("bench-out/nearood"))
    h.add_argument("--cases", type=lambda s: s.split(","), default=DEFAULT_CASES)
    h.add_argument("--threads", type=int, default=1)
    f = sub.add_parser("fpr-unseen", help="realised FPR, calibrated on seen vs unseen images (fmnist-all)")
    f.add_argument("--out", type=Path, default=Path("bench-out/nearood"))
    f.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("readouts", help="add the encoder's other readouts to an older cache")
    r.add_argument("--out", type=Path, default=Path("bench-out/nearood"))
    r.add_argument("--cases", type=lambda s: s.split(","), default=DEFAULT_CASES)
    r.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("table", help="print the Markdown summary of analysis.json")
    t.add_argument("--out", type=Path, default=Path("bench-out/nearood"))
    args = ap.parse_args()
    if args.cmd == "cache":
        cache(args)
    elif args.cmd == "fpr-heldout":
        fpr_heldout(args)
    elif args.cmd == "fpr-unseen":
        fpr_unseen(args)
    elif args.cmd == "readouts":
        readouts(args)
    elif args.cmd == "table":
        from near_ood_methods import summarise  # noqa: E402

        print(summarise(json.loads((args.out / "analysis.json").read_text())))
    else:
        from near_ood_methods import analyse  # noqa: E402  (kept apart: methods change, the cache does not)
        analyse(args)


if __name__ == "__main__":
    main()
