"""`debias serve`: the novelty service (service/) under uvicorn, one process, one model-owner thread."""

from __future__ import annotations

from typing import Any

from debias.training import load_model


def run_serve(host: str, port: int, log_level: str = "info", **overrides: Any) -> None:
    """Check the model loads (a one-line error now beats a failed /readyz later), then serve until interrupted.

    ``overrides`` are :class:`service.settings.Settings` fields; those not given come from ``DEBIAS_*`` variables.
    """
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    load_model(settings.model_dir, "cpu")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, workers=1, access_log=False)
