"""One JSON shape for every error the service returns, and the handlers that produce it.

    {"error": "bad_image", "message": "1 of 3 files cannot be scored",
     "files": [{"index": 1, "filename": "scan.png", "reason": "truncated image data"}]}

``error`` is a stable code for programs, ``message`` a sentence for people, ``files`` (upload errors only) names
each refused file and why.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("debias.service")


class FileError(BaseModel):
    index: int
    filename: str
    reason: str


class ErrorBody(BaseModel):
    error: str
    message: str
    files: list[FileError] = []


class ApiError(Exception):
    """Raised by routes and dependencies; turned into an :class:`ErrorBody` response."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        files: list[FileError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=error, message=message, files=files or [])
        self.headers = headers


def error_response(status: int, error: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
    return JSONResponse({"error": error, "message": message, "files": [], **extra}, status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "body_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400 and message.startswith(("Too many files", "Too many fields")):
            # The multipart parser's own cap (far above ours): still "too many files", as the README says.
            limit = request.app.state.settings.max_files
            return error_response(413, "too_many_files", f"too many parts in the form; the limit is {limit} files")
        if exc.status_code == 413:
            message = f"request body too large (limit {request.app.state.settings.max_body_bytes} bytes)"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        ]
        return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__})")
