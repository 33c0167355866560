"""debias: find what an image dataset is missing, reweight training towards it, and flag novel inputs.

The Python API (see the README's "Python API"):

    import debias
    imgs = debias.load_images("faces/manifest.csv", where={"split": "train"}, image_size=64)
    vae = debias.train_vae(imgs, out="runs/faces", epochs=10, latent_dim=32)
    audit = debias.RarityAudit(vae).fit(imgs)
    det = debias.NoveltyDetector(vae, encoder=debias.load_encoder("runs/faces"), target_fpr=0.05).fit(imgs)

Names are imported on first use, so ``import debias`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_images": "debias.api",
    "train_vae": "debias.api",
    "load_vae": "debias.api",
    "load_encoder": "debias.api",
    "RarityAudit": "debias.api",
    "NoveltyDetector": "debias.api",
    "ImageSet": "debias.data.imageset",
    "LatentHistogramDensity": "debias.density.estimators",
    "KNNDensity": "debias.density.estimators",
    "PixelDensity": "debias.density.novelty",
    "DebiasError": "debias.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'debias' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
