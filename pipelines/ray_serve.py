"""`debias serve --engine ray`: the novelty service as a Ray Serve application (service/ray_serve.py) on a local Ray
or a cluster, `--replicas` copies of the model behind Serve's HTTP proxy, until interrupted."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

from debias.errors import DebiasError
from debias.pipelines.ray_cluster import connect
from debias.pipelines.serve import check_serve_inputs


def run_ray_serve(
    host: str,
    port: int,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    address: str | None = None,
    num_cpus: int | None = None,
    **overrides: Any,
) -> None:
    """``overrides`` are :class:`service.settings.Settings` fields; those not given come from ``DEBIAS_*`` variables
    (read here, on the driver, and shipped to every replica)."""
    from debias.service.settings import Settings

    if replicas < 1:
        raise DebiasError(f"--replicas must be at least 1, got {replicas}")
    if gpus_per_replica < 0:
        raise DebiasError(f"--gpus-per-replica must be >= 0, got {gpus_per_replica}")
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    check_serve_inputs(settings)  # a one-line error now beats replicas that never become ready
    started = connect(address, num_cpus)
    try:
        from ray import serve

        from debias.service.ray_serve import build

        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(build(settings, replicas, gpus_per_replica), name="debias", route_prefix="/")
        except Exception as exc:  # Ray's own errors (port taken, a replica that cannot start) as one line
            raise DebiasError(f"Ray Serve could not start the service: {str(exc).strip().splitlines()[0][:300]}") from exc
        print(f"serving on http://{host}:{port} with {replicas} replica(s) (Ray Serve); Ctrl-C stops", flush=True)
        # SIGTERM (docker stop, systemd) stops as Ctrl-C does: through the clean-up below, not around it.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    finally:
        import ray
        from ray import serve

        try:
            if started and not address:  # a local Ray of our own: Serve and Ray go down with us
                serve.shutdown()
            else:  # a cluster (Serve detaches from this process): remove only our application
                serve.delete("debias")
        except Exception as exc:  # noqa: BLE001 - a failed clean-up must not hide the error that got us here
            print(f"warning: Ray Serve clean-up failed: {exc}", file=sys.stderr)
        if started:
            ray.shutdown()
