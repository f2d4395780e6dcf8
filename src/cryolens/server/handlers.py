"""Exceptions -> HTTP statuses, each class mapped once (``errors.py`` draws the tree).

A handler is found by walking the exception's MRO, so a subclass answers like its parent
unless it has its own entry. Bodies are ``{"detail", "field"}`` and never echo input.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from cryolens.errors import (
    Busy,
    CryoLensError,
    InferenceTimeout,
    InputError,
    MalformedBody,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from cryolens.server import codecs
from cryolens.server.responses import ORJSONResponse

#: Validation errors reported per response (the rest are counted, not listed).
MAX_REPORTED_ERRORS = 5
STATUS: dict[type[BaseException], int] = {
    InputError: 422, MalformedBody: 400, UnsupportedMediaType: 415, PayloadTooLarge: 413,
    Busy: 503, InferenceTimeout: 504,
}


def status_of(exc: BaseException) -> int | None:
    """The status of a CryoLens error, or None for anything else (a bug: 500)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


def error_entries(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """loc, type and msg only: never the ``input`` (it may be a 2 MB volume)."""
    out = [{"loc": list(err.get("loc", ())), "type": err.get("type", ""),
            "msg": codecs.truncate(str(err.get("msg", "")))}
           for err in errors[:MAX_REPORTED_ERRORS]]
    if len(errors) > MAX_REPORTED_ERRORS:
        out.append({"loc": [], "type": "truncated",
                    "msg": f"{len(errors) - MAX_REPORTED_ERRORS} more errors not shown"})
    return out


def allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts on this path; GET implies HEAD (``HeadAsGet``)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(CryoLensError)
    async def cryolens_error(request: Request, exc: CryoLensError) -> ORJSONResponse:
        status = status_of(exc)
        if status is None:  # a CryoLensError with no status (e.g. DeviceError) mid-request
            raise exc
        body: dict[str, Any] = {"detail": codecs.truncate(str(exc), 500)}
        if isinstance(exc, InputError):
            body["field"] = exc.field
        headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
        return ORJSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> ORJSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names one route's methods; a path may have two
            headers["Allow"] = ", ".join(allowed_methods(request))
        return ORJSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                              headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError
                                 ) -> ORJSONResponse:
        return ORJSONResponse({"detail": error_entries(list(exc.errors()))}, status_code=422)
