"""The wire contract (``cryolens.contract``) against the seed and the server: every seed
endpoint is a row, every row is served, each answer has exactly the fields its row says (JSON
and ``.npz`` the same arrays), one name per quantity from the engine to the wire, and volumes
are checked once per trust boundary. In-process: a socket adds nothing here."""
from __future__ import annotations

import dataclasses
import inspect
import io
import itertools
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from parity_helpers import REPO, SHARED

from cryolens import checked, contract, formats
from cryolens.checked import CheckedVolumes
from cryolens.client import AsyncCryoLensClient, CryoLensClient
from cryolens.engine import Engine, Features, Reconstruction, SplatSet
from cryolens.errors import InputError
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.server import Settings, create_app

with warnings.catch_warnings():  # starlette's own note about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

SEED = SHARED / "seed" / "server.md"
_HEADING = re.compile(r"^#{3,4} `(GET|POST) (/[a-z_]*)", re.MULTILINE)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(CryoLensVAE(CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=32,
                                             n_free=8)), device="cpu")


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(Settings(), engine=engine)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def volumes():
    return np.random.default_rng(2).standard_normal((2, 48, 48, 48)).astype(np.float32)


@pytest.mark.parametrize("doc", [SEED, REPO / "docs" / "rest-api.md"], ids=["seed", "rest-api"])
def test_every_documented_endpoint_is_a_row(doc):
    if not doc.exists():
        pytest.skip(f"{doc} not found (set CRYOLENS_SHARED to the shared/ folder)")
    documented = set(_HEADING.findall(doc.read_text()))
    assert documented, doc
    for method, path in documented:
        assert method in contract.ENDPOINTS[path].methods, (method, path)


def test_every_row_is_served_and_documented_in_openapi(client):
    spec = client.get("/openapi.json").json()["paths"]
    for endpoint in contract.ENDPOINTS.values():
        for method in endpoint.methods:
            assert spec[endpoint.path][method.lower()]["summary"] == endpoint.summary \
                or method == "POST" and endpoint is contract.STATISTICS


def _sent(endpoint: contract.Endpoint, options: dict) -> tuple[set[str], set[str]]:
    """(fields that must be in the answer, fields that may be) for these options."""
    on = [f for f in endpoint.answer if f.when is None or options[f.when]]
    return {f.name for f in on if not f.optional}, {f.name for f in on}


def _option_sets(endpoint: contract.Endpoint):
    flags = [o for o in endpoint.options if isinstance(o.default, bool)]
    yield {}
    yield {o.name: not o.default for o in flags}
    for o in endpoint.options:
        for choice in o.choices or ():
            yield {o.name: choice}


@pytest.mark.parametrize("endpoint", contract.MODEL_ENDPOINTS, ids=lambda e: e.path)
def test_each_answer_has_exactly_its_rows_fields_in_json_and_npz(client, endpoint, volumes):
    for given in _option_sets(endpoint):
        options = endpoint.defaults(given)
        sent = volumes if endpoint.batch else volumes[0]
        json_answer = client.post(endpoint.path, json={endpoint.volumes: sent.tolist(), **given})
        assert json_answer.status_code == 200, json_answer.text
        flat = endpoint.flat(json_answer.json())
        npz = client.post(endpoint.path, content=formats.write_npy(sent),
                          params={k: str(v).lower() if isinstance(v, bool) else v
                                  for k, v in given.items()},
                          headers={"Content-Type": formats.NPY_MEDIA_TYPE,
                                   "Accept": formats.NPZ_MEDIA_TYPE})
        with np.load(io.BytesIO(npz.content)) as data:
            arrays = {k: data[k] for k in data.files}
        must, may = _sent(endpoint, options)
        assert must <= flat.keys() <= may, (given, sorted(flat))
        assert list(arrays) == list(flat), given  # the same fields, in the same order
        fields = {f.name: f for f in endpoint.answer}
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, np.asarray(flat[name], array.dtype))
            if fields[name].shape or endpoint.batch:  # one volume's number: a float64
                assert array.dtype == fields[name].dtype, name
            if fields[name].per_volume:
                assert array.ndim == len(fields[name].shape) + endpoint.batch, name


def test_a_flag_that_adds_fields_adds_them():
    """The rows' optional fields appear when asked for (segments, splats)."""
    assert {"affinity_reconstruction", "centers", "segment"} <= _sent(
        contract.RECONSTRUCT, contract.RECONSTRUCT.defaults({"return_splat_data": True}))[1]


def test_one_name_is_one_quantity_across_the_model_endpoints():
    seen: dict[str, contract.Field] = {}
    for field in (f for e in contract.MODEL_ENDPOINTS for f in e.answer):
        first = seen.setdefault(field.name, field)
        assert (first.source, first.per_volume, first.shape, first.dtype) == (
            field.source, field.per_volume, field.shape, field.dtype), field.name
    # n_total (n_affinity + n_free) is summed by cryolens.operations
    sources = {f.source for f in seen.values()} - set(contract.FACTS) - {"n_total"}
    engine_names = {f.name for kind in (Features, Reconstruction, SplatSet)
                    for f in dataclasses.fields(kind)} - {"features", "splats"}
    assert sources <= engine_names  # the engine's results carry the wire's names


def test_the_clients_methods_take_each_rows_options():
    methods = {"/reconstruct": "reconstruct", "/extract_features": "extract_features",
               "/extract_gaussian_splats": "extract_gaussian_splats",
               "/batch_process": "batch_process"}
    assert set(methods) == {e.path for e in contract.MODEL_ENDPOINTS}
    for (path, name), kind in itertools.product(methods.items(),
                                                (CryoLensClient, AsyncCryoLensClient)):
        keywords = [p.name for p in inspect.signature(getattr(kind, name)).parameters.values()
                    if p.kind is p.KEYWORD_ONLY]
        assert keywords == [o.name for o in contract.ENDPOINTS[path].options] + ["progress"]


def test_post_reaches_any_row_and_refuses_an_option_it_lacks(client, volumes):
    with CryoLensClient("http://testserver", transport=client._transport) as api:
        got = api.post("/extract_features", volumes, return_variance=True)
        assert got["log_variance"].shape == (2, 8)
        with pytest.raises(TypeError, match="has no option return_everything"):
            api.post("/extract_features", volumes, return_everything=True)
        with pytest.raises(InputError, match="not an endpoint that takes volumes"):
            api.post("/health", volumes)


def test_the_contract_and_the_checked_type_import_no_server_library():
    code = ("import sys, cryolens.contract, cryolens.checked, cryolens.client; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'starlette') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


# -- checked once per trust boundary ----------------------------------------------------------
def test_checked_volumes_are_only_made_by_checking():
    with pytest.raises(TypeError):
        CheckedVolumes(np.zeros((1, 2, 2, 2), np.float32), True)
    bad = np.zeros((4, 2, 2, 2))
    bad[1, 0, 0, 0], bad[3, 1, 1, 1] = np.nan, 1e39  # 1e39: beyond float32
    with pytest.raises(InputError, match=r"volume\(s\) \[1, 3\] hold NaN"):
        CheckedVolumes.check(bad, step=2)
    one = CheckedVolumes.check(np.ones((2, 2, 2), np.float64))
    assert one.shape == (1, 2, 2, 2) and not one.stacked and one.array.dtype == np.float64
    assert CheckedVolumes.check(one) is one


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = checked.not_finite
    monkeypatch.setattr(checked, "not_finite",
                        lambda stack, step=checked.CHECK_STEP: calls.append(len(stack))
                        or real(stack, step))
    return calls


def test_the_engine_checks_what_it_is_given_unless_already_checked(engine, monkeypatch):
    calls = _counting(monkeypatch)
    bad = np.zeros((2, 48, 48, 48), np.float32)
    bad[1, 5, 5, 5] = np.inf
    with pytest.raises(InputError, match=r"volume\(s\) \[1\]"):
        engine.features(bad)  # the engine as a library still refuses infinity
    assert calls == [2]
    good = CheckedVolumes.check(np.ones((3, 48, 48, 48), np.float32))
    engine.features(good)
    assert calls == [2, 3]  # checked once, by check(); the engine trusted it


@pytest.mark.parametrize("binary", [True, False])
def test_a_request_is_checked_once_by_the_client_and_once_by_the_server(client, volumes,
                                                                        monkeypatch, binary):
    with CryoLensClient("http://testserver", transport=client._transport,
                        binary=binary) as api:
        calls = _counting(monkeypatch)
        api.extract_features(volumes[:1])
    # the client checks what it sends; the server checks a binary body as it receives it
    # (a JSON body's numbers as it parses them); the engine trusts the server's
    assert calls == ([1, 1] if binary else [1])


def test_the_plugins_boxes_are_checked_once_on_its_side(client, monkeypatch):
    from napari_cryolens import core

    boxes = np.random.default_rng(4).standard_normal((3, 48, 48, 48)).astype(np.float32)
    boxes[1, 0, 0, 0] = np.nan
    calls = _counting(monkeypatch)
    good, finite = core.checked_boxes(boxes)
    assert finite.tolist() == [True, False, True] and len(good) == 2
    backend = core.ServerBackend("http://testserver", transport=client._transport)
    try:
        got = backend.reconstruct(good, core.Options())
    finally:
        backend.close()
    assert got["reconstruction"].shape == (2, 48, 48, 48)
    assert calls == [3, 2]  # the plugin's check of its boxes, then the server's on receiving


def test_a_new_row_is_served_and_reachable_with_no_other_edit(engine, volumes, monkeypatch):
    """Adding an endpoint is one row (plus its operation, here one the engine has): the server
    serves it with its options and answer fields, and ``post`` reaches it."""
    row = contract.Endpoint(
        "/embed", ("POST",), "Embed", "Embeddings only", volumes="input_volume",
        operation=lambda o: contract.Operation("features"),
        options=(contract.Option("return_variance", False),),
        answer=(contract.Field("embedding", "embedding", True, ("latent",)),
                contract.Field("log_variance", "log_variance", True, ("latent",),
                               when="return_variance"),
                contract.Field("latent_dims", "latent_dims", False)))
    monkeypatch.setattr(contract, "MODEL_ENDPOINTS", (*contract.MODEL_ENDPOINTS, row))
    monkeypatch.setitem(contract.ENDPOINTS, row.path, row)
    with TestClient(create_app(Settings(), engine=engine)) as served:
        answer = served.post("/embed", json={"input_volume": volumes[0].tolist()}).json()
        assert sorted(answer) == ["embedding", "latent_dims"] and answer["latent_dims"] == 8
        assert "/embed" in served.get("/openapi.json").json()["paths"]
        with CryoLensClient("http://testserver", transport=served._transport) as api:
            got = api.post("/embed", volumes, return_variance=True)
    assert sorted(got) == ["embedding", "latent_dims", "log_variance"]
    assert got["embedding"].shape == (2, 8)
