"""The FastAPI application: ``create_app(Settings)``; `debias serve` runs it under uvicorn.

Also ``uvicorn --factory service.app:create_app`` with the settings in ``DEBIAS_*`` environment variables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from debias import __version__
from debias.service.audit_data import AuditStore
from debias.service.engine import ScoringEngine, Submit
from debias.service.errors import install_error_handlers
from debias.service.middleware import (
    ApiKeyGateMiddleware,
    BodyLimitsMiddleware,
    RequestMetricsMiddleware,
    SecurityHeadersMiddleware,
)
from debias.service.prometheus_metrics import ServiceMetrics
from debias.service.routes import ops, v1
from debias.service.settings import Settings
from debias.service.web import audit_api, pages, static_files


def create_app(settings: Settings | None = None, submit: Submit | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()  # type: ignore[call-arg]
    metrics = ServiceMetrics()
    engine = ScoringEngine(settings, metrics, submit)  # submit: see service/engine.py (Ray Serve passes its own)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(
        title="debias novelty service",
        version=__version__,
        summary="Flags images unlike the training data, with calibrated p-values.",
        lifespan=lifespan,
        # The multipart parser's own file cap sits above ours, so a moderate excess gets our per-file answer.
        form_limits={"max_files": 4 * settings.max_files + 16, "max_fields": 16},
    )
    app.state.settings = settings
    app.state.engine = engine
    install_error_handlers(app)
    # The middleware added last is the outermost: the metrics also count the body limit's 413s.
    app.add_middleware(
        BodyLimitsMiddleware, max_bytes=settings.max_body_bytes, idle_timeout_s=settings.body_idle_timeout_s,
        total_timeout_s=settings.body_timeout_s,
    )
    if settings.api_key is not None:  # the key before the body, and before the size limit reads the headers' length
        protected = ("/v1",) + (("/metrics", "/docs", "/redoc", "/openapi.json") if settings.protect_ops else ())
        app.add_middleware(
            ApiKeyGateMiddleware, key=settings.api_key.get_secret_value().encode(), prefixes=protected
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: every answer carries them, the 413s too
    app.include_router(v1)
    app.include_router(ops)
    app.state.audit_store = AuditStore(settings.audit_dir)  # the web pages: / and /audit (service/web.py)
    app.include_router(pages)
    app.include_router(audit_api)
    app.mount("/static", static_files(), name="static")
    return app
