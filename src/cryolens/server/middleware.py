"""ASGI middleware, outermost first: request context (id, metrics, log tag), body limit,
the last-resort 500, and HEAD answered as GET. Pure ASGI (no BaseHTTPMiddleware), so
streaming and disconnects pass through untouched."""
from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cryolens.server.metrics import Metrics
from cryolens.server.responses import ORJSONResponse

logger = logging.getLogger("cryolens.server")

#: The id of the request being handled, for log lines (``-`` outside a request).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "X-Request-ID"
#: A client's own id is echoed when it is short and plain; otherwise we make one.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """Too little of the body arrived within the body timeout: ``args[0]`` bytes (0: none)."""


class TrackedSend:
    """``send`` that remembers whether the response has started (after that, an error can no
    longer become an error response) and its status."""

    def __init__(self, send: Send, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
        self._send = send
        self._extra = list(extra_headers)
        self.started = False
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
            if self._extra:
                message = {**message, "headers": [*message.get("headers", []), *self._extra]}
        await self._send(message)


class RequestContextMiddleware:
    """Gives each request an id (the client's ``X-Request-ID`` when plain, else a new one),
    returns it in the response header, tags log lines with it, and counts the request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Ids are 32 hex digits like a UUID's: a random per-process half and a counter (a
        # uuid4 per request is a getrandom call: 3 % of the event loop's time under load).
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode(
            "latin1")
        rid = sent if _CLIENT_ID.fullmatch(sent) else f"{self._id_prefix}{next(self._ids):016x}"
        token = request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        tracked = TrackedSend(send, [(REQUEST_ID_HEADER.encode(), rid.encode())])
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, tracked)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            status = tracked.status if tracked.started else 499  # the client went away
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            request_id.reset(token)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: by Content-Length up front, else by counting chunks.
    408 (and the connection closed) when an upload stalls: while the body is incomplete, every
    ``timeout_s`` seconds from the app's first read must bring at least ``min_rate`` bytes per
    second (``min_rate`` 0: at least one chunk). A client that trickles a byte now and then
    would otherwise hold its reservation in the parse budget, and with two such uploads of
    unknown size every body-carrying request gets 503. Once the body is in, ``receive`` waits
    untimed (it then only ever brings ``http.disconnect``)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None,
                 min_rate: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.min_rate = min_rate
        self._quota = min_rate * (timeout_s or 0)  # bytes each window must bring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        received = 0
        complete = False
        loop = asyncio.get_running_loop()
        window_start: float | None = None  # from the app's first read, not the headers
        window_bytes = 0

        async def counting_receive() -> Message:
            nonlocal received, complete, window_start, window_bytes
            if complete or self.timeout_s is None:
                message = await receive()
            else:
                if window_start is None:
                    window_start = loop.time()
                left = window_start + self.timeout_s - loop.time()
                try:
                    message = await _within(receive(), max(left, 0.0))
                except BodyTimeout:
                    raise BodyTimeout(window_bytes) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                window_bytes += size
                if window_bytes >= self._quota:  # enough for this window: the next one starts
                    window_start, window_bytes = loop.time(), 0
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, counting_receive, tracked)
        except BodyTooLarge:
            if tracked.started:
                raise
            await self._reject(scope, receive, send)
        except BodyTimeout as slow:
            if tracked.started:
                raise
            arrived = slow.args[0] if slow.args else 0
            if not arrived:
                detail = f"request body timed out: nothing arrived for {self.timeout_s:g} s"
            else:
                detail = (f"request body too slow: {arrived} bytes in {self.timeout_s:g} s, "
                          f"below the minimum of {self.min_rate} bytes/s")
            logger.info("%s: answered 408 and closed", detail)
            response = ORJSONResponse({"detail": detail, "field": "body"}, status_code=408,
                                      headers={"Connection": "close"})
            await response(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = ORJSONResponse(
            {"detail": f"request body is larger than the limit of {self.max_bytes} bytes",
             "field": "body"}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


async def _within(awaitable: Awaitable[Message], timeout_s: float) -> Message:
    """``await awaitable`` in the calling task, :class:`BodyTimeout` after ``timeout_s``.
    A timer that cancels the task, not ``asyncio.wait_for``: that wraps each body chunk in a
    task of its own (~15 us against ~2 us, several chunks per request)."""
    task = asyncio.current_task()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not expired:  # cancelled from elsewhere (shutdown, a client gone): not ours
            raise
        if hasattr(task, "uncancel"):  # Python >= 3.11: this cancellation is handled
            task.uncancel()
        raise BodyTimeout from None
    finally:
        timer.cancel()


class ErrorMiddleware:
    """Any exception that escapes a route: logged with its traceback, answered with a bare 500
    that carries the request id. A client that left mid-upload (``ClientDisconnect``) is no
    error of ours: counted, logged at INFO, and nothing is sent. A request cancelled before
    its answer started is one the server gave up on at the end of its drain (uvicorn cancels
    what still runs after ``timeout_graceful_shutdown``): answered 503 with ``Retry-After``,
    where uvicorn would write a plain-text 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None,
                 retry_after_s: int = 5) -> None:
        self.app = app
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except (BodyTooLarge, BodyTimeout):
            raise
        except asyncio.CancelledError:
            if tracked.started:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # handled (Python >= 3.11)
                task.uncancel()
            logger.info("%s %s given up at the end of the drain: answered 503",
                        scope.get("method"), scope.get("path"))
            response = ORJSONResponse(
                {"detail": "the server is shutting down; retry shortly"}, status_code=503,
                headers={"Retry-After": str(self.retry_after_s), "Connection": "close"})
            await response(scope, receive, send)
        except ClientDisconnect:
            if self.metrics is not None:
                self.metrics.disconnected("upload")
            logger.info("client disconnected during the upload of %s %s", scope.get("method"),
                        scope.get("path"))
        except Exception:
            rid = request_id.get()
            logger.exception("internal error in %s %s", scope.get("method"), scope.get("path"))
            if tracked.started:
                raise
            response = ORJSONResponse({"detail": "internal error", "request_id": rid},
                                      status_code=500)
            await response(scope, receive, send)


class HeadAsGet:
    """HEAD on every route that answers GET: the request goes on as a GET, and its status and
    headers (``Content-Length`` of the GET body included) go back without the body. FastAPI's
    routes, unlike Starlette's, take only the methods they name, so without this a GET route
    answered HEAD (load balancers, uptime checks, ``curl -I``) with 405. A path with no GET
    answers HEAD as it answers GET: 405 and its ``Allow``.

    The body is dropped here rather than left to the server (uvicorn drops it too, reading its
    own scope's method, which stays HEAD): a HEAD answer carrying bytes would corrupt a
    keep-alive connection. Only HEAD requests do any work here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        try:
            await self.app(as_get, receive, headers_only)
        finally:
            if "route" in as_get:  # what the router matched: metrics label requests by it
                scope["route"] = as_get["route"]


class RepeatFilter(logging.Filter):
    """Lets an identical message (same logger, level and text) through once per ``window_s``
    seconds; the next one that passes says how many were held back. For floods such as
    asyncio's "socket.accept() out of system resource" when file descriptors run out (EMFILE),
    which would otherwise be logged, with a traceback, every second it lasts."""

    def __init__(self, window_s: float = 60.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        last, held = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.window_s:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) > 1024:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} identical messages held back)"
        return True


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (for the format string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True
