"""Does a label-free contrastive encoder (SimCLR) see what the VAE does not? A probe for issues 15 and 16, not a
shipped method: kNN distances in a small SimCLR encoder's features against kNN on pixels, on the same images.

    # issue 16: Fashion-MNIST, one class held out of training (2,000 training images of each other class), the
    # 10,000 test images scored, the held-out class as OOD
    OMP_NUM_THREADS=2 python benchmarks/contrastive_probe.py near-ood --classes 0,1,2,3,4,5,6,7,8,9 --json out.json
    # issue 16's far pair: trained on 20,000 Fashion-MNIST training images (all classes), FMNIST test (in) against
    # the MNIST test digits (OOD); --classes is ignored
    OMP_NUM_THREADS=2 python benchmarks/contrastive_probe.py far --json out.json
    # issue 15: 2,000 training images with one class cut to 20 rows (1 %), the other nine at 220; rarity of the cut
    # class among the images the encoder was trained on (leave-one-out kNN)
    OMP_NUM_THREADS=2 python benchmarks/contrastive_probe.py audit --classes 0,1,2,3,4,5,6,7,8,9 --json out.json
    # issue 15's UTKFace row: the train split (8,978 faces, 32 px, RGB; no brightness/contrast jitter, which would
    # teach the encoder to ignore skin tone), rarity of the black faces (2.7 %) against the white ones
    OMP_NUM_THREADS=2 python benchmarks/contrastive_probe.py utkface --steps 1000 --json out.json

The encoder: five 3x3 convolutions (32-64-64-128-128 channels, batch norm), mean-pooled to 128 features, a 2-layer
projection head; NT-Xent (temperature 0.2) between two augmented views (random resized crop of 60-100 % of the area,
horizontal flip, brightness and contrast jitter), Adam with a one-cycle schedule, bf16 autocast where the CPU has it.
kNN: cosine distance to the k-th nearest training image in the encoder's 128 features (not the projection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debias.data.idx import read_idx  # noqa: E402
from debias.runtime.device import cpu_has_bf16  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
KS = (1, 5, 20, 50)


def load(folder: str, split: str) -> tuple[torch.Tensor, np.ndarray]:
    x, _ = read_idx(f"{folder}/{split}-images-idx3-ubyte.gz")
    y, _ = read_idx(f"{folder}/{split}-labels-idx1-ubyte.gz")
    return torch.from_numpy(np.array(x)).float().div(255).unsqueeze(1), np.asarray(y)


class Encoder(nn.Module):
    def __init__(self, width: int = 32, channels: int = 1) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*block(channels, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
                                      *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.projection = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def augment(x: torch.Tensor, g: torch.Generator, jitter: bool = True) -> torch.Tensor:
    """SimCLR's views: random resized crop (60-100 % of the area, aspect 3/4-4/3), flip, brightness/contrast jitter."""
    n = x.shape[0]
    side = torch.empty(n).uniform_(0.6, 1.0, generator=g).sqrt()
    aspect = torch.exp(torch.empty(n).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g)).sqrt()
    sx, sy = side * aspect, side / aspect
    flip = (torch.rand(n, generator=g) < 0.5).float() * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx * flip, sy
    theta[:, 0, 2] = (torch.rand(n, generator=g) * 2 - 1) * (1 - sx).clamp_min(0)
    theta[:, 1, 2] = (torch.rand(n, generator=g) * 2 - 1) * (1 - sy).clamp_min(0)
    out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    if not jitter:
        return out
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=g)
    brightness = torch.empty(n, 1, 1, 1).uniform_(-0.2, 0.2, generator=g)
    return (out * contrast + brightness * out.gt(0.02)).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's loss (Chen et al. 2020, Eq. 1): each view's partner against the other 2N - 2 views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_encoder(x: torch.Tensor, steps: int, batch: int, seed: int, jitter: bool = True) -> Encoder:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Encoder(channels=x.shape[1])
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    bf16 = cpu_has_bf16()
    t0, step, order = time.perf_counter(), 0, torch.empty(0, dtype=torch.long)
    model.train()
    while step < steps:
        if len(order) < batch:
            order = torch.randperm(len(x), generator=g)
        xb, order = x[order[:batch]], order[batch:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z1 = model.projection(model(augment(xb, g, jitter)))
            z2 = model.projection(model(augment(xb, g, jitter)))
        loss = nt_xent(z1.float(), z2.float(), 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step in (10, steps):
            rate = step / (time.perf_counter() - t0)
            print(f"    step {step}/{steps}, loss {loss.item():.3f}, ETA {(steps - step) / rate:.0f} s", flush=True)
    return model.eval()


@torch.no_grad()
def embed(model: Encoder, x: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 1024):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_bf16()):
            out.append(model(x[i : i + 1024]).float())
    return F.normalize(torch.cat(out), dim=1)


def kth_distances(
    ref: torch.Tensor, query: torch.Tensor, leave_self_out: bool, ks: tuple[int, ...] = KS
) -> dict[int, np.ndarray]:
    """Distance to the k-th nearest reference row for each k in ks (squared Euclidean = 2 - 2 cos on unit rows)."""
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    ref_sq = (ref**2).sum(1)
    for i in range(0, len(query), 2048):
        q = query[i : i + 2048]
        d = ((q**2).sum(1, keepdim=True) + ref_sq - 2 * q @ ref.T).clamp_min(0)
        d = d.topk(max(ks) + int(leave_self_out), dim=1, largest=False).values[:, int(leave_self_out) :]
        for k in ks:
            out[k].append(d[:, k - 1])
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def utkface(args: argparse.Namespace) -> dict:
    from debias.api import load_images

    data = load_images(Path(args.utkface) / "manifest.csv", where={"split": "train"}, image_size=32)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(255)
    race = data.table["race"].to_numpy()
    keep = np.isin(race, ["black", "white"])
    labels = (race[keep] == "black").astype(int)
    steps = args.steps or 15 * len(x) // args.batch
    print(f"utkface: {len(x)} training faces, {labels.sum()} black, {steps} steps", flush=True)
    model = train_encoder(x, steps, args.batch, args.seed, jitter=False)
    row = {}
    for name, feats in (("simclr", embed(model, x)), ("pixels", x.flatten(1))):
        for k, d in kth_distances(feats, feats, leave_self_out=True, ks=(5, 50, 200, 400)).items():
            row[f"{name} k={k}"] = float(roc_auc_score(labels, d[keep]))
    print("utkface, black against white: " + ", ".join(f"{n} {v:.3f}" for n, v in row.items()), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("near-ood", "far", "audit", "utkface"))
    ap.add_argument("--utkface", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"))
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--fmnist", default=FMNIST)
    ap.add_argument("--mnist", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: 15 epochs of the training images)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    if args.mode == "utkface":
        results["utkface"] = utkface(args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    xtr, ytr = load(args.fmnist, "train")
    xte, yte = load(args.fmnist, "t10k")
    if args.mode == "far":
        mnist, _ = load(args.mnist, "t10k")
    for c in (int(c) for c in args.classes.split(",")) if args.mode != "far" else ["mnist"]:
        rng = np.random.default_rng(args.seed)
        if args.mode == "far":
            rows = rng.choice(len(xtr), 20000, replace=False)
        elif args.mode == "near-ood":
            rows = np.concatenate([rng.choice(np.flatnonzero(ytr == k), 2000, replace=False) for k in range(10) if k != c])
        else:
            rows = np.concatenate([rng.choice(np.flatnonzero(ytr == k), 20 if k == c else 220, replace=False)
                                   for k in range(10)])  # fmt: skip
        x = xtr[rows]
        steps = args.steps or 15 * len(x) // args.batch
        print(f"class {c}: {len(x)} training images, {steps} steps", flush=True)
        model = train_encoder(x, steps, args.batch, args.seed)
        if args.mode == "far":
            query = torch.cat([xte, mnist])
            labels, leave_self_out = np.r_[np.zeros(len(xte)), np.ones(len(mnist))].astype(int), False
            views = {"simclr": (embed(model, x), embed(model, query)), "pixels": (x.flatten(1), query.flatten(1))}
        elif args.mode == "near-ood":
            labels, leave_self_out = (yte == c).astype(int), False
            views = {"simclr": (embed(model, x), embed(model, xte)), "pixels": (x.flatten(1), xte.flatten(1))}
        else:
            labels, leave_self_out = (ytr[rows] == c).astype(int), True
            views = {"simclr": (embed(model, x),) * 2, "pixels": (x.flatten(1),) * 2}
        row = {}
        for name, (ref, query) in views.items():
            for k, d in kth_distances(ref, query, leave_self_out).items():
                row[f"{name} k={k}"] = float(roc_auc_score(labels, d))
        results[str(c)] = row
        print(f"class {c}: " + ", ".join(f"{n} {v:.3f}" for n, v in row.items()), flush=True)
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.replace(args.json)
    names = list(next(iter(results.values())))
    print("mean over classes: " + ", ".join(f"{n} {np.mean([r[n] for r in results.values()]):.3f}" for n in names))


if __name__ == "__main__":
    main()
