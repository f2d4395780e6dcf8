"""cryolens.client against a real server process (small random model): every endpoint, binary
and JSON alike, stacks split into requests, the server's errors (what a healthy server never
does, 503, 415, 413: test_client_retries.py)."""
from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest
from client_helpers import TOL, assert_same, particles

from cryolens.client import (
    AsyncCryoLensClient,
    CryoLensClient,
    CryoLensHTTPError,
)
from cryolens.errors import CryoLensError, InputError

REQUEST_ID = r"[0-9a-f]{32}"


@pytest.fixture(scope="module")
def client(server):
    with CryoLensClient(server.url) as c:
        yield c


class CountingTransport(httpx.HTTPTransport):
    """Counts requests per (method, path, Content-Type)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path,
                          request.headers.get("content-type", "")))
        return super().handle_request(request)


# -- every endpoint -----------------------------------------------------------------------------
def test_info_endpoints(client):
    assert client.health() == {"status": "healthy"}
    assert client.ready() == {"status": "ready"}
    info = client.model_info()
    assert info["latent_dim"] == 8 and info["n_gaussians"] == 40
    assert info["input_shape"] == [48, 48, 48]


CALLS = {
    "reconstruct": lambda c, v: c.reconstruct(v, return_splat_data=True, return_embeddings=True),
    "reconstruct_plain": lambda c, v: c.reconstruct(
        v, use_segmented_decoder=False, use_final_convolution=False, use_predicted_pose=True),
    "extract_features": lambda c, v: c.extract_features(v, return_variance=True),
    "extract_features_embedding_only": lambda c, v: c.extract_features(
        v, return_pose=False, return_global_weight=False),
    "extract_gaussian_splats": lambda c, v: c.extract_gaussian_splats(v),
    "extract_gaussian_splats_affinity": lambda c, v: c.extract_gaussian_splats(
        v, include_free_segment=False),
    "batch_process": lambda c, v: c.batch_process(v),
    "batch_process_splats": lambda c, v: c.batch_process(v, operation="splats", batch_size=2),
}


def test_every_endpoint_shapes(client):
    stack = particles(3)
    rec = CALLS["reconstruct"](client, stack)
    for key in ("reconstruction", "affinity_reconstruction", "free_reconstruction"):
        assert rec[key].shape == (3, 48, 48, 48) and rec[key].dtype == np.float32
    assert rec["embedding"].shape == (3, 8) and rec["centers"].shape == (3, 40, 3)
    assert rec["input_shape"].tolist() == [3, 48, 48, 48]
    assert rec["reconstruction_shape"].tolist() == [3, 48, 48, 48]
    plain = CALLS["reconstruct_plain"](client, stack)
    assert set(plain) == {"reconstruction", "input_shape", "reconstruction_shape"}

    feats = CALLS["extract_features"](client, stack)
    assert feats["embedding"].shape == (3, 8) and feats["pose"].shape == (3, 4)
    assert feats["global_weight"].shape == (3,) and feats["log_variance"].shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(feats["pose"], axis=1), 1, atol=1e-5)
    assert "pose" not in CALLS["extract_features_embedding_only"](client, stack)

    splats = CALLS["extract_gaussian_splats"](client, stack)
    assert splats["centers"].shape == (3, 40, 3) and splats["scales"].shape == (3, 40)
    assert int(splats["n_total"]) == 40 and splats["segment"].shape == (40,)
    affinity = CALLS["extract_gaussian_splats_affinity"](client, stack)
    assert affinity["centers"].shape == (3, 32, 3) and int(affinity["n_free"]) == 0

    batch = CALLS["batch_process"](client, stack)
    assert batch["reconstructions"].shape == (3, 48, 48, 48) and batch["poses"].shape == (3, 4)
    assert int(batch["n_volumes"]) == 3 and batch["input_shape"].tolist() == [48, 48, 48]
    assert CALLS["batch_process_splats"](client, stack)["centers"].shape == (3, 40, 3)

    one = client.extract_features(stack[0])  # one volume in, no leading N out
    assert one["embedding"].shape == (8,) and one["global_weight"].shape == ()
    assert one["input_shape"].tolist() == [48, 48, 48]
    one_batch = client.batch_process(stack[0])
    assert one_batch["embeddings"].shape == (8,) and int(one_batch["n_volumes"]) == 1


def test_statistics(client):
    volume = np.random.default_rng(5).standard_normal((48, 48, 48)) * 3 + 1
    stats = client.statistics(volume)
    assert stats["shape"].tolist() == [48, 48, 48]
    np.testing.assert_allclose([stats[k] for k in ("mean", "std", "min", "max")],
                               [volume.mean(), volume.std(), volume.min(), volume.max()])
    small = np.arange(6.0).reshape(2, 3)
    for binary in (True, False):
        with CryoLensClient(client.url, binary=binary) as c:
            assert float(c.statistics(small)["mean"]) == 2.5


@pytest.mark.parametrize("call", sorted(CALLS))
def test_binary_and_json_agree(client, call):
    stack = particles(2, seed=1)
    with CryoLensClient(client.url, binary=False) as json_client:
        as_json = CALLS[call](json_client, stack)
        single_json = CALLS[call](json_client, stack[0])
    assert_same(CALLS[call](client, stack), as_json)
    assert_same(CALLS[call](client, stack[0]), single_json)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_one_volume_has_the_dtypes_of_a_stack(client, call):
    """global_weight was float64 for one volume (a number in the answer), float32 for a stack."""
    stack = particles(2, seed=1)
    many, one = CALLS[call](client, stack), CALLS[call](client, stack[0])
    assert {k: v.dtype for k, v in one.items()} == {k: v.dtype for k, v in many.items()}


def test_json_sends_one_volume_per_request(server):
    transport = CountingTransport()
    with CryoLensClient(server.url, binary=False, transport=transport) as c:
        c.extract_features(particles(3))
        c.batch_process(particles(3))
    assert [path for _, path, _ in transport.sent] == ["/extract_features"] * 3 + \
        ["/batch_process"]
    assert {kind for _, _, kind in transport.sent} == {"application/json"}


def test_a_stack_equals_one_call_per_volume(client):
    stack = particles(4, seed=2)
    for call in ("reconstruct", "extract_features", "extract_gaussian_splats"):
        together = CALLS[call](client, stack)
        alone = [CALLS[call](client, volume) for volume in stack]
        for key, value in together.items():
            if value.ndim and value.shape[0] == 4 and key not in ("input_shape",
                                                                  "reconstruction_shape"):
                np.testing.assert_allclose(value, np.stack([a[key] for a in alone]),
                                           err_msg=f"{call} {key}", **TOL)
            elif key not in ("input_shape", "reconstruction_shape"):
                np.testing.assert_array_equal(value, alone[0][key], err_msg=f"{call} {key}")


def test_large_stacks_are_split_into_requests(server, client, capsys):
    stack = particles(70, seed=3)
    whole = client.extract_features(stack)  # two requests (64 + 6) at the default size
    transport = CountingTransport()
    with CryoLensClient(server.url, batch_size=32, transport=transport, progress=True) as c:
        split = c.extract_features(stack)
        batch = c.batch_process(stack, return_reconstructions=False, progress=False)
    assert [path for _, path, _ in transport.sent] == ["/extract_features"] * 3 + \
        ["/batch_process"] * 3
    assert split["embedding"].shape == (70, 8) and split["input_shape"].tolist()[0] == 70
    assert_same(split, whole)
    assert int(batch["n_volumes"]) == 70 and int(batch["num_processed"]) == 70
    np.testing.assert_allclose(batch["embeddings"], whole["embedding"], **TOL)
    assert "70/70" in capsys.readouterr().err  # the tqdm bar of the first call
    client.reconstruct(stack[0], progress=True)  # one volume: its bar ends full, not at 0/1
    assert "1/1" in capsys.readouterr().err


@pytest.mark.slow  # tracemalloc slows every allocation
def test_a_stack_is_converted_a_request_at_a_time_not_copied_whole(server):
    """A float64 stack or a strided view (or a memmap) is turned into float32 one request's
    volumes at a time: for a dataset on disk, a whole copy would be the dataset in memory.
    tracemalloc's peak while the stack is sent stays below half of one float32 copy."""
    import gc
    import tracemalloc

    stack = particles(24, seed=6).astype(np.float64)
    with CryoLensClient(server.url, batch_size=2) as c:
        expected = c.extract_features(stack.astype(np.float32))["embedding"]
        gc.collect()
        tracemalloc.start()
        try:
            got = c.extract_features(stack)["embedding"]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        np.testing.assert_allclose(got, expected, **TOL)
        np.testing.assert_allclose(c.extract_features(stack[::-1])["embedding"],
                                   expected[::-1], **TOL)
    whole = stack.size * 4  # one float32 copy of the stack
    assert peak < whole / 2, f"peak {peak / 1e6:.1f} MB, a float32 copy {whole / 1e6:.1f} MB"


def test_async_client_matches(server, client):
    stack = particles(5, seed=4)

    async def run():
        async with AsyncCryoLensClient(server.url, batch_size=2) as c:
            return (await c.health(), await c.extract_features(stack),
                    await c.reconstruct(stack[0]), await c.statistics(stack[0]))

    health, feats, rec, stats = asyncio.run(run())
    assert health == {"status": "healthy"}
    assert_same(feats, client.extract_features(stack))
    assert_same(rec, client.reconstruct(stack[0]))
    assert_same(stats, client.statistics(stack[0]))


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("binary", "field"), [(True, "body"), (False, "input_volume")])
def test_server_errors_carry_message_field_status_and_request_id(server, binary, field):
    with CryoLensClient(server.url, binary=binary) as c, \
            pytest.raises(CryoLensHTTPError) as caught:
        c.extract_features(np.zeros((40, 40, 40), np.float32))
    err = caught.value
    assert isinstance(err, CryoLensError)
    assert err.status == 422 and err.field == field
    assert "(48, 48, 48)" in err.detail and "(40, 40, 40)" in err.detail
    assert re.fullmatch(REQUEST_ID, err.request_id or "")
    assert err.request_id in str(err) and "422" in str(err) and "/extract_features" in str(err)


@pytest.mark.parametrize("binary", [True, False])
def test_validation_errors_are_readable_and_name_the_option(server, binary):
    """A wrong option value is the server's validation error (a list of them), its field the
    keyword argument at fault, whether it travelled as a query parameter or in a JSON body."""
    with CryoLensClient(server.url, binary=binary) as c:
        with pytest.raises(CryoLensHTTPError) as caught:
            c.batch_process(particles(1), batch_size=0)
        assert caught.value.status == 422 and isinstance(caught.value.detail, list)
        assert "batch_size" in str(caught.value) and caught.value.field == "batch_size"
        with pytest.raises(CryoLensHTTPError, match="'reconstruction', 'features' or 'splats'") \
                as caught:
            c.batch_process(particles(1), operation="reconstruct")
        assert caught.value.field == "operation"


def test_wrong_rank_is_refused_before_sending(client):
    with pytest.raises(InputError, match=r"\(D, H, W\)"):
        client.extract_features(np.zeros((48, 48)))
    with pytest.raises(InputError, match="empty"):
        client.extract_features(np.zeros((0, 48, 48, 48)))


@pytest.mark.parametrize("binary", [True, False])
def test_volumes_that_are_not_finite_are_refused_naming_them(server, binary):
    """As JSON, a NaN was sent as the bare token NaN and refused as malformed JSON (400), with
    no word of where it was; now neither mode sends it."""
    stack = particles(5, seed=7).astype(np.float64)
    stack[1, 3, 4, 5] = np.nan
    stack[3, 0, 0, 0] = 1e39  # beyond float32
    transport = CountingTransport()
    with CryoLensClient(server.url, binary=binary, transport=transport) as c:
        with pytest.raises(InputError, match=r"volume\(s\) \[1, 3\] hold NaN or infinity") \
                as caught:
            c.extract_features(stack)
        assert caught.value.field == "volumes"
        with pytest.raises(InputError, match=r"volume\(s\) \[0\]"):
            c.reconstruct(np.full((48, 48, 48), np.inf, np.float32))
        with pytest.raises(InputError, match="volume must be finite") as caught:
            c.statistics(np.array([1.0, np.nan]))
        assert caught.value.field == "volume"
    assert transport.sent == []


@pytest.mark.parametrize(("kwargs", "field", "fragment"), [
    ({"url": "localhost:8023"}, "url", "http:// or https:// address"),  # was 'localhost://'
    ({"url": "127.0.0.1:8023"}, "url", "http:// or https:// address"),
    ({"url": "ftp://127.0.0.1"}, "url", "http:// or https:// address"),
    ({"url": "http://[::1"}, "url", "not a valid URL"),  # was httpx.InvalidURL at a request
    ({"batch_size": 0}, "batch_size", "at least 1"),
    ({"batch_size": "8"}, "batch_size", "at least 1"),  # was TypeError: '<' not supported
])
def test_wrong_settings_are_refused_when_the_client_is_made(kwargs, field, fragment):
    for kind in (CryoLensClient, AsyncCryoLensClient):
        with pytest.raises(InputError, match=re.escape(fragment)) as caught:
            kind(**kwargs)
        assert caught.value.field == field
    with CryoLensClient("https://example.org/cryolens/", batch_size=np.int64(8)) as fine:
        assert (fine.url, fine.batch_size) == ("https://example.org/cryolens", 8)


# -- memory ---------------------------------------------------------------------------------------
@pytest.mark.slow  # tracemalloc slows every allocation
def test_a_stack_answered_in_many_requests_is_never_held_twice(server):
    """Each request's arrays are written into one array per field for the whole stack as they
    come (not kept in a list, then concatenated), and neither a request's body nor an answer's
    outlives its request (httpx keeps its responses in reference cycles that only the cyclic
    garbage collector frees). tracemalloc sees numpy's buffers and bytes alike, so its peak
    counts every copy alive at once."""
    import gc
    import tracemalloc

    n, batch = 24, 3
    stack = particles(n, seed=5)
    with CryoLensClient(server.url, batch_size=batch) as client:
        client.reconstruct(stack[:batch])  # connection and first-call allocations out of the way
        gc.collect()
        tracemalloc.start()
        try:
            out = client.reconstruct(stack)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert_same(out, _one_request(server, stack))  # the same as one request's answer
    whole = sum(v.nbytes for v in out.values())  # 32 MB: volume and its two parts, 24 each
    answer = whole * batch // n  # one request's share
    # a few of one request's copies at once (body, parts, arrays), never the stack's twice
    assert peak < whole + 6 * answer, f"peak {peak / 1e6:.1f} MB for {whole / 1e6:.1f} MB"


def _one_request(server, stack):
    with CryoLensClient(server.url, batch_size=len(stack)) as client:
        return client.reconstruct(stack)
