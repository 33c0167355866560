"""Issue 15: rarity rules compared offline on the same rows, from the features that
`benchmarks/audit_contrastive.py --dump` wrote (the VAE's latents and reconstruction errors, the contrastive
encoder's features in each readout, the pixels) for every data set under --out.

    python benchmarks/audit_rules.py --out bench-out/audit-contrastive [--results rules] [--with FILE.json ...]

Nothing is trained here; every rule scores the fitted rows themselves (kNN rows leave themselves out). AUROC of
rarity for the rare group and its mean-weight ratio (weights tempered to ESS 0.5 n, as the audit does); per
representation, the share of a rare row's 10 nearest rows that are rare (whether the group is its own
neighbourhood); and the best single method per data set chosen with hindsight, over these rules and the methods of
the result files given with ``--with`` (e.g. s17-fmnist.json pool.json). Writes OUT/RESULTS.json.
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

from audit_rarity import evaluate, nearest, purity, robust_z  # noqa: E402

from debias.density.rarity import fit_audit_rarity  # noqa: E402


def kth_distances(X: np.ndarray, ks: tuple[int, ...], cosine: bool) -> dict[int, np.ndarray]:
    """Distance to the k-th nearest other row for each k (rows left out of their own neighbourhood)."""
    top = nearest(X, max(ks), cosine)[0]
    return {k: top[:, k - 1] for k in ks}


def walk_group_rarity(X: np.ndarray, cosine: bool, steps: int, k: int = 10) -> np.ndarray:
    """-log of the effective size of the group a lazy random walk from each row spreads over in ``steps`` steps on
    the symmetric k-nearest-neighbour graph (1 / sum_j p_t(i, j)^2): a small group the walk cannot leave is rare."""
    n = len(X)
    adjacency = torch.zeros(n, n)
    adjacency.scatter_(1, torch.from_numpy(nearest(X, k, cosine)[1]), 1.0)
    adjacency = ((adjacency + adjacency.T) > 0).float()
    walk = (0.5 * (adjacency / adjacency.sum(1, keepdim=True) + torch.eye(n))).to_sparse()
    spread = torch.eye(n)
    for _ in range(steps):  # a sparse step at a time: k + 1 non-zeros a row, not n
        spread = torch.sparse.mm(walk, spread)
    return np.log((spread * spread).sum(1).numpy())


REPRESENTATIONS = {"encoder mean": ("embedding_avg", True), "encoder max": ("embedding_max", True),
                   "encoder maps-max": ("embedding_maps-max", True), "VAE latents": ("mu", False),
                   "pixels": ("pixels", False)}


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
    for label, (key, cosine) in (("emb[max]", ("embedding_max", True)), ("pixels", ("pixels", False))):
        for steps in (4, 16, 64):
            out[f"{label} walk group size, t={steps}"] = walk_group_rarity(f[key], cosine, steps)
    out["latent log d50"] = np.log(dm[50])
    out["latent log d50/d10"] = np.log(dm[50] / dm[10])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/audit-contrastive"))
    ap.add_argument("--results", default="rules")
    ap.add_argument("--with", dest="others", nargs="*", type=Path, default=[],
                    help="result files of audit_contrastive.py / audit_pool.py whose methods join the hindsight ceiling")
    args = ap.parse_args()
    results, purities = {}, {}
    for path in sorted(args.out.glob("*/features*.npz")):
        f = dict(np.load(path))
        rare, reference = f["rare"].astype(bool), f["reference"].astype(bool)
        name = path.parent.name + path.stem.removeprefix("features")
        results[name] = {k: evaluate(r, rare, reference) for k, r in rules(f).items()}
        purities[name] = {label: purity(f[key], rare, cosine) for label, (key, cosine) in REPRESENTATIONS.items()}
    names = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    print("AUROC of rarity for the rare group\n| rule | " + " | ".join(names) + " | F mean |")
    for k in keys:
        # the mean over the default models' rows (fmnist-C), not over variants (fmnist-C-rot1, ...)
        fm = [results[n][k]["auroc"] for n in names if re.fullmatch(r"fmnist-\d", n) and k in results[n]]
        cells = [f"{results[n][k]['auroc']:.3f}" if k in results[n] else "" for n in names]
        print(f"| {k} | " + " | ".join(cells) + f" | {np.mean(fm) if fm else float('nan'):.3f} |")
    print("\nShare of a rare row's 10 nearest rows that are rare\n| representation | " + " | ".join(names) + " |")
    for label in REPRESENTATIONS:
        print(f"| {label} | " + " | ".join(f"{purities[n][label]:.2f}" for n in names) + " |")
    # The best single method per data set, chosen with hindsight among everything measured on its rows
    ceiling = {n: {k: v["auroc"] for k, v in r.items()} for n, r in results.items()}
    for other in args.others:
        for n, row in json.loads(other.read_text())["cases"].items():
            for method, v in row.items():
                if isinstance(v, dict) and "auroc" in v:
                    ceiling.setdefault(n, {})[f"{other.stem}: {method}"] = v["auroc"]
    print("\nBest single method per data set, with hindsight")
    for n, row in ceiling.items():
        best = max(row, key=row.get)
        print(f"{n}: {row[best]:.3f} ({best}); {sum(v >= 0.98 for v in row.values())} of {len(row)} methods >= 0.98")
    (args.out / f"{args.results}.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "cases": results, "purity": purities,
         "ceiling": {n: max(row.items(), key=lambda kv: kv[1]) for n, row in ceiling.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
