"""Getting a Ray to run on, for the `--engine ray` jobs (pipelines/ray_audit.py, pipelines/ray_serve.py).

Ray is an optional extra (`pip install "debias[ray]"`): it is imported here, lazily, and nowhere in debias/.
"""

from __future__ import annotations

import logging
from typing import Any

from debias.errors import DebiasError


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra
    except ImportError:
        raise DebiasError('the ray engine needs Ray: pip install "debias[ray]"') from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray this process already has, the cluster at ``address`` ("auto", "HOST:6379", "ray://HOST:10001"),
    or a new local Ray with ``num_cpus`` CPUs (default: all of this machine), without its dashboard.

    True if this call started or joined one (the caller shuts it down), False if one was already there (a test's,
    a notebook's), which is then left running."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    # Ray Data logs every dataset's execution plan at INFO; the jobs show their own progress instead.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DebiasError(f"cannot start or reach {where}: {first}") from None
    return True
