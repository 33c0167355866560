"""`debias serve`: the novelty service (service/) under uvicorn: one process with one model-owner thread, or with
``workers`` > 1 that many processes behind one port, each owning a copy of the model.

Several workers share the port through uvicorn's supervisor (the kernel spreads connections over them). Each builds
its app from ``DEBIAS_*`` variables, which this module sets from the options; the novelty detector is fitted once
here first, so that the workers load ``novelty.pt`` instead of each fitting it. ``/metrics`` and the drift window
are per worker: a scrape or a drift reading reaches one of them (docs/benchmarks.md, issue 17)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Any

from debias.errors import DebiasError
from debias.training.vae import load_model


def run_serve(host: str, port: int, log_level: str = "info", workers: int = 1, **overrides: Any) -> None:
    """Check the model loads (a one-line error now beats a failed /readyz later), then serve until interrupted.

    ``overrides`` are :class:`service.settings.Settings` fields; those not given come from ``DEBIAS_*`` variables.
    """
    import uvicorn
    from pydantic import ValidationError

    from debias.service.app import create_app
    from debias.service.settings import Settings

    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # one line, naming the setting (DEBIAS_<NAME> or the option)
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise DebiasError(f"invalid setting {where}: {first['msg']}") from None
    check_serve_inputs(settings)
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, workers=1, access_log=False)
        return
    if settings.fit_data is None:
        from debias.density.detector import open_detector

        open_detector(settings.model_dir, progress=log_level in ("info", "debug", "trace"))  # fitted once, here
    for name, value in overrides.items():  # the workers read their settings from the environment
        if value is not None:
            os.environ[f"DEBIAS_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    uvicorn.run("debias.service.app:create_app", factory=True, host=host, port=port, log_level=log_level, workers=workers,
                access_log=False)


def check_serve_inputs(settings: Any) -> None:
    """The model loads and the audit folder holds an audit: a one-line error now beats a failed /readyz later."""
    load_model(settings.model_dir, "cpu")
    if settings.audit_dir is not None and not (settings.audit_dir / "scores.parquet").is_file():
        raise DebiasError(f"--audit {settings.audit_dir}: no audit there (scores.parquet missing; run 'debias audit')")


def _port(host: str, preferred: int) -> int:
    """``preferred`` when it is free, else one the kernel picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise DebiasError(f"cannot listen on {host}")


def _can_show_a_browser() -> bool:
    # Without a display, webbrowser would start a console browser (lynx, w3m) in this terminal, on top of the log.
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve_audit(model: Path, audit_dir: Path, device: str = "auto", host: str = "127.0.0.1", port: int = 8000) -> None:
    """`debias audit --open`: serve the model and the audit just written, print the URL of /audit, open it."""
    port = _port(host, port)
    url = f"http://{host}:{port}/audit"
    print(f"audit browser at {url} (scoring page at http://{host}:{port}/); Ctrl+C stops it", flush=True)
    if _can_show_a_browser():
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()  # by then uvicorn listens
    run_serve(host, port, log_level="warning", model_dir=model, audit_dir=audit_dir, device=device)
