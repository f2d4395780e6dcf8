"""End to end against a real server process on the v001-layout fixture: the seed's Python client
example runs verbatim, every documented field has its documented shape, and values equal the
engine's in-process results."""
from __future__ import annotations

import contextlib
import io
import re
import threading
import time

import numpy as np
import orjson
import pytest
import requests
from parity_helpers import PARITY_CKPT, SHARED
from server_helpers import start_cli_server

pytestmark = [pytest.mark.skipif(not PARITY_CKPT.exists(),
                                 reason=f"v001 fixture checkpoint not found at {PARITY_CKPT}"),
              pytest.mark.slow]  # a server process on the full-size v001 model

SEED_DOC = SHARED / "seed" / "server.md"
SEED_COPY = __import__("pathlib").Path(__file__).with_name("data") / "seed_client_example.py"
BOX = [48, 48, 48]
RTOL = 1e-5


def seed_client_example() -> str:
    """The "Python Client Example" block of the seed docs (or the committed copy of it)."""
    if SEED_DOC.exists():
        match = re.search(r"## Python Client Example\s+```python\n(.*?)```",
                          SEED_DOC.read_text(), re.DOTALL)
        assert match, "the seed docs lost their Python Client Example"
        return match.group(1)
    return SEED_COPY.read_text()


@pytest.fixture(scope="module")
def server():
    proc = start_cli_server(PARITY_CKPT)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def engine():
    from cryolens.engine import Engine

    return Engine.from_checkpoint(PARITY_CKPT, device="cpu")


def assert_close(actual, expected) -> None:
    expected = np.asarray(expected, np.float32)
    actual = np.asarray(actual, np.float32)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale)


def test_seed_python_client_example_runs_verbatim(server, engine):
    code = seed_client_example()
    assert 'base_url = "http://localhost:8023"' in code
    code = code.replace("http://localhost:8023", f"http://127.0.0.1:{server.port}")
    namespace: dict = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, "seed_client_example", "exec"), namespace)  # noqa: S102
    assert stdout.getvalue().strip() == "{'status': 'healthy'}"

    volume, result, features = namespace["volume"], namespace["result"], namespace["features"]
    assert set(result) >= {"reconstruction", "input_shape", "reconstruction_shape", "embeddings"}
    assert namespace["reconstruction"].shape == (48, 48, 48)
    assert result["input_shape"] == BOX and result["reconstruction_shape"] == BOX
    rec = engine.reconstruct(volume, segments=True)
    assert_close(result["reconstruction"], rec.reconstruction[0])
    assert_close(result["embeddings"], rec.features.embedding[0])
    assert_close(result["segmented_outputs"]["affinity"], rec.affinity_reconstruction[0])
    assert_close(result["segmented_outputs"]["free"], rec.free_reconstruction[0])

    feats = engine.features(volume)
    assert namespace["embedding"].shape == (40,) and namespace["pose"].shape == (4,)
    assert isinstance(features["global_weight"], float)
    assert features["input_shape"] == BOX and features["latent_dims"] == 40
    assert_close(features["embedding"], feats.embedding[0])
    assert_close(features["embeddings"], feats.embedding[0])
    assert_close(features["pose"], feats.pose[0])
    assert abs(np.linalg.norm(features["pose"]) - 1) < 1e-5  # a unit quaternion (w, x, y, z)
    assert_close(features["pose_axis_angle"], feats.pose_axis_angle[0])
    assert_close(features["global_weight"], feats.global_weight[0])

    batch, volumes = namespace["batch_results"], namespace["volumes"]
    assert batch["n_volumes"] == 10 and batch["input_shape"] == BOX
    assert np.shape(batch["reconstructions"]) == (10, 48, 48, 48)
    assert np.shape(batch["embeddings"]) == (10, 40)
    assert np.shape(batch["poses"]) == (10, 4)
    assert np.shape(batch["global_weights"]) == (10,)
    brec = engine.reconstruct(volumes)
    assert_close(batch["reconstructions"], brec.reconstruction)
    assert_close(batch["embeddings"], brec.features.embedding)
    assert_close(batch["poses"], brec.features.pose)
    assert_close(batch["global_weights"], brec.features.global_weight)


def test_info_endpoints_as_documented(server):
    root = requests.get(server.url + "/").json()
    assert root["service"] == "CryoLens VAE Server" and root["status"] == "running"
    assert root["version"] == __import__("cryolens").__version__
    paths = {e["path"] for e in root["endpoints"]}
    assert {"/health", "/model_info", "/reconstruct", "/extract_features",
            "/extract_gaussian_splats", "/batch_process", "/statistics"} <= paths
    assert requests.get(server.url + "/health").json() == {"status": "healthy"}
    info = requests.get(server.url + "/model_info").json()
    assert {k: info[k] for k in ("latent_dim", "latent_ratio", "n_gaussians", "input_shape",
                                 "device")} == {"latent_dim": 40, "latent_ratio": 0.8,
                                                "n_gaussians": 768, "input_shape": BOX,
                                                "device": "cpu"}
    assert info["n_affinity"] == 614 and info["n_free"] == 154
    assert info["checkpoint"] == PARITY_CKPT.name and "/" not in info["checkpoint"]
    assert len(info["sha256"]) == 64 and info["normalisation"] == "z-score"


@pytest.mark.parametrize("include_free", [True, False])
def test_gaussian_splats_match_engine(server, engine, include_free):
    volume = np.random.default_rng(1).standard_normal((48, 48, 48)).astype(np.float32)
    body = requests.post(server.url + "/extract_gaussian_splats",
                         json={"input_volume": volume.tolist(),
                               "include_free_segment": include_free}).json()
    splats = engine.splats(volume, include_free=include_free)
    n = 768 if include_free else 614
    assert (body["n_affinity"], body["n_free"], body["n_total"]) == (614, n - 614, n)
    assert np.shape(body["centers"]) == (n, 3) and body["input_shape"] == BOX
    assert_close(body["centers"], splats.centers[0])
    assert_close(body["weights"], splats.weights[0])
    assert_close(body["scales"], splats.scales[0])


def test_reconstruct_options_change_the_output(server, engine):
    volume = np.random.default_rng(2).standard_normal((48, 48, 48)).astype(np.float32)
    url = server.url + "/reconstruct"
    plain = requests.post(url, json={"input_volume": volume.tolist(),
                                     "use_segmented_decoder": False,
                                     "use_final_convolution": False}).json()
    assert "segmented_outputs" not in plain and "embeddings" not in plain
    assert_close(plain["reconstruction"],
                 engine.reconstruct(volume, final_convolution=False).reconstruction[0])
    posed = requests.post(url, json={"input_volume": volume.tolist(), "use_predicted_pose": True,
                                     "return_splat_data": True}).json()
    assert_close(posed["reconstruction"],
                 engine.reconstruct(volume, use_predicted_pose=True).reconstruction[0])
    assert np.shape(posed["splats"]["centers"]) == (768, 3)


def test_statistics_get_and_post(server):
    small = np.arange(24, dtype=float).reshape(2, 3, 4)
    expected = {"mean": small.mean(), "std": small.std(), "min": 0.0, "max": 23.0}
    got = requests.get(server.url + "/statistics",
                       params={"volume": orjson.dumps(small.tolist()).decode()}).json()
    assert got.pop("shape") == [2, 3, 4]
    assert got == pytest.approx(expected)
    big = np.random.default_rng(3).standard_normal((48, 48, 48))
    for key in ("volume", "volume_data"):
        got = requests.post(server.url + "/statistics", json={key: big.tolist()}).json()
        assert got["shape"] == BOX
        assert got["mean"] == pytest.approx(big.astype(np.float32).mean(), abs=1e-6)


def test_health_answers_while_a_long_batch_runs(server):
    """/health keeps answering while the model works through a batch: several probes are
    answered before the batch's answer comes. The batch goes as .npy and comes back as .npz,
    so nearly all of its request's time is the model's; an event loop blocked by inference
    would answer no probe until the end. (How fast they are answered is bench/server.py's
    figure, not a test's.)"""
    from cryolens import formats

    volumes = np.random.default_rng(4).standard_normal((32, 48, 48, 48)).astype(np.float32)
    outcome: dict = {}

    def post_batch() -> None:
        response = requests.post(server.url + "/batch_process?batch_size=8", timeout=300,
                                 data=formats.write_npy(volumes),
                                 headers={"Content-Type": formats.NPY_MEDIA_TYPE,
                                          "Accept": "application/x-npz"})
        outcome["status"], outcome["content"] = response.status_code, response.content

    thread = threading.Thread(target=post_batch)
    thread.start()
    answered_during = 0
    while thread.is_alive() and answered_during < 3:
        assert requests.get(server.url + "/health", timeout=60).status_code == 200
        answered_during += thread.is_alive()  # answered before the batch was
        time.sleep(0.05)
    thread.join()
    assert outcome["status"] == 200, outcome["content"][:300]
    assert formats.read_npz(outcome["content"])["reconstructions"].shape == (32, 48, 48, 48)
    assert answered_during == 3
