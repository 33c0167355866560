"""Issue 15: does the kNN scale decide whether a small, tight group looks rare? For k in 5-400: AUROC / mean-weight
ratio of the distance to the k-th neighbour, in the standardised latents of the stored audit_rarity.py models
(seed 0, the baseline settings) and on pixels.

    OMP_NUM_THREADS=1 python benchmarks/audit_rarity_k_scale.py fmnist-0,fmnist-1,...,fmnist-9,shapes,spurious

A cut Fashion-MNIST class has 20 rows: with k < 20 a compact class is its own neighbourhood and looks dense; the
question is whether a larger k makes it rare. Needs bench-out/audit15/runs/ from benchmarks/audit_rarity.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from audit_rarity import datasets, evaluate  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from debias.density.encoding import encode_images  # noqa: E402
from debias.training.vae import load_model  # noqa: E402

names = sys.argv[1].split(",")
ks = [5, 20, 50, 100, 200, 400]
for name, (data, rare, ref, ep) in datasets([n.split("-")[0] for n in names], 32, tuple(int(n.split("-")[1]) for n in names if n.startswith("fmnist"))).items():
    model, _ = load_model(f"bench-out/audit15/runs/{name}_s32_l32_b1_seed0", "cpu")
    enc = encode_images(model, data, progress=False)
    Z = enc.mu
    pix = np.asarray(data.images, dtype=np.float32).reshape(len(data), -1) / 255.0
    out = []
    for label, X in (("latent", (Z - Z.mean(0)) / (Z.std(0) + 1e-9)), ("pixels", pix)):
        nn = NearestNeighbors(n_neighbors=max(ks) + 1).fit(X)
        d, _ = nn.kneighbors(X)
        row = []
        for k in ks:
            r = np.log(d[:, k] + 1e-12)  # k-th neighbour excluding itself
            e = evaluate(r, rare, ref)
            row.append(f"k{k}:{e['auroc']:.2f}/{e['weight_ratio']:.1f}")
        out.append(f"{label}: " + " ".join(row))
    print(name, f"rare {rare.sum()} of {len(rare)} |", " | ".join(out), flush=True)
