"""Write the shortcut-cue protocols of the debiasing benchmark (issue 12) from the UTKFace faces in ../shared.

Each protocol is a copy of UTKFace's train/test split, resized to 64 px, with one visual cue planted. In the training
rows the cue goes with the label (gender): it is put on a fraction ``--corr`` of one class and on 1 - corr of the
other, so a classifier can read the cue instead of the face. In the test rows the cue is put on half of every class
at random, independently of gender. The groups the evaluation reads are cue x gender (column ``group``); training
never reads them (``cue`` and ``group`` are only named by ``--eval-groups`` and the oracle reference).

    tint     a warm colour cast (RGB x 1.0/0.82/0.62) on the cued faces, a cool one (x 0.62/0.82/1.0) on the
             others; cued class: female (the protocol the issue measured)
    patch    a small magenta square (1/8 of the side) in the top-left corner, a local cue; cued class: male
    blur     a Gaussian blur (radius 2.5 px at 64 px), a texture / frequency cue; cued class: female
    natural  no cue at all: the control (groups = race), where no method may hurt

    python benchmarks/cue_protocols.py --out bench-out/cues            # all four, ~1 min on 2 cores
    python benchmarks/cue_protocols.py --out bench-out/cues --only tint

Writes OUT/PROTOCOL/manifest.csv (path, age, gender, race, split, cue, group) and OUT/PROTOCOL/images/*.png. The
images are generated, never committed (they are derived from UTKFace, research use only).
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "utkface" / "manifest.csv"
SIZE = 64
WARM = np.array([1.0, 0.82, 0.62], dtype=np.float32)
COOL = np.array([0.62, 0.82, 1.0], dtype=np.float32)
# protocol -> (class that carries the cue in training, cue name, name of the absent cue)
PROTOCOLS = {
    "tint": ("female", "warm", "cool"),
    "patch": ("male", "patch", "none"),
    "blur": ("female", "blur", "sharp"),
    "natural": (None, "", ""),
}


def apply_cue(img: Image.Image, protocol: str, cued: bool) -> Image.Image:
    if protocol == "tint":
        x = np.asarray(img, dtype=np.float32) * (WARM if cued else COOL)
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    if protocol == "patch" and cued:
        x = np.asarray(img).copy()
        side = SIZE // 8
        x[1 : 1 + side, 1 : 1 + side] = (255, 0, 255)
        return Image.fromarray(x)
    if protocol == "blur" and cued:
        return img.filter(ImageFilter.GaussianBlur(2.5))
    return img


def _write(args: tuple[str, str, str, bool]) -> None:
    src, dst, protocol, cued = args
    if os.path.exists(dst):
        return
    with Image.open(src) as im:
        img = im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    tmp = dst + ".tmp.png"
    apply_cue(img, protocol, cued).save(tmp)
    os.replace(tmp, dst)


def build(protocol: str, table: pd.DataFrame, root: Path, out: Path, corr: float, seed: int, pool) -> None:
    cued_class, on, off = PROTOCOLS[protocol]
    rng = np.random.default_rng([seed, list(PROTOCOLS).index(protocol)])
    t = table.copy()
    if cued_class is None:
        t["cue"] = "none"
        t["group"] = t["race"].astype(str) + " " + t["gender"].astype(str)
        cued = np.zeros(len(t), dtype=bool)
    else:
        train = (t["split"] == "train").to_numpy()
        p = np.where(t["gender"].to_numpy() == cued_class, corr, 1.0 - corr)
        p = np.where(train, p, 0.5)  # test: the cue is independent of the label
        cued = rng.random(len(t)) < p
        t["cue"] = np.where(cued, on, off)
        t["group"] = t["cue"] + " " + t["gender"].astype(str)
    folder = out / protocol
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:05d}.png" for i in range(len(t))]
    jobs = [(str(root / p), str(folder / n), protocol, bool(c)) for p, n, c in zip(t["path"], names, cued)]
    list(pool.map(_write, jobs, chunksize=64))
    t["source_path"] = t["path"]
    t["path"] = names
    tmp = folder / "manifest.csv.tmp"
    t.to_csv(tmp, index=False)
    os.replace(tmp, folder / "manifest.csv")
    counts = t.groupby(["split", "group"]).size().unstack(0)
    print(f"{protocol}: {folder / 'manifest.csv'}\n{counts.to_string()}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, default=DEFAULT)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    ap.add_argument("--corr", type=float, default=0.95, help="share of the cued class that carries the cue (train)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.manifest.is_file():
        raise SystemExit(f"error: no UTKFace manifest at {args.manifest} (pass --manifest)")
    table = pd.read_csv(args.manifest)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for protocol in args.only:
            build(protocol, table, args.manifest.parent, args.out, args.corr, args.seed, pool)


if __name__ == "__main__":
    main()
