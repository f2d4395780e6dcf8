"""Training: a short run lowers the loss, resumes, is seeded, fine-tunes on a stack; evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cryolens.checkpoints import load_model
from cryolens.engine import Engine
from cryolens.evaluate import evaluate, gaussian_blur, nearest_neighbour_accuracy, pearson
from cryolens.model.rotation import matrix_to_axis_angle, pose_to_matrix
from cryolens.synth import Structure
from cryolens.train import PoseReference, TrainSettings, train

TINY = {"latent_dims": 8, "affinity_dims": 6, "n_affinity": 24, "n_free": 8}
#: Few points each, so simulating a batch takes milliseconds.
SMALL_STRUCTURES = ["adenylate_kinase", "enolase", "gltph_trimer"]


def _settings(tmp_path, **kw) -> TrainSettings:
    base = dict(out_dir=str(tmp_path / "run"), steps=40, batch_size=4, lr=3e-3, seed=3,
                device="cpu", log_every=5, checkpoint_every=20, structures=SMALL_STRUCTURES,
                **TINY)
    return TrainSettings(**{**base, **kw})


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_training_run_lowers_the_loss(tmp_path):
    """20 steps at a higher learning rate: the same fall of the loss as 40 at 3e-3 (0.92 at
    step 5, 0.81 at steps 15 and 20 with this seed), in half the time."""
    settings = _settings(tmp_path, steps=20, lr=1e-2)
    final = train(settings, progress=False)
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(5, 21, 5))
    first, last = log[0]["recon"], np.mean([r["recon"] for r in log[-2:]])
    assert last < 0.9 * first, (first, last)
    model, info = load_model(final)  # the loader reads what the trainer writes
    assert model.config.n_affinity == 24 and info.layout == "safetensors"


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_continues(tmp_path):
    # two particles a step: equal weights and a resumed step count need no more
    a = train(_settings(tmp_path / "a", steps=6, checkpoint_every=3, batch_size=2),
              progress=False)
    b = train(_settings(tmp_path / "b", steps=6, checkpoint_every=3, batch_size=2),
              progress=False)
    wa, wb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # resume: a longer run in the same folder starts from step 6, not 0
    train(_settings(tmp_path / "a", steps=9, checkpoint_every=3, batch_size=2), progress=False)
    steps = [r["step"] for r in _log(tmp_path / "a" / "run")]
    assert steps[-1] == 9 and steps.count(5) == 1


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


@pytest.mark.skipif(max(_blas_threads(), default=1) < 2, reason="numpy's BLAS has one thread")
def test_threads_bound_numpys_blas_while_the_simulator_runs(tmp_path, monkeypatch):
    """``--threads 1`` holds the simulator's matrix products to one BLAS thread (two runs
    side by side otherwise spin each other's threads), and gives the pool back afterwards."""
    from cryolens.synth import ParticleSimulator

    before, torch_threads, seen = _blas_threads(), torch.get_num_threads(), []
    render = ParticleSimulator.render

    def watched(self, *args, **kwargs):
        seen.extend(_blas_threads())
        return render(self, *args, **kwargs)

    monkeypatch.setattr(ParticleSimulator, "render", watched)
    train(_settings(tmp_path, steps=1, batch_size=2, threads=1), progress=False)
    assert seen and set(seen) == {1}
    assert _blas_threads() == before and torch.get_num_threads() == torch_threads


@pytest.mark.slow
def test_fine_tune_on_a_particle_stack(tmp_path):
    stack = np.random.default_rng(0).standard_normal((6, 48, 48, 48)).astype(np.float32)
    np.save(tmp_path / "particles.npy", stack)
    start = train(_settings(tmp_path / "base", steps=2), progress=False)
    final = train(_settings(tmp_path, steps=4, data=str(tmp_path / "particles.npy"),
                            init=str(start)), progress=False)
    log = _log(tmp_path / "run")
    assert "pose" not in log[-1] and np.isfinite(log[-1]["total"])
    assert not torch.equal(load_file(str(start))["mu.weight"], load_file(str(final))["mu.weight"])


@pytest.mark.slow
def test_pose_curriculum_widens_to_all_rotations(tmp_path):
    from cryolens.train import SimulatedStream

    # 16 rotations: past the curriculum, all 16 within 105 degrees of the identity has a
    # chance of 0.28 ** 16 (~1e-9) for uniform rotations; each simulated particle costs ~0.1 s
    settings = _settings(tmp_path, batch_size=16, curriculum_steps=10, start_angle=30.0)
    stream = SimulatedStream(settings, start_step=0)

    def angles(step):
        r = stream.batch(step)["rotations"].numpy()
        return np.degrees(np.arccos(np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1, 1)))

    assert angles(0).max() <= 30.0 + 1e-3
    assert angles(5).max() <= 105.0 + 1e-3
    assert angles(10).max() > 105.0  # past the curriculum: all of SO(3)


def test_matrix_to_axis_angle_round_trips():
    pose = torch.randn(64, 4, dtype=torch.float64)
    rot = pose_to_matrix(pose)
    assert torch.allclose(pose_to_matrix(matrix_to_axis_angle(rot)), rot, atol=1e-6)


def _about_z(degrees: float) -> torch.Tensor:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float32)


def test_pose_loss_is_zero_for_symmetry_equivalent_poses_only():
    # a 4-fold ring (C4 about z) with a tag off-axis, and an asymmetric cluster
    ring = np.array([[30, 0, 0], [0, 30, 0], [-30, 0, 0], [0, -30, 0]], np.float32)
    asym = np.array([[40, 0, 0], [0, 20, 5], [-10, -10, 30], [5, 0, -25]], np.float32)
    structures = [Structure(n, "none", c, np.ones(len(c), np.float32))
                  for n, c in (("ring", ring), ("asym", asym))]
    reference = PoseReference(structures, voxel_size=10.0)
    start = torch.from_numpy(np.linalg.qr(np.random.default_rng(4).standard_normal((3, 3)))[0]
                             .astype(np.float32))
    start = start * torch.sign(torch.det(start))
    labels = torch.tensor([0, 1])

    def loss(turn: float) -> float:
        true = torch.stack([start, start])
        predicted = torch.stack([start @ _about_z(turn)] * 2)
        return reference.loss(predicted[:1], true[:1], labels[:1]).item(), \
            reference.loss(predicted[1:], true[1:], labels[1:]).item()

    assert max(loss(0.0)) < 1e-6
    ring_90, asym_90 = loss(90.0)
    assert ring_90 < 1e-5 and asym_90 > 0.15  # the ring looks the same, the cluster does not
    ring_45, _ = loss(45.0)
    assert ring_45 > 0.15


def test_metrics():
    a = np.random.default_rng(1).standard_normal((3, 8, 8, 8))
    assert np.allclose(pearson(a, 2 * a + 1), 1) and np.allclose(pearson(a, -a), -1)
    blurred = gaussian_blur(a.astype(np.float32), 1.5)
    assert blurred.std() < a.std() and abs(blurred.mean() - a.mean()) < 1e-5
    emb = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5]])
    assert nearest_neighbour_accuracy(emb, np.array([0, 0, 1, 1])) == 1.0
    assert nearest_neighbour_accuracy(emb, np.array([0, 1, 0, 1])) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("snr", [5.0])
def test_evaluate_reports_and_writes_slices(tmp_path, snr):
    torch.manual_seed(0)
    from cryolens.model import CryoLensConfig, CryoLensVAE

    engine = Engine(CryoLensVAE(CryoLensConfig(**TINY)), device="cpu")
    reports = evaluate(engine, snrs=(snr,), per_structure=2, png=tmp_path / "s.png")
    (r,) = reports
    assert r.n_particles == 28 and -1 <= r.reconstruction_correlation <= 1
    assert 0.5 < r.blurred_input_correlation < 1
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_particles_load_from_mrc_folder_npy_and_h5(tmp_path):
    import h5py
    import mrcfile

    from cryolens.train import load_particles

    stack = np.random.default_rng(2).standard_normal((3, 48, 48, 48)).astype(np.float32)
    folder = tmp_path / "mrc"
    folder.mkdir()
    for i, volume in enumerate(stack):
        with mrcfile.new(folder / f"p{i}.mrc") as mrc:
            mrc.set_data(volume)
    np.save(tmp_path / "s.npy", stack)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["particles"] = stack
    for source in (folder, tmp_path / "s.npy", tmp_path / "s.h5"):
        assert np.array_equal(load_particles(source), stack)
    (tmp_path / "s.txt").write_text("not particles\n")
    with pytest.raises(ValueError, match="cannot read particles"):
        load_particles(tmp_path / "s.txt")


@pytest.mark.slow  # five stages of two steps each
def test_the_demo_recipe_runs_every_stage_from_scratch(tmp_path):
    """``scripts/train_demo.py --from-scratch``, each stage cut to two steps: the stages chain
    (each starts from the one before), write a demo-shaped model and leave the package alone."""
    import subprocess
    import sys
    from pathlib import Path

    from cryolens.checkpoints import sha256_of
    from cryolens.train import DEMO_CONFIG

    repo = Path(__file__).resolve().parents[1]
    shipped = sha256_of(repo / "src" / "cryolens" / "data" / "demo.safetensors")
    done = subprocess.run([sys.executable, str(repo / "scripts" / "train_demo.py"),
                           "--from-scratch", "--stage-steps", "2", "--no-ship", "--quiet",
                           "--device", "cpu", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = ["1-structures", "2-pose", "3-predicted-pose", "4-shapes", "5-shapes-again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == stages
    inits = [json.loads((tmp_path / s / "settings.json").read_text())["init"] for s in stages]
    assert inits == [None, *(str(tmp_path / s / "final.safetensors") for s in stages[:-1])]
    assert [_log(tmp_path / s)[-1]["step"] for s in stages] == [2] * 5
    model, _ = load_model(tmp_path / stages[-1] / "final.safetensors")
    assert model.config == DEMO_CONFIG and "5-shapes-again" in done.stdout
    assert sha256_of(repo / "src" / "cryolens" / "data" / "demo.safetensors") == shipped


def test_a_widened_demo_decodes_as_before(tmp_path):
    """``scripts/widen_demo.py``: more affinity latent dimensions, the same reconstructions and
    the same old dimensions of the embedding (the new ones are read through zero columns)."""
    import subprocess
    import sys
    from pathlib import Path

    from cryolens.synth import ParticleSimulator

    script = Path(__file__).resolve().parents[1] / "scripts" / "widen_demo.py"
    out = tmp_path / "wide.safetensors"
    done = subprocess.run([sys.executable, str(script), "demo", str(out), "--affinity-dims", "20"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    particles = ParticleSimulator(snr=5.0, seed=3).sample(3).particles
    before = Engine.from_checkpoint("demo", device="cpu").reconstruct(particles,
                                                                      use_predicted_pose=True)
    after = Engine.from_checkpoint(str(out), device="cpu").reconstruct(particles,
                                                                       use_predicted_pose=True)
    assert after.features.embedding.shape == (3, 24)
    np.testing.assert_array_equal(after.reconstruction, before.reconstruction)
    old, new = before.features.embedding, after.features.embedding
    np.testing.assert_array_equal(new[:, :12], old[:, :12])
    np.testing.assert_array_equal(new[:, 20:], old[:, 12:])
    assert np.abs(new[:, 12:20]).max() > 0  # the new dimensions carry the encoder's features
