"""FastAPI dependencies: settings, the engine, the API key check.

All are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in its thread pool, and four
thread hops per request cost the service more CPU than parsing the request."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from debias.service.engine import ScoringEngine
from debias.service.errors import ApiError
from debias.service.settings import Settings

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required on /v1/* when the server has DEBIAS_API_KEY set."
)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> ScoringEngine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[ScoringEngine, Depends(get_engine)]


async def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)] = None) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    # compare_digest takes the same time wherever the first difference is, so the key cannot be guessed byte by byte
    if key is None or not hmac.compare_digest(key.encode("utf-8", "surrogateescape"), expected):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "APIKey"})


async def ready_engine(engine: EngineDep) -> ScoringEngine:
    if not engine.ready:
        detail = f": {engine.error}" if engine.error else " (loading, retry shortly)"
        raise ApiError(503, "not_ready", f"the model is not ready{detail}", headers={"Retry-After": "1"})
    return engine


ReadyEngineDep = Annotated[ScoringEngine, Depends(ready_engine)]
