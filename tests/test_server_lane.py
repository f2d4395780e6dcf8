"""The model lane: POSTs to the model paths run their route's endpoint without the router,
answered by the app's exception handlers; everything else goes on to the app behind it."""
from __future__ import annotations

import warnings

import pytest
from fastapi import FastAPI, Request
from starlette.responses import PlainTextResponse

with warnings.catch_warnings():  # starlette's own note about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cryolens.errors import Busy, InputError
from cryolens.server import Settings, create_app
from cryolens.server.lane import ModelLane
from cryolens.server.middleware import HeadAsGet
from cryolens.server.responses import ORJSONResponse


class Negative(InputError):
    """Has no handler of its own: its parent's answers it."""


def routes_app() -> FastAPI:
    app = FastAPI()

    @app.post("/run")
    async def run(request: Request):
        body = await request.body()
        if body == b"bad":
            raise Negative("x must be positive", field="x")
        if body == b"busy":
            raise Busy("full")
        if body == b"bug":
            raise RuntimeError("a bug")
        return ORJSONResponse({"route": request.scope["route"].path, "bytes": len(body),
                               "root_path": request.scope.get("root_path", "")})

    @app.get("/only-get")
    async def only_get():
        return {}

    return app


async def behind(scope, receive, send):
    """What the lane passes on: answers 418, so a 418 means "not taken by the lane"."""
    await PlainTextResponse("behind the lane", status_code=418)(scope, receive, send)


async def input_error(request, exc):
    return ORJSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)


def lane(paths=("/run",)) -> ModelLane:
    return ModelLane(behind, paths=paths, routes=routes_app().router.routes,
                     exception_handlers={InputError: input_error})


def test_a_post_to_a_model_path_runs_its_endpoint_with_the_route_in_scope():
    answer = TestClient(lane()).post("/run", content=b"12345")
    assert answer.status_code == 200
    assert answer.json() == {"route": "/run", "bytes": 5, "root_path": ""}


def test_other_methods_paths_and_trailing_slashes_go_on_to_the_app():
    client = TestClient(lane())  # no lifespan: the app behind answers HTTP only
    assert client.get("/run").status_code == 418
    assert client.post("/run/", content=b"").status_code == 418
    assert client.post("/elsewhere", content=b"").status_code == 418


def test_a_root_path_is_stripped_as_the_router_strips_it():
    answer = TestClient(lane(), root_path="/api").post("/api/run", content=b"1")
    assert answer.status_code == 200 and answer.json()["root_path"] == "/api"


def test_errors_are_answered_by_the_apps_handlers_by_their_mro_and_bugs_go_on():
    client = TestClient(lane())
    bad = client.post("/run", content=b"bad")
    assert bad.status_code == 422
    assert bad.json() == {"detail": "x must be positive", "field": "x"}
    with pytest.raises(RuntimeError, match="a bug"):  # for the last-resort 500
        client.post("/run", content=b"bug")
    with pytest.raises(Busy):  # no handler for Busy's own class or its parents here
        client.post("/run", content=b"busy")


def test_a_path_without_a_post_route_is_refused_up_front():
    with pytest.raises(ValueError, match="only-get"):
        lane(paths=("/run", "/only-get"))


def test_the_server_serves_every_model_endpoint_through_the_lane():
    app = create_app(Settings())
    lanes = [m for m in app.user_middleware if m.cls is ModelLane]
    assert len(lanes) == 1
    assert set(lanes[0].kwargs["paths"]) == {
        "/reconstruct", "/extract_features", "/extract_gaussian_splats", "/batch_process"}
    # inside the rest of ours (request ids, metrics, CORS and the body limit still apply), but
    # outside HEAD's: the lane's POSTs never pass through it
    assert [m.cls for m in app.user_middleware[-2:]] == [ModelLane, HeadAsGet]
