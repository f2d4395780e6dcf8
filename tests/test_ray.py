"""The same API through Ray Serve, and ``cryolens embed --ray`` through Ray Data, on a real local
Ray cluster that this module starts and stops itself (its own temp dir; a second node joined
with ``ray start --address --block`` in its own process group, ended by that group's id).

Skipped at once where Ray is not installed (``pip install 'cryolens-server[ray]'``)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'cryolens-server[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install "
                                        "'cryolens-server[ray]'")

import requests
from io_helpers import make_copick_project, particle_stack, write_mrc
from server_helpers import free_port, small_model_file

from cryolens import formats
from cryolens.cli import main
from cryolens.server.ray import NODE_HEADER, REPLICA_HEADER, RayOptions
from cryolens.server.settings import Settings

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
PREFER_LOCAL = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray cluster owned by this process; ``ray.shutdown()`` stops exactly it."""
    temp = tempfile.mkdtemp(prefix="crt", dir="/tmp")  # short: Ray's socket paths must fit
    # One proxy (on the head) for both nodes: by default it sends everything to the replica on
    # its own node while that one has room, and the second node's replica would sit idle.
    saved = os.environ.get(PREFER_LOCAL)
    os.environ[PREFER_LOCAL] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop(PREFER_LOCAL, None)
        else:
            os.environ[PREFER_LOCAL] = saved


# -- cryolens embed --ray (first: Ray Data needs the cluster's CPUs free) ----------------------
def _same_rows(local: Path, remote: Path) -> None:
    import pyarrow.parquet as pq

    a, b = pq.read_table(local), pq.read_table(remote)
    assert a.schema.names == b.schema.names
    assert [str(t) for t in a.schema.types] == [str(t) for t in b.schema.types]
    assert "extension" not in str(b.schema)
    for name in a.schema.names:
        x, y = a[name].to_numpy(zero_copy_only=False), b[name].to_numpy(zero_copy_only=False)
        if x.dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-6, err_msg=name)
        else:
            assert list(x) == list(y), name


def test_embed_ray_mrc_files_gives_the_same_rows(cluster, model, tmp_path, capsys):
    folder = tmp_path / "mrc"
    folder.mkdir()
    for i, volume in enumerate(particle_stack(6)):
        write_mrc(folder / f"p{i}.mrc", volume)
    common = [str(folder), "-c", str(model), "--device", "cpu", "--quiet", "--batch-size", "4"]
    assert main(["embed", *common, "-o", str(tmp_path / "local.parquet")]) == 0
    assert main(["embed", *common, "-o", str(tmp_path / "ray.parquet"), "--ray",
                 "--actors", "1", "--chunk-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "embedded 6 particles" in out and "particles/s" in out
    _same_rows(tmp_path / "local.parquet", tmp_path / "ray.parquet")


def test_embed_ray_copick_runs_split_across_tasks(cluster, model, tmp_path, capsys):
    (tmp_path / "copick").mkdir()
    config, _ = make_copick_project(tmp_path / "copick")
    common = [str(config), "--object", "ribosome", "-c", str(model), "--device", "cpu",
              "--quiet"]
    assert main(["embed", *common, "-o", str(tmp_path / "local.parquet")]) == 0
    assert main(["embed", *common, "-o", str(tmp_path / "ray.parquet"), "--ray",
                 "--actors", "1", "--chunk-size", "2"]) == 0  # TS_1 in two tasks, TS_2 in one
    assert "embedded 4 particles" in capsys.readouterr().out
    _same_rows(tmp_path / "local.parquet", tmp_path / "ray.parquet")


# -- Ray Serve ------------------------------------------------------------------------------------
def _settings(model) -> Settings:
    return Settings(checkpoint=str(model), device="cpu", host="127.0.0.1", port=free_port())


@pytest.fixture(scope="module")
def served(cluster, model):
    from cryolens.server.ray import start

    settings = _settings(model)
    running = start(settings, RayOptions(replicas=1, proxy_location="HeadOnly"))
    yield running, settings
    running.stop()  # deletes the app; the cluster fixture stops Serve and Ray


@pytest.fixture(scope="module")
def plain(model):
    """The plain server: the same factory and settings, in this process."""
    from fastapi.testclient import TestClient

    from cryolens.server.app import create_app

    with TestClient(create_app(_settings(model))) as client:
        yield client


def test_seed_api_binary_and_docs_through_ray_serve_match_the_plain_server(served, plain):
    running, _ = served
    volume = particle_stack(1, seed=3)[0]
    for path in ("/extract_features", "/reconstruct"):
        got = requests.post(running.url + path, json={"input_volume": volume.tolist()},
                            timeout=60)
        want = plain.post(path, json={"input_volume": volume.tolist()})
        assert got.status_code == want.status_code == 200, got.text[:300]
        g, w = got.json(), want.json()
        assert set(g) == set(w)
        for key, value in w.items():
            if isinstance(value, list):
                np.testing.assert_allclose(np.asarray(g[key], float), np.asarray(value, float),
                                           rtol=1e-5, atol=1e-6, err_msg=key)
        assert got.headers.get(REPLICA_HEADER)
        assert got.headers["x-request-id"].count(",") == 0  # echoed once, as by uvicorn
    # binary: .npy in, .npz out
    stack = particle_stack(3, seed=4)
    headers = {"Content-Type": formats.NPY_MEDIA_TYPE, "Accept": formats.NPZ_MEDIA_TYPE}
    got = requests.post(running.url + "/batch_process", data=formats.write_npy(stack),
                        headers=headers, timeout=60)
    want = plain.post("/batch_process", content=formats.write_npy(stack), headers=headers)
    assert got.status_code == 200 and got.headers["content-type"].startswith(
        formats.NPZ_MEDIA_TYPE)
    g, w = formats.read_npz(got.content), formats.read_npz(want.content)
    assert set(g) == set(w)
    for key in w:
        if w[key].dtype.kind == "f":
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    # errors are mapped the same way, and the offline docs and schema are served
    bad = requests.post(running.url + "/extract_features", json={"input_volume": [1, 2]},
                        timeout=30)
    assert bad.status_code == plain.post("/extract_features",
                                         json={"input_volume": [1, 2]}).status_code
    assert bad.json().keys() == plain.post("/extract_features",
                                           json={"input_volume": [1, 2]}).json().keys()
    docs = requests.get(running.url + "/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    got, want = requests.get(running.url + "/openapi.json", timeout=30).json(), \
        plain.get("/openapi.json").json()
    assert got == want


def test_two_nodes_two_replicas_both_serve_and_nothing_is_lost(served, cluster, model):
    running, settings = served
    from ray import serve

    from cryolens.server.ray import APP_NAME, build, wait_ready

    worker = subprocess.Popen(
        [RAY, "start", "--address", cluster, "--num-cpus", "1", "--block",
         "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert worker.poll() is None, "the second node's ray start exited"
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(0.5)
        options = RayOptions(replicas=2, replica_cpus=1, max_replicas_per_node=1,
                             proxy_location="HeadOnly")
        serve.run(build(settings, options), name=APP_NAME, route_prefix="/", blocking=False)
        wait_ready(running.url, 120)  # serve.run returned: both replicas are running
        body = formats.write_npy(particle_stack(1, seed=5)[0])
        headers = {"Content-Type": formats.NPY_MEDIA_TYPE, "Accept": formats.NPZ_MEDIA_TYPE}

        def call(_):
            answer = requests.post(running.url + "/extract_features", data=body,
                                   headers=headers, timeout=60)
            return answer.status_code, answer.headers.get(REPLICA_HEADER), \
                answer.headers.get(NODE_HEADER)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(48)))
        assert [status for status, _, _ in answers] == [200] * 48
        assert len({replica for _, replica, _ in answers}) == 2, answers
        assert len({node for _, _, node in answers}) == 2, answers
    finally:
        try:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)


# -- the command line and the cluster config ------------------------------------------------------
def test_ray_flags_need_ray_and_replace_workers(capsys):
    from cryolens.server.minimal_cryolens_server import main as serve_main

    with pytest.raises(SystemExit) as exit_:
        serve_main(["--replicas", "2"])
    assert exit_.value.code == 2 and "--replicas only apply with --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        serve_main(["--ray", "--workers", "2"])
    assert exit_.value.code == 2 and "use --replicas" in capsys.readouterr().err


def test_options_reach_the_deployment_and_the_replicas_environment():
    from cryolens.server.ray import deployment_options

    settings = Settings(checkpoint="v001", device="cuda", queue_size=40, max_batch_size=64)
    fixed = deployment_options(settings, RayOptions(replicas=3, replica_cpus=4, replica_gpus=1))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 104  # > Serve's 5
    actor = fixed["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (4, 1)
    env = actor["runtime_env"]["env_vars"]
    assert env["OMP_NUM_THREADS"] == "4" and Settings.from_env(env) == settings
    scaled = deployment_options(settings, RayOptions.from_env(
        {"CRYOLENS_RAY_REPLICAS": "2", "CRYOLENS_RAY_MAX_REPLICAS": "8"}))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["max_replicas"] == 8
    assert scaled["autoscaling_config"]["initial_replicas"] == 2


def test_rayservice_example_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from cryolens.server.ray import RAY_ENV_PREFIX

    document = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "rayservice.yaml")
                              .read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(document["spec"]["serveConfigV2"])) \
        if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(yaml.safe_load(document["spec"]["serveConfigV2"]))
    (application,) = config.applications
    assert application.import_path == "cryolens.server.ray:app"
    env = application.runtime_env["env_vars"]
    Settings.from_env(env)
    options = RayOptions.from_env(env)
    assert options.replica_gpus == 1 and options.max_replicas == 8
    known = {f"CRYOLENS_{name.upper()}" for name in Settings.__dataclass_fields__} | \
        {RAY_ENV_PREFIX + name.upper() for name in RayOptions.__dataclass_fields__}
    assert set(env) <= known
