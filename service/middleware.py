"""Pure ASGI middleware (no body buffering): request metrics, the request-body size limit, security headers."""

from __future__ import annotations

import hmac
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import ServiceMetrics


class RequestMetricsMiddleware:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Answers 413 (JSON, like every error) for a body over ``max_bytes``.

    A declared Content-Length over the limit is refused before any byte is read. A body without one (chunked) is
    counted as it streams; once over the limit, reading stops with an error, and whatever the app then answers (the
    multipart parser reports a parse error) is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {"error": "body_too_large", "message": f"request body too large (limit {self.max_bytes} bytes)",
             "files": []}
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        exceeded = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if exceeded:
                if not replaced and message["type"] == "http.response.start":
                    replaced = True
                    await self._refuse(send)
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not replaced:
                await self._refuse(send)


# The pages load only their own scripts, styles and images (plus data: and blob: images they make themselves), and
# may not be framed. FastAPI's /docs pages load Swagger UI from a CDN, so they get the framing and sniffing headers
# but not this policy.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_NO_PAGE_CSP = ("/docs", "/redoc", "/openapi.json")


class SecurityHeadersMiddleware:
    """Adds X-Content-Type-Options: nosniff and X-Frame-Options: DENY to every response, and the pages' Content
    Security Policy (which also forbids framing) to everything but the API documentation pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = not scope.get("path", "").startswith(_NO_PAGE_CSP)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
                if csp:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ApiKeyGateMiddleware:
    """Answers 401 from the request headers alone, before a byte of the body is read, for every path under a
    protected prefix (``/v1``; with ``DEBIAS_PROTECT_OPS`` also ``/metrics`` and the API documentation). An
    unauthenticated 60 MB upload used to be read in full before its 401 (issue 14, item 2). The route dependency
    checks the key again; both compare in constant time."""

    def __init__(self, app: ASGIApp, key: bytes, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.key = key
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", []) if k == b"x-api-key"), None)
        if given is not None and hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "unauthorized", "message": "missing or wrong X-API-Key header", "files": []}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"APIKey"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
