"""Issue 12, session 8: three more label-free error signals, each trained and compared by seed with the stored runs.

    OMP_NUM_THREADS=1 python benchmarks/error_signal_attempts.py lff        blur,natural,tint,patch 0 [--first gce]
    OMP_NUM_THREADS=1 python benchmarks/error_signal_attempts.py bias-only  blur,natural,tint,patch 0 [--weighting jtt]
    OMP_NUM_THREADS=1 python benchmarks/error_signal_attempts.py last-layer blur,natural,tint,patch 0

The question behind all three: which signal tells a shortcut's exceptions (blurred male faces) from hard examples
(the faces any model gets wrong), so that the first are upweighted and natural data are left alone?

- ``lff``: LfF's relative difficulty (Nam et al., NeurIPS 2020, Eq. 3) at epoch granularity (now `--reweight lff`,
  debias.training.sampling.RelativeDifficulty; this driver also tries ``--first ce`` and other ``--mix``). A biased first model B
  (``--first gce``: generalized cross-entropy, LfF's bias amplifier; or ``ce``) is trained 4 epochs and frozen. At the
  start of every epoch of the second model D, each row gets w = L_B / (L_B + L_D) (LfF's EMA of D's losses, each loss
  divided by its class maximum); half of each class's draws follow w, half are uniform. A row B gets wrong and D gets
  right weighs most; a row both get wrong (a hard face) weighs about half as much.
- ``bias-only``: a first model too small to learn faces (``--width 8``, 4 GCE epochs): it can learn only the easiest
  cue, so its errors should be that cue's exceptions, and on data without a cue its errors should spread over all
  rows. Its errors are upweighted as JTT does (``--weighting jtt``), or as the default does, error rate per k-means
  cluster of its features (``cluster``), or its features carry a kNN inverse density alone (``rarity``, no error
  signal: the density-only target).
- ``last-layer``: AFR (Qiu et al., ICML 2023): the stored ERM model's features are kept and only the last layer is
  refitted (logistic regression) with w ∝ exp(-gamma p(y|x)) per class; gamma in 0-32. No second training.

Label-free: only the training label, the first model and the images reach the weights and the epoch choice (the
validation rows are weighted by the first model's errors, half per class, as the default's selection). The group
columns are read for the evaluation only. Needs the protocols (benchmarks/cue_protocols.py) in bench-out/debias/cues/
and the stored 5-seed runs of benchmarks/debias_protocols.sh (ERM, oracle, JTT, cluster-errors) in
bench-out/debias/PROTOCOL/runs/. Models go to /tmp/error_signal_attempts/. docs/benchmarks.md, "Session 8".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from debias.data import load_images
from debias.data.splits import validation_split
from debias.data.tensors import ImageTensor
from debias.density.estimators import KNNDensity
from debias.training.classifier import (
    ClassifierTrainConfig,
    load_classifier,
    predict_proba,
    row_losses,
    train_classifier,
)
from debias.training.sampling import (
    ClassRarity,
    ClusterErrorWeights,
    Fixed,
    RelativeDifficulty,
    Uniform,
    encode_features,
    jtt_upweight_auto,
    jtt_weights,
    mix_within_classes,
)
from debias.training.vae import encode_labels, vae_config

RUNS = Path("bench-out/debias")
MODELS = Path("/tmp/error_signal_attempts")


def protocol(name: str):
    man = RUNS / "cues" / name / "manifest.csv"
    data = load_images(str(man), where=["split=train"], image_size=32, progress=False)
    test = load_images(str(man), where=["split=test"], image_size=32, progress=False)
    y, classes = encode_labels(data.table["gender"])
    y_test, _ = encode_labels(test.table["gender"], classes)
    if name == "natural":
        test_groups = (test.table["race"] + " x " + test.table["gender"]).to_numpy()
        train_groups = None
    else:
        test_groups, train_groups = test.table["group"].to_numpy(), data.table["group"].to_numpy()
    return data, test, y, y_test, classes, test_groups, train_groups


def reference(name: str, seed: int) -> dict[str, dict]:
    return {m: json.loads((RUNS / name / "runs" / m / f"seed{seed}" / "metrics.json").read_text())
            for m in ("none", "oracle", "jtt", "cluster-errors")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("attempt", choices=["lff", "bias-only", "last-layer"])
    ap.add_argument("protocols")
    ap.add_argument("seeds")
    ap.add_argument("--first", default="gce", choices=["gce", "ce"], help="lff: the biased model's loss")
    ap.add_argument("--mix", type=float, default=0.5, help="lff: share of each class's draws that follows w")
    ap.add_argument("--width", type=int, default=8, help="bias-only: width of the small first model")
    ap.add_argument("--first-epochs", type=int, default=4)
    ap.add_argument("--weighting", default="jtt", choices=["jtt", "cluster", "rarity"], help="bias-only")
    ap.add_argument("--out", type=Path, default=None, help="also append every row as a JSON line to this file")
    args = ap.parse_args()
    rows = []
    for name in args.protocols.split(","):
        data, test, y, y_test, classes, test_groups, train_groups = protocol(name)
        for seed in map(int, args.seeds.split(",")):
            fit, val = validation_split(y, 0.1, seed)
            tr, va, te = ImageTensor(data, fit), ImageTensor(data, val), ImageTensor(test)
            ref = reference(name, seed)
            worst = {m: r["worst_group_accuracy"] for m, r in ref.items()}
            gap = lambda v: (v - worst["none"]) / (worst["oracle"] - worst["none"])  # noqa: E731
            base = MODELS / name / f"seed{seed}"
            cfg = vae_config(image_size=32, channels=3, latent_dim=32, beta=1.0, width=16, n_classes=2,
                             classes=classes, vae_class=None)
            results: list[tuple[str, np.ndarray, np.ndarray | None]] = []  # (variant, test predictions, weights)
            if args.attempt == "last-layer":
                from sklearn.linear_model import LogisticRegression

                model, _ = load_classifier(RUNS / name / "runs" / "none" / f"seed{seed}")
                feats, feats_test = encode_features(model, tr.batch, len(tr)), encode_features(model, te.batch, len(te))
                mu, sd = feats.mean(0), feats.std(0) + 1e-6
                p_y = predict_proba(model, tr)[np.arange(len(fit)), y[fit]]
                for gamma in (0, 2, 4, 8, 16, 32):
                    w = mix_within_classes(np.exp(-gamma * p_y), y[fit], 1.0)
                    head = LogisticRegression(C=0.1, max_iter=2000).fit((feats - mu) / sd, y[fit], sample_weight=w * len(w))
                    results.append((f"gamma {gamma}", head.predict((feats_test - mu) / sd), w))
            else:
                small = args.attempt == "bias-only"
                loss = "gce" if small else args.first
                first_cfg = vae_config(image_size=32, channels=3, latent_dim=32, beta=1.0,
                                       width=args.width if small else 16, n_classes=2, classes=classes, vae_class=None)
                first = train_classifier(
                    first_cfg, ClassifierTrainConfig(epochs=args.first_epochs, seed=seed, select="last", objective=loss),
                    tr, y[fit], Uniform(len(fit)), base / f"first_w{first_cfg.width}_{loss}{args.first_epochs}",
                    meta={"attempt": "first"}, progress=False, resume=True)
                err = predict_proba(first.model, tr).argmax(1) != y[fit]
                err_val = predict_proba(first.model, va).argmax(1) != y[val]
                if args.attempt == "lff":
                    scheme = RelativeDifficulty(row_losses(first.model, tr, y[fit]),
                                                lambda model: row_losses(model, tr, y[fit]), y[fit], mix=args.mix)
                    w_val = mix_within_classes(err_val.astype(float), y[val], args.mix)
                    variant = f"lff {loss} mix {args.mix:g}"
                elif args.weighting == "jtt":
                    w, w_val = jtt_weights(err, jtt_upweight_auto(err)), jtt_weights(err_val, jtt_upweight_auto(err_val))
                elif args.weighting == "cluster":
                    feats, feats_val = encode_features(first.model, tr.batch, len(tr)), encode_features(first.model, va.batch, len(va))
                    est = ClusterErrorWeights(8, 32, seed=seed).fit(feats, y[fit], err)
                    w, w_val = est.weights_, est.weights(feats_val, y[val])
                else:
                    feats, feats_val = encode_features(first.model, tr.batch, len(tr)), encode_features(first.model, va.batch, len(va))
                    est = ClassRarity(lambda n_rows: KNNDensity(n_neighbors=20, n_components=32), target_ess=0.25).fit(feats, y[fit])
                    w, w_val = est.weights_, est.weights(feats_val, y[val])
                if args.attempt == "bias-only":
                    scheme = Fixed("bias-only", w)
                    variant = f"bias-only width {args.width} {args.weighting}"
                second = train_classifier(cfg, ClassifierTrainConfig(epochs=8, seed=seed), tr, y[fit], scheme,
                                          base / variant.replace(" ", "_"), val=va, y_val=y[val], val_weights=w_val,
                                          meta={"attempt": variant}, progress=False)
                results.append((variant, predict_proba(second.model, te).argmax(1), second.mean_weights))
            for variant, pred, w in results:
                ok = pd.Series(pred == y_test)
                row = {"protocol": name, "seed": seed, "variant": variant, "accuracy": ok.mean(),
                       "worst": ok.groupby(test_groups).mean().min(), "gap": gap(ok.groupby(test_groups).mean().min()),
                       "gap_jtt": gap(worst["jtt"]), "gap_default": gap(worst["cluster-errors"]),
                       "accuracy_erm": ref["none"]["accuracy"], "ess": float(1 / ((w / w.sum()) ** 2).sum() / len(w))}
                if name == "natural":
                    row["worst_race"] = ok.groupby(test.table["race"].to_numpy()).mean().min()
                if train_groups is not None:  # the share of the draws per group, for the table (read after training)
                    row["shares"] = pd.Series(w / w.sum()).groupby(train_groups[fit]).sum().round(3).to_dict()
                rows.append(row)
                line = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
                print(line, flush=True)
                if args.out is not None:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with args.out.open("a") as f:
                        f.write(line + "\n")
    df = pd.DataFrame(rows)
    cols = ["accuracy", "worst", "gap", "gap_jtt", "gap_default", "accuracy_erm", "ess"]
    print(df.groupby(["protocol", "variant"], sort=False)[cols].mean().round(3).to_string())


if __name__ == "__main__":
    main()
