"""The shipped demo checkpoint: present, intact, the expected shape, and served with no network."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from importlib import resources

import numpy as np
import pytest

from cryolens.checkpoints import list_checkpoints, load_model, sha256_of
from cryolens.engine import Engine
from cryolens.evaluate import evaluate
from cryolens.train import DEMO_CONFIG

DATA = resources.files("cryolens.data")  # the package data of cryolens-server


def test_demo_file_matches_its_recorded_hash():
    weights = DATA / "demo.safetensors"
    recorded = (DATA / "demo.safetensors.sha256").read_text().split()[0]
    assert len(recorded) == 64
    assert sha256_of(weights) == recorded
    assert weights.stat().st_size < 10 * 1024**2  # a few MB, as promised


def test_demo_loads_by_name_with_the_demo_configuration():
    model, info = load_model("demo")
    assert info.display_name == "demo" and info.layout == "safetensors"
    assert model.config == DEMO_CONFIG
    row = next(r for r in list_checkpoints() if r["name"] == "demo")
    assert row["available"]


@pytest.mark.slow
def test_demo_evaluation_reproduces_the_model_card_and_meets_the_targets():
    """``cryolens evaluate --checkpoint demo`` (same seed, same held-out particles) gives the
    figures recorded next to the model card, and those meet the project's targets at SNR 5."""
    recorded = json.loads((DATA / "demo_evaluation.json").read_text())
    reports = evaluate(Engine.from_checkpoint("demo", device="cpu"),
                       snrs=tuple(r["snr"] for r in recorded))
    for mine, theirs in zip(reports, recorded, strict=True):
        assert mine.n_particles == theirs["n_particles"] == 280
        for key in ("reconstruction_correlation", "blurred_input_correlation"):
            assert abs(getattr(mine, key) - theirs[key]) < 2e-3, key
        for key in ("nn_accuracy", "nn_accuracy_affinity"):  # one particle = 0.36 %
            assert abs(getattr(mine, key) - theirs[key]) <= 1 / 280 + 1e-9, key
    at_5 = next(r for r in reports if r.snr == 5.0)
    assert at_5.reconstruction_correlation >= 0.9
    assert at_5.reconstruction_correlation > at_5.blurred_input_correlation
    assert at_5.nn_accuracy >= 0.95


@pytest.mark.slow  # simulates and encodes particles of every structure
def test_demo_encodes_structures_apart():
    """A trained model, not a random one: two different structures embed further apart than
    two particles of the same structure (affinity part of the embedding)."""
    from cryolens.synth import ParticleSimulator

    engine = Engine.from_checkpoint("demo", device="cpu")
    labels = np.repeat([0, 4], 6)  # a ribosome and apoferritin
    batch = ParticleSimulator(snr=5.0, seed=7).sample(len(labels), labels=labels)
    emb = engine.features(batch.particles).embedding[:, : DEMO_CONFIG.affinity_dims]
    within = np.mean([np.linalg.norm(emb[i] - emb[j]) for i in range(6) for j in range(i + 1, 6)])
    between = np.mean([np.linalg.norm(emb[i] - emb[6 + j]) for i in range(6) for j in range(6)])
    assert between > 2 * within


def _can_isolate_network() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.slow  # a server process
@pytest.mark.skipif(not _can_isolate_network(),
                    reason="needs `unshare -n` (root, util-linux) and `ip` to run without a "
                           "network")
def test_server_serves_demo_with_no_network():
    """Start the documented command in a network namespace with only loopback."""
    script = textwrap.dedent(f"""
        set -e
        ip link set lo up
        {sys.executable} -m cryolens.server.minimal_cryolens_server --checkpoint demo \\
            --host 127.0.0.1 --port 8023 --device cpu > /tmp/cryolens-demo-offline.log 2>&1 &
        pid=$!
        {sys.executable} - <<'PY'
        import json, time, urllib.request, numpy as np
        base = "http://127.0.0.1:8023"
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/health", timeout=1); break
            except OSError:
                time.sleep(0.2)
        volume = np.random.default_rng(0).standard_normal((48, 48, 48)).tolist()
        body = json.dumps({{"input_volume": volume}}).encode()
        out = {{}}
        for path in ("/extract_features", "/reconstruct", "/extract_gaussian_splats"):
            req = urllib.request.Request(base + path, body, {{"Content-Type": "application/json"}})
            out[path] = sorted(json.load(urllib.request.urlopen(req, timeout=120)))
        out["model_info"] = json.load(urllib.request.urlopen(base + "/model_info"))
        print(json.dumps(out))
        PY
        kill $pid
    """)
    done = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True,
                          check=False,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["model_info"]["checkpoint"] == "demo" and out["model_info"]["latent_dim"] == 16
    assert "embedding" in out["/extract_features"] and "pose" in out["/extract_features"]
    assert "reconstruction" in out["/reconstruct"]
    assert "centers" in out["/extract_gaussian_splats"]


@pytest.mark.slow  # simulates and reconstructs 224 particles
def test_demo_generalisation_reproduces_the_model_card():
    """``cryolens evaluate --leave-family-out`` on the held-out groups gives the figures recorded
    next to the model card (demo_generalisation.json): its r per group and SNR, its embedding
    checks (which read the held-out groups only) and its gap to the best blur."""
    from cryolens.generalisation import HELD_OUT_GROUPS, evaluate_generalisation, summary

    recorded = json.loads((DATA / "demo_generalisation.json").read_text())
    groups, embeddings = evaluate_generalisation(Engine.from_checkpoint("demo", device="cpu"),
                                                 groups=HELD_OUT_GROUPS)
    theirs = {(g["group"], g["snr"]): g for g in recorded["groups"]}
    for mine in groups:
        row = theirs[mine.group, mine.snr]
        assert mine.held_out and row["held_out"] and mine.n_particles == row["n_particles"]
        assert abs(mine.model_r - row["model_r"]) < 2e-3, (mine.group, mine.snr)
        assert abs(mine.blur_r - row["blur_r"]) < 1e-4 and mine.blur_sigma == row["blur_sigma"]
    for mine, row in zip(embeddings, recorded["embeddings"], strict=True):
        for key in ("nn_accuracy", "nn_accuracy_families", "five_shot_accuracy",
                    "instance_retrieval"):  # one particle = 0.9 %
            assert abs(getattr(mine, key) - row[key]) <= 1 / mine.n_particles + 1e-9, key
    gap = summary(groups)
    assert gap.keys() == recorded["held_out_gap"].keys()
    assert all(abs(gap[k] - v) < 2e-3 for k, v in recorded["held_out_gap"].items())
