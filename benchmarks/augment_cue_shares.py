"""Issue 12, section 3: which cue do the synthetic images carry? For each protocol of
benchmarks/augment_cue_protocols.sh, the share of each class's synthetic images that carry the protocol's cue,
against the real training rows' shares. Group-balanced sampling needs the cue-conflicting images (the cue on the
class that rarely has it, or its absence on the class that mostly has it); augmentation can only help by adding them.

The cue of an image is read by a one-number detector, with its threshold fitted on the real training rows (whose cue
column is known; read here for evaluation only):
- tint: log(mean R / mean B); patch: closeness of the top-left 1/8 square to magenta; blur: the variance of the
  Laplacian (sharpness), low = blurred.

    .venv/bin/python benchmarks/augment_cue_shares.py --out bench-out/augcue --cues bench-out/cues
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

ON_VALUE = {"tint": "warm", "patch": "patch", "blur": "blur"}  # the cue column's value that the detector finds


def feature(protocol: str, path: Path) -> float:
    img = Image.open(path).convert("RGB")
    a = np.asarray(img, dtype=np.float64)
    if protocol == "tint":
        return float(np.log(a[..., 0].mean() + 1) - np.log(a[..., 2].mean() + 1))
    if protocol == "patch":
        s = max(1, a.shape[0] // 8)
        corner = a[:s, :s].reshape(-1, 3).mean(0)
        return -float(np.abs(corner - np.array([255.0, 0.0, 255.0])).mean())
    lap = np.asarray(img.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    return -float(lap.var())  # higher = blurrier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/augcue"))
    ap.add_argument("--cues", type=Path, default=Path("bench-out/cues"))
    ap.add_argument("--real-sample", type=int, default=2000)
    args = ap.parse_args()
    rows = ["| protocol | images | class | rows | share with the cue | detector accuracy on real rows |",
            "|---|---|---|---|---|---|"]
    for proto_dir in sorted(p for p in args.out.iterdir() if p.is_dir()):
        protocol = proto_dir.name
        root = args.cues / protocol
        if not (root / "manifest.csv").is_file():
            continue
        real = pd.read_csv(root / "manifest.csv")
        real = real[real["split"] == "train"]
        sample = real.sample(min(args.real_sample, len(real)), random_state=0).copy()
        sample["f"] = [feature(protocol, root / p) for p in sample["path"]]
        on = (sample["cue"] == ON_VALUE[protocol]).to_numpy()
        grid = np.quantile(sample["f"], np.linspace(0.01, 0.99, 197))
        threshold = max(grid, key=lambda t: ((sample["f"].to_numpy() > t) == on).mean())
        accuracy = float(((sample["f"].to_numpy() > threshold) == on).mean())
        shares = real.assign(on=real["cue"] == ON_VALUE[protocol]).groupby("gender")["on"].agg(["mean", "size"])
        for g, r in shares.iterrows():
            rows.append(f"| {protocol} | real training rows | {g} | {int(r['size'])} | {r['mean']:.1%} | – |")
        for name in ("gan", "cyclegan_female", "cyclegan_male"):
            d = proto_dir / name
            if not (d / "manifest.csv").is_file():
                continue
            syn = pd.read_csv(d / "manifest.csv")
            syn["on"] = [feature(protocol, d / p) > threshold for p in syn["path"]]
            for g, part in syn.groupby("gender"):
                rows.append(f"| {protocol} | {name} | {g} | {len(part)} | {part['on'].mean():.1%} | {accuracy:.3f} |")
    text = "\n".join(rows) + "\n"
    (args.out / "cue_shares.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
