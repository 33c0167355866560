"""Device choice and mixed precision, in one place so every loop does the same thing."""

from __future__ import annotations

import contextlib

import torch

from debias.errors import DebiasError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DebiasError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DebiasError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaling needed, unlike float16); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
