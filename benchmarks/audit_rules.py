"""Issue 15: rarity rules compared offline on the same rows, from the features that
`benchmarks/audit_contrastive.py --dump` wrote (the VAE's latents and reconstruction errors, the contrastive
encoder's features in each readout, the pixels) for every data set under --out.

    python benchmarks/audit_rules.py --out bench-out/audit-contrastive [--results rules]

Nothing is trained here; every rule scores the fitted rows themselves (kNN rows leave themselves out). AUROC of
rarity for the rare group and its mean-weight ratio (weights tempered to ESS 0.5 n, as the audit does).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from audit_rarity import evaluate  # noqa: E402

from debias.density.rarity import fit_audit_rarity  # noqa: E402


def kth_distances(X: np.ndarray, ks: tuple[int, ...], cosine: bool) -> dict[int, np.ndarray]:
    """Distance to the k-th nearest other row for each k (rows left out of their own neighbourhood)."""
    x = torch.from_numpy(np.asarray(X, np.float32))
    if cosine:
        x = torch.nn.functional.normalize(x, dim=1)
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    d.fill_diagonal_(float("inf"))
    top = d.topk(max(ks), largest=False).values.sqrt().numpy()
    return {k: top[:, k - 1] for k in ks}


def robust_z(v: np.ndarray) -> np.ndarray:
    c = np.median(v)
    s = 1.4826 * np.median(np.abs(v - c))
    return (v - c) / (s if s > 0 else (v.std() or 1.0))


def rank(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v)) / (len(v) - 1)


def rules(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mu, recon = f["mu"], f["recon_error"]
    out: dict[str, np.ndarray] = {}
    shipped = fit_audit_rarity(mu, recon, embeddings=f["embedding_max"])
    out["default (shipped)"] = shipped.rarity
    z = shipped.components
    out["latent+recon (no encoder)"] = z["latent"] + z["reconstruction"]
    for readout in ("max", "maps-max", "avg"):
        E = f[f"embedding_{readout}"]
        d = kth_distances(E, (5, 10, 20, 50, 100), cosine=True)
        for k in (20, 50, 100):
            out[f"emb[{readout}] log d{k}"] = np.log(d[k])
        # how much farther the 50th neighbour is than the 10th: a group smaller than 50 rows ends between them
        out[f"emb[{readout}] log d50/d10"] = np.log(d[50] / d[10])
        out[f"emb[{readout}] log d100/d20"] = np.log(d[100] / d[20])
        if readout == "max":
            e = robust_z(E.shape[1] * np.log(d[50]))
            out["latent+recon+emb (recomputed)"] = z["latent"] + z["reconstruction"] + e
            out["recon+emb"] = z["reconstruction"] + e
            out["emb+latent"] = z["latent"] + e
            out["latent+recon+2emb"] = z["latent"] + z["reconstruction"] + 2 * e
            out["rank max(latent,recon,emb)"] = np.maximum.reduce([rank(z["latent"]), rank(z["reconstruction"]), rank(e)])
            out["rank mean(latent,recon,emb)"] = rank(z["latent"]) + rank(z["reconstruction"]) + rank(e)
    if "rotation_surprise" in f:
        rot = robust_z(f["rotation_surprise"])
        out["rotation surprise"] = rot
        out["default + rotation"] = shipped.rarity + rot
        out["emb + rotation"] = robust_z(np.log(kth_distances(f["embedding_max"], (50,), cosine=True)[50])) + rot
    P = f["pixels"]
    dp = kth_distances(P, (10, 20, 50), cosine=False)
    dm = kth_distances(mu, (10, 20, 50), cosine=False)
    e = robust_z(np.log(kth_distances(f["embedding_max"], (50,), cosine=True)[50]))
    for k in (20, 50):  # the latent term at the embedding term's scale: a group, not a single odd row
        out[f"latent k={k} + recon + emb"] = robust_z(np.log(dm[k])) + z["reconstruction"] + e
    out["default + pixels k=50"] = shipped.rarity + robust_z(np.log(dp[50]))
    out["recon + emb + pixels k=50"] = z["reconstruction"] + e + robust_z(np.log(dp[50]))
    for k in (20, 50):
        out[f"pixels log d{k}"] = np.log(dp[k])
    out["pixels log d50/d10"] = np.log(dp[50] / dp[10])
    out["latent log d50"] = np.log(dm[50])
    out["latent log d50/d10"] = np.log(dm[50] / dm[10])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/audit-contrastive"))
    ap.add_argument("--results", default="rules")
    args = ap.parse_args()
    results = {}
    for path in sorted(args.out.glob("*/features*.npz")):
        f = dict(np.load(path))
        rare, reference = f["rare"].astype(bool), f["reference"].astype(bool)
        results[path.parent.name + path.stem.removeprefix("features")] = {k: evaluate(r, rare, reference) for k, r in rules(f).items()}
    names = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    print("| rule | " + " | ".join(names) + " | F mean |")
    for k in keys:
        # the mean over the default models' rows (fmnist-C), not over variants (fmnist-C-rot1, ...)
        fm = [results[n][k]["auroc"] for n in names if re.fullmatch(r"fmnist-\d", n) and k in results[n]]
        cells = [f"{results[n][k]['auroc']:.3f}" if k in results[n] else "" for n in names]
        print(f"| {k} | " + " | ".join(cells) + f" | {np.mean(fm) if fm else float('nan'):.3f} |")
    (args.out / f"{args.results}.json").write_text(json.dumps({"command": " ".join(sys.argv), "cases": results},
                                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
