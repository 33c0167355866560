"""Sanity check of the generated-image quality metrics (`debias quality`) on sets whose answer is known.

    python benchmarks/quality_sanity.py [--n 5000] [--epochs 10] [--work runs/quality_sanity] [--features RUN]

Trains a VAE on builtin:shapes (split=train, 32 px, latent 16) unless --features names a run, then measures, in its
posterior-mean feature space, a reference set (one random half of the held-out split=test rows) against:

- the other half (same distribution: FID/KID near 0, precision and recall high), also with only 20 images a side
  (how far FID and KID stray from 0 on tiny groups);
- the other half blurred (Gaussian, radius 1 and 2 px): a mild and a stronger quality loss;
- the other half with groups dropped (circles only, red only: mode dropping) and one image repeated (mode collapse):
  precision should stay high and recall fall;
- uniform noise images: nothing in common.

FID, KID (100 subsets, subset size min(1000, n)), improved precision/recall (k = 3, equal set sizes) come from
debias.evaluation.generation_metrics, as `debias quality` computes them; CAS (a classifier trained on the compared set's
`colour` labels, tested on the reference half) is given where the compared set has labels. Prints a Markdown table
and the seconds each step took.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from debias.data import ImageSet, load_images  # noqa: E402
from debias.evaluation.generation_metrics import (  # noqa: E402
    CasConfig,
    PrecomputedFeatures,
    classification_accuracy_score,
    extract_features,
    fid_kid,
    load_feature_extractor,
    precision_recall,
)


def blur(images: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images])


def as_set(template: ImageSet, images: np.ndarray, table) -> ImageSet:
    """An in-memory ImageSet (for CAS) holding ``images`` with ``table``'s rows."""
    return ImageSet(images=images, table=table.reset_index(drop=True), skipped=template.skipped,
                    fingerprint=f"sanity-{len(images)}-{int(images[:4].sum())}", source="benchmark",
                    image_size=template.image_size, channels=template.channels, root=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="builtin:shapes size")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "quality_sanity")
    ap.add_argument("--features", type=Path, default=None, help="an existing VAE run instead of training one")
    ap.add_argument("--cas-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    source = f"builtin:shapes?n={args.n}"
    timings: dict[str, float] = {}

    run = args.features
    if run is None:
        run = args.work / "vae"
        if not (run / "model.pt").exists():
            from debias.pipelines.train import TrainJob, run_train
            from debias.training.vae import TrainConfig

            t0 = time.perf_counter()
            run_train(TrainJob(data=source, where=["split=train"], out=run, image_size=32, latent_dim=16,
                               train=TrainConfig(epochs=args.epochs, batch_size=128, seed=args.seed, device="auto"),
                               resume=(run / "checkpoint.pt").exists(), progress=False))
            timings["train VAE"] = time.perf_counter() - t0
    features = load_feature_extractor(run, "auto")
    cfg = features.model.config
    test = load_images(source, where=["split=test"], image_size=cfg.image_size, channels=cfg.channels, progress=False)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(test))
    ref_rows, other_rows = np.sort(order[: len(test) // 2]), np.sort(order[len(test) // 2 :])
    ref = test.subset(ref_rows)
    other = test.subset(other_rows)
    ref_img, other_img = np.asarray(ref.images), np.asarray(other.images)
    circles = other.table["shape"].to_numpy() == "circle"
    red = other.table["colour"].to_numpy() == "red"

    cases: list[tuple[str, np.ndarray, object]] = [  # name, images, table for CAS (None: no labels)
        ("other half (same distribution)", other_img, other.table),
        ("other half, 20 images vs 20", other_img[:20], None),
        ("other half blurred, radius 1 px", blur(other_img, 1), other.table),
        ("other half blurred, radius 2 px", blur(other_img, 2), other.table),
        ("other half, circles only (mode dropping)", other_img[circles], other.table[circles]),
        ("other half, red only (mode dropping)", other_img[red], None),  # one colour: CAS undefined
        ("one image repeated (mode collapse)", np.repeat(other_img[:1], len(other_img), 0), None),
        ("uniform noise", rng.integers(0, 256, other_img.shape, dtype=np.uint8), None),
    ]
    t0 = time.perf_counter()
    ref_f = extract_features(ref_img, features)
    timings[f"features of {len(ref_img)} reference images"] = time.perf_counter() - t0
    identity = PrecomputedFeatures(ref_f.shape[1])
    rows = []
    for name, images, table in cases:
        fake_f = extract_features(images, features)
        real_f = ref_f[:20] if len(images) == 20 else ref_f
        t0 = time.perf_counter()
        fk = fid_kid(real_f, fake_f, identity, seed=args.seed)
        t1 = time.perf_counter()
        n = min(len(real_f), len(fake_f))
        pick = np.random.default_rng(args.seed)
        pr = precision_recall(real_f[np.sort(pick.choice(len(real_f), n, replace=False))],
                              fake_f[np.sort(pick.choice(len(fake_f), n, replace=False))])
        t2 = time.perf_counter()
        cas = None
        if table is not None:
            res = classification_accuracy_score(
                as_set(test, images, table), table["colour"].to_numpy(), ref, ref.table["colour"].to_numpy(),
                config=CasConfig(epochs=args.cas_epochs, seed=args.seed),
            )
            cas = res.accuracy
            timings[f"CAS: {name}"] = time.perf_counter() - t2
        timings[f"FID+KID: {name}"] = t1 - t0
        timings[f"precision/recall: {name}"] = t2 - t1
        rows.append((name, len(real_f), len(images), fk, pr, cas))

    print(f"command: python {shlex.join(['benchmarks/quality_sanity.py', *sys.argv[1:]])}")
    print(f"features: {run} (latent {cfg.latent_dim}, {cfg.image_size} px); reference: {len(ref)} held-out images\n")
    print("| compared set | n ref | n set | FID | KID (mean ± std) | precision | recall | CAS (colour) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n_ref, n_set, fk, pr, cas in rows:
        cas_text = "–" if cas is None else f"{cas:.3f}"
        print(f"| {name} | {n_ref} | {n_set} | {fk.fid:.4g} | {fk.kid_mean:.3g} ± {fk.kid_std:.2g} | "
              f"{pr.precision:.3f} | {pr.recall:.3f} | {cas_text} |")
    print("\nseconds:")
    for k, v in timings.items():
        print(f"  {k}: {v:.2f}")


if __name__ == "__main__":
    main()
