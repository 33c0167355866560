"""Pure ASGI middleware (no body buffering): request metrics, the request-body size and time limits, the API key gate
and security headers."""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from debias.service.prometheus_metrics import ServiceMetrics


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


class _BodyRefused(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class BodyLimitsMiddleware:
    """Answers 413 for a body over ``max_bytes`` and 408 for a body too slow to arrive, in the service's JSON shape,
    and closes the connection.

    A declared Content-Length over the limit is refused before any byte is read. A body without one (chunked) is
    counted as it streams; once over the limit, reading stops with an error. A client that sends its headers and
    then nothing (or a byte now and then) is cut off after ``idle_timeout_s`` without data, or ``total_timeout_s``
    after the headers: 50 such connections used to stay open as long as the clients liked (issue 14, item 2).
    Whatever the app answers after reading stopped (the multipart parser reports a parse error) is replaced.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout_s: float = 10.0, total_timeout_s: float = 120.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    async def _refuse(self, send: Send, refusal: _BodyRefused) -> None:
        body = json.dumps({"error": refusal.error, "message": refusal.message, "files": []}).encode()
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self) -> _BodyRefused:
        return _BodyRefused(413, "body_too_large", f"request body too large (limit {self.max_bytes} bytes)")

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
            await self._refuse(send, self._too_large())
            return
        seen = 0
        body_done = False
        refused: _BodyRefused | None = None
        replaced = False
        deadline = time.monotonic() + self.total_timeout_s

        async def limited_receive() -> Message:
            nonlocal seen, body_done, refused
            if body_done:  # e.g. a streaming response listening for the disconnect: no timeout then
                return await receive()
            timeout = min(self.idle_timeout_s, deadline - time.monotonic())
            try:
                if timeout <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                slow = "nothing arrived for" if timeout >= self.idle_timeout_s else "not complete after"
                limit = self.idle_timeout_s if timeout >= self.idle_timeout_s else self.total_timeout_s
                refused = _BodyRefused(408, "body_timeout", f"request body too slow: {slow} {limit:g} s")
                raise refused from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    refused = self._too_large()
                    raise refused
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if refused is not None:
                if not replaced and message["type"] == "http.response.start":
                    replaced = True
                    await self._refuse(send, refused)
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused as exc:
            if not replaced:
                replaced = True
                await self._refuse(send, exc)


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


#: The key gate reads (and drops) a refused request's body up to this size before its 401: a client that sends its
#: whole body before reading the answer would otherwise meet a connection reset instead of the 401, because the
#: server closed the socket with unread data in it. Anything larger is not read.
DRAIN_LIMIT_BYTES = 1 << 20
DRAIN_TIMEOUT_S = 2.0


class ApiKeyGateMiddleware:
    """Answers 401 from the request headers alone, before a byte of the body is read, for every path under a
    protected prefix (``/v1``; with ``DEBIAS_PROTECT_OPS`` also ``/metrics`` and the API documentation). An
    unauthenticated 60 MB upload used to be read in full before its 401 (issue 14, item 2). Only a small body
    (declared at most ``DRAIN_LIMIT_BYTES``, arriving within ``DRAIN_TIMEOUT_S``) is read and dropped first, so that
    simple clients get the 401 and not a reset. The route dependency checks the key again; both compare in constant
    time."""

    @staticmethod
    async def _drain_small_body(scope: Scope, receive: Receive) -> None:
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is None or not declared.isdigit() or int(declared) > DRAIN_LIMIT_BYTES:
            return
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        more = int(declared) > 0
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return
            more = message["type"] == "http.request" and message.get("more_body", False)

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
        await self._drain_small_body(scope, receive)
        body = json.dumps({"error": "unauthorized", "message": "missing or wrong X-API-Key header", "files": []}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"APIKey"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
