"""The model endpoints' POSTs, served without Starlette's router and FastAPI's per-request
machinery.

The model routes take the raw :class:`~starlette.requests.Request` and parse their bodies
themselves, so FastAPI has nothing to validate for them; its route machinery (the router's
matching, ``request_response``, the exception and exit-stack middlewares) still cost the event
loop 0.15-0.25 ms of the ~1.3 ms it spent on a single-volume ``.npy`` request under 16 clients,
and the event loop's time is what the model waits for then (``docs/benchmarks.md``).
:class:`ModelLane` sits inside our own middlewares (request id, metrics, CORS, body limit, the
last-resort 500), so they apply unchanged, and calls the very handlers the FastAPI routes hold:
one handler per endpoint, and FastAPI keeps them only for the OpenAPI schema, the docs, and
whatever the lane does not take (other methods, paths with a trailing slash). Exceptions are
answered by the app's own exception handlers, looked up as Starlette does (by the exception's
MRO); anything without one goes on to the last-resort 500.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send


class ModelLane:
    """ASGI middleware: a ``POST`` to one of ``paths`` runs that path's route endpoint
    directly; every other request goes on to ``app``. ``routes`` (holding a POST route for
    each of ``paths``) and ``exception_handlers`` are the app's own."""

    def __init__(self, app: ASGIApp, *, paths: Iterable[str], routes: Iterable[BaseRoute],
                 exception_handlers: Mapping[Any, Callable]) -> None:
        self.app = app
        wanted = set(paths)
        self._routes = {route.path: route for route in routes
                        if getattr(route, "path", None) in wanted
                        and "POST" in (getattr(route, "methods", None) or ())}
        if set(self._routes) != wanted:
            raise ValueError(f"no POST route for {sorted(wanted - set(self._routes))}")
        self._exception_handlers = exception_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self._routes.get(_route_path(scope))
            if route is not None:
                await self._serve(route, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, route: Any, scope: Scope, receive: Receive, send: Send) -> None:
        # what the router would have set: the metrics label requests by scope["route"]
        scope.update(route=route, endpoint=route.endpoint, path_params={})
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable | None:
        for cls in type(exc).__mro__:
            if cls is Exception:  # the last-resort 500 is ErrorMiddleware's
                return None
            handler = self._exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None


def _route_path(scope: Scope) -> str:
    """The path the routes match: ``path`` less ``root_path`` (as Starlette's router has it)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path
