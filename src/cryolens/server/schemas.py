"""Request and response models (pydantic) made from the rows of :mod:`cryolens.contract`.

Made once per row, when a route first asks (a new row needs nothing here). Options are
validated by the ``*Options`` models (unknown fields are ignored). Volume fields
are declared in the request models for the OpenAPI schema only: the routes parse them with
orjson + numpy (``codecs.py``), ~100x faster than pydantic on 110,592 floats. Answers are
written from numpy by the routes; the response models document them.
"""
from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from cryolens import contract
from cryolens.contract import Endpoint

Volume3D = list[list[list[float]]]
Volume4D = list[Volume3D]
#: The shape every volume field must have, stated in the schema (the routes enforce it: 422).
VOLUME_SHAPE = ("Shape (48, 48, 48): a list of 48 lists of 48 lists of 48 finite numbers "
                "(z, y, x); no booleans, strings or null.")
_BATCH_SHAPE = ("Shape (N, 48, 48, 48): 1 <= N <= the server's --max-volumes (default 256) "
                "particles, each of shape (48, 48, 48), z-y-x.")
_SCALARS: dict[str, type] = {"float32": float, "float64": float, "int8": int, "int64": int,
                             "str": str, "object": dict[str, Any]}


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _option_field(option: contract.Option) -> tuple[Any, Any]:
    doc = {"description": option.doc} if option.doc else {}
    if option.choices is not None:
        return Literal[option.choices] | None, Field(option.default, **doc)  # type: ignore[valid-type]
    if option.positive:
        return int, Field(option.default, gt=0, **doc)
    return type(option.default), Field(option.default, **doc)


@cache
def options_model(endpoint: Endpoint) -> type[BaseModel]:
    """The endpoint's options, validated (422 naming the option) with their defaults."""
    return create_model(f"{endpoint.name}Options", __base__=_Options,
                        **{o.name: _option_field(o) for o in endpoint.options})


@cache
def request_model(endpoint: Endpoint) -> type[BaseModel]:
    """The JSON body, for the OpenAPI schema: the options and the volume field."""
    if endpoint.batch:
        volume: Any = (Volume4D, Field(..., description=_BATCH_SHAPE))
    else:
        volume = (Volume3D, Field(..., description="One particle. " + VOLUME_SHAPE))
    return create_model(f"{endpoint.name}Request", __base__=options_model(endpoint),
                        **{endpoint.volumes: volume})


def _answer_type(field: contract.Field, batch: bool) -> Any:
    kind: Any = _SCALARS[field.dtype]
    if field.dtype == "object":
        return list[kind] if field.shape else kind
    for _ in range(len(field.shape) + (batch and field.per_volume)):
        kind = list[kind]
    return kind


@cache
def response_model(endpoint: Endpoint) -> type[BaseModel]:
    """The JSON answer: a field sent only on request (or when computed) is optional; a field
    the seed nests sits in a model of its own (``ReconstructSplats``)."""
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    group_optional: dict[str, bool] = {}
    for f in endpoint.answer:
        kind = _answer_type(f, endpoint.batch)
        doc = {"description": f.doc} if f.doc else {}
        sometimes = f.when is not None or f.optional
        if len(f.path) == 2:
            groups.setdefault(f.path[0], {})[f.path[1]] = (kind, Field(..., **doc))
            group_optional[f.path[0]] = sometimes
        else:
            top[f.name] = (kind | None, Field(None, **doc)) if sometimes else \
                (kind, Field(..., **doc))
    for group, members in groups.items():
        model = create_model(f"{endpoint.name}{group.title().replace('_', '')}", **members)
        top[group] = (model | None, Field(None)) if group_optional[group] else (model, ...)
    return create_model(f"{endpoint.name}Response", **top)


class StatisticsRequest(BaseModel):
    volume: Any | None = Field(None, description="Nested list of numbers, any shape.")
    volume_data: Any | None = Field(None, description="Alias of `volume` (reference server).")


class ErrorResponse(BaseModel):
    detail: str | list[dict]
    field: str | None = None
    request_id: str | None = None

