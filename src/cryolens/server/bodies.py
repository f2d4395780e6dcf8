"""Request bodies in any format the server reads, turned into (options, float32 volumes).

JSON (the seed contract: options and nested-list volumes in one object), ``application/x-npy``
(one volume or a stack; options as query parameters named like the JSON fields),
``application/octet-stream`` (an MRC/MRCS file, or ``.npy``) and ``multipart/form-data`` with a
file field holding either. Everything is parsed on a worker thread, never on the event loop.
"""
from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from cryolens import formats
from cryolens.checked import CheckedVolumes
from cryolens.errors import InputError, MalformedBody, PayloadTooLarge, UnsupportedMediaType
from cryolens.server import codecs

T = TypeVar("T")
MULTIPART = "multipart/form-data"
#: Media types a volume endpoint reads, for the 415 message.
READABLE = (codecs.JSON_MEDIA_TYPE, formats.NPY_MEDIA_TYPE, formats.MRC_MEDIA_TYPE, MULTIPART)


#: Work on fewer bytes than this runs on the event loop itself: a thread hop costs more than
#: checking one particle (~0.2 ms), and under load the hops are what caps requests per second.
INLINE_BYTES = 1024**2


def declared_size(request: Request, unknown: int) -> int:
    """The request's ``Content-Length``, or ``unknown`` when it sends none (or an odd one)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else unknown


async def off_loop(request: Request, work: Callable[[], T], size: int | None = None) -> T:
    """``work()`` on the app's codec threads (``app.state.codec_pool``, in the request's
    context so log lines keep its id), or right here when ``size`` says it handles fewer than
    :data:`INLINE_BYTES` (it then blocks the loop for well under a millisecond)."""
    if size is not None and size < INLINE_BYTES:
        return work()
    pool = getattr(request.app.state, "codec_pool", None)
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(pool, context.run, work)


@dataclass
class Parsed:
    """options: the validated options model; volumes: (N, D, H, W) real numbers, checked (every
    value finite in float32: the engine does not look again; float32 from JSON, the body's
    dtype from ``.npy`` and MRC); stacked: the client sent a stack (answer
    with a leading N) rather than one volume; voxel_size: (x, y, z) angstrom from an MRC header,
    else None; field: where the volumes were in the request (the JSON field, or ``body`` for a
    binary body), for errors found later about them."""

    options: Any
    volumes: CheckedVolumes
    stacked: bool
    voxel_size: tuple[float, float, float] | None = None
    field: str = "body"


def media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()


def validate_options(model: type[BaseModel], values: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": (where, *err["loc"])} for err in exc.errors()]) from None


def query_options(request: Request, model: type[BaseModel]) -> dict[str, str]:
    """A binary body's options, from the query string. Unlike a JSON body's fields (ignored
    when unknown, as the reference server ignores them), a name that is not an option, or an
    option given twice, is a 422 naming it: a misspelt option would otherwise be dropped
    without a word and the answer quietly lack what was asked for."""
    items = request.query_params.multi_items()
    counts = Counter(name for name, _ in items)  # one pass: a query may hold thousands
    unknown = sorted(counts.keys() - model.model_fields.keys())
    if unknown:
        known = ", ".join(model.model_fields) or "none"
        raise InputError(f"unknown option{'s' * (len(unknown) > 1)} "
                         f"{', '.join(map(repr, unknown))} in the query string; this endpoint's "
                         f"options are: {known}", field=unknown[0])
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise InputError(f"option {repeated[0]!r} is given more than once in the query string",
                         field=repeated[0])
    return dict(items)


async def read_volumes(request: Request, model: type[BaseModel], field: str, *,
                       box: tuple[int, ...], max_volumes: int, batch: bool) -> Parsed:
    """Options and volumes of a model endpoint. ``field`` is the JSON field holding the
    volume(s); ``batch`` says whether JSON holds a list of volumes (``/batch_process``)."""
    kind = media_type(request)
    if codecs.is_json_content_type(kind):
        body = await request.body()

        def parse_json() -> Parsed:
            options, volumes = codecs.read_json_volumes(
                body, field, box, max_volumes,
                lambda payload: validate_options(model, payload, "body"), batch=batch)
            # the JSON reader refused every number not finite in float32 as it converted it
            return Parsed(options, CheckedVolumes.from_checked(volumes, batch), batch, field=field)

        return await off_loop(request, parse_json)
    options = validate_options(model, query_options(request, model), "query")
    read = await binary_reader(request)

    def parse_binary() -> Parsed:
        sent = read()
        volumes = checked_stack(sent.data, "body", box, max_volumes)
        return Parsed(options, volumes, volumes.stacked or batch, sent.voxel_size)

    # a body of unknown size counts as large: parsed off the event loop
    return await off_loop(request, parse_binary, declared_size(request, unknown=INLINE_BYTES))


async def binary_reader(request: Request) -> Callable[[], formats.Volumes]:
    """Receive a binary body (``.npy``, MRC, or either in a multipart file field) and return
    the function that parses it (to run on a worker thread); 415 for anything else."""
    kind = media_type(request)
    if kind == MULTIPART:
        data, name = await _multipart_file(request)
        return lambda: formats.sniff(data, "body", name)  # an .mrcs is told by its name
    if kind not in (formats.NPY_MEDIA_TYPE, formats.MRC_MEDIA_TYPE):
        raise UnsupportedMediaType(
            f"Content-Type {kind or '(none)'!r} is not read here; send one of "
            f"{', '.join(READABLE)}", field="content-type")
    data = await whole_body(request)
    read = formats.read_npy if kind == formats.NPY_MEDIA_TYPE else formats.sniff
    return lambda: read(data, "body")


async def whole_body(request: Request) -> bytearray:
    """The body in one buffer that grows as its chunks arrive (the array read from it is a
    view of it): ``request.body()`` keeps every chunk until it joins them, twice the body at
    its peak."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
    return data


def checked_stack(data: np.ndarray, field: str, box: tuple[int, ...], max_volumes: int
                  ) -> CheckedVolumes:
    """(D, H, W) or (N, D, H, W) of ``box`` -> (N, D, H, W), checked, in the body's own dtype:
    the engine converts it to float32 a chunk at a time (a uint8 stack never costs four times
    its body at once)."""
    shape = tuple(data.shape)
    stacked = len(shape) == 4
    if len(shape) not in (3, 4) or shape[-3:] != box:
        raise InputError(f"{field} must be one volume of shape {box} or a stack (N, "
                         f"{', '.join(map(str, box))}), got {shape}", field=field)
    if stacked and shape[0] == 0:
        raise InputError(f"{field} is an empty stack: expected at least one volume",
                         field=field)
    if stacked and shape[0] > max_volumes:
        raise PayloadTooLarge(f"{field} holds {shape[0]} volumes; at most {max_volumes} are "
                              f"accepted per request", field=field)
    return CheckedVolumes.check(data, field=field, step=1)  # one volume's temporaries


async def _multipart_file(request: Request) -> tuple[bytes, str]:
    """The first file part's bytes and file name ("" when it gives none)."""
    try:
        form = await request.form(max_files=1, max_fields=32)
    except HTTPException as exc:  # Starlette's own words for a form it cannot read
        raise MalformedBody(f"the multipart body cannot be read: {exc.detail}",
                            field="body") from None
    try:
        files = [value for _, value in form.multi_items() if hasattr(value, "read")]
        if not files:
            raise InputError("the multipart body has no file field: send the MRC or .npy "
                             "file as a file part (e.g. curl -F file=@particle.mrc)",
                             field="file")
        return await files[0].read(), files[0].filename or ""
    finally:
        await form.close()
