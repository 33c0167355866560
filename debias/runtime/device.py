"""Device choice and mixed precision, in one place so every loop does the same thing."""

from __future__ import annotations

import contextlib
import functools
import re

import torch

from debias.errors import DebiasError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise DebiasError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DebiasError(f"--device {name} was asked for, but no CUDA device is available")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise DebiasError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")
_precision = "auto"  # set once per process by the CLI (--precision) or by set_precision()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX-512-BF16), read from /proc/cpuinfo (Linux only; other
    systems report False, so ``auto`` keeps them on float32). Read once per process: every model call asks (the
    service's single-image batches spent 0.4 ms a call reading the file)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def set_precision(name: str) -> None:
    """``auto`` (bfloat16 on CPUs with AMX or AVX-512-BF16 except in classifier training, float32 elsewhere, CUDA
    included), ``fp32`` or ``bf16``: the precision of every forward pass in this process. Losses, KL terms, densities
    and calibration stay float32: the loops cast the model's outputs before they use them."""
    global _precision
    if name not in PRECISIONS:
        raise DebiasError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        raise DebiasError("--precision bf16: this CPU has neither AMX nor AVX-512-BF16 (use auto or fp32)")
    _precision = name


def precision_setting() -> str:
    """The current :func:`set_precision` value (``auto``, ``fp32`` or ``bf16``): what a worker process of this job
    (a Ray actor) sets for itself, since the setting belongs to the process."""
    return _precision


# Classifier training (train-classifier, compare: the model, its first model and the weights' forward passes) stays
# fp32 under ``auto``. Measured on an AVX-512-BF16 CPU, tint protocol, the default method, 10 seeds paired: bf16 gave
# accuracy -1.0 +- 0.7 (SE) and worst group -4.0 +- 3.1 (SE) points against fp32, for 1.1-1.4x the speed; issue 12's
# results were all measured at fp32 (docs/benchmarks.md, "Session 12: bfloat16"). ``--precision bf16`` still applies.
CLASSIFIER_BF16_WHEN_AUTO = False


def effective_precision(device: torch.device, *, bf16_when_auto: bool = True) -> str:
    """"bf16" or "fp32": what :func:`autocast` does on ``device`` under the current setting. ``bf16_when_auto=False``:
    this pass stays fp32 under ``auto`` (a loop whose results were not shown to hold at bf16); ``--precision bf16``
    still applies.

    The precision never depends on the batch size, although bf16 is slower than fp32 for a few images per call on an
    AVX-512-BF16 CPU (one image 0.76-0.81x): an image's score must not depend on its batch mates, and the service
    batches requests as they come (docs/benchmarks.md, "Session 12: bfloat16")."""
    if _precision == "fp32":
        return "fp32"
    if _precision == "bf16":
        return "bf16"
    if not bf16_when_auto:
        return "fp32"
    if device.type == "cuda":
        # Measured on an H200 (docs/benchmarks.md, "GPU checks"): at debias's model sizes a step is bound by kernel
        # launches, not arithmetic, and autocast's casts only add kernels: bf16 trained at 0.77x the images/s of fp32
        # (whose convolutions cuDNN already runs in TF32 on the tensor cores) and encoded at 0.97x.
        return "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, *, bf16_when_auto: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast where :func:`effective_precision` says so (no loss scaling needed, unlike float16); full
    precision otherwise."""
    if effective_precision(device, bf16_when_auto=bf16_when_auto) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
