"""Procedural shape families (cryolens.shapes) and the mixed training stream (cryolens.mix)."""
from __future__ import annotations

import numpy as np
import pytest

from cryolens.mix import MixedStream
from cryolens.shapes import FAMILIES, HELD_OUT_FAMILIES, TRAINING_FAMILIES, make_instance
from cryolens.synth import ParticleSimulator
from cryolens.train import TrainSettings


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gives_centred_reproducible_varied_structures(family):
    a = make_instance(family, np.random.default_rng(3))
    again = make_instance(family, np.random.default_rng(3))
    other = make_instance(family, np.random.default_rng(4))
    assert a.name == family
    assert a.coords.dtype == np.float32 and a.coords.shape == (len(a.weights), 3)
    assert np.isfinite(a.coords).all() and (a.weights > 0).all()
    np.testing.assert_array_equal(a.coords, again.coords)
    assert len(a.coords) != len(other.coords) or not np.array_equal(a.coords, other.coords)
    centre = (a.coords * a.weights[:, None]).sum(0) / a.weights.sum()
    assert np.abs(centre).max() < 1e-2  # Å
    # within reach of the 48-voxel box once rotated (clipped shapes reach 300 Å)
    assert np.sqrt((a.coords**2).sum(1)).max() < 420


def test_held_out_families_are_not_training_families():
    assert set(HELD_OUT_FAMILIES) <= set(FAMILIES)
    assert not set(HELD_OUT_FAMILIES) & set(TRAINING_FAMILIES)
    with pytest.raises(ValueError, match="unknown family"):
        make_instance("banana", np.random.default_rng(0))


def test_a_ring_is_a_ring_and_a_rod_is_long():
    """Shapes mean what their names say: a torus has a hole at its centre; a rod is longest
    along its axis."""
    ring = make_instance("ring", np.random.default_rng(0))
    radial = np.sqrt(ring.coords[:, 0] ** 2 + ring.coords[:, 1] ** 2)
    assert radial.min() > 10  # Å: nothing on the axis
    assert np.abs(ring.coords[:, 2]).max() < radial.min()
    rod = make_instance("rod", np.random.default_rng(0))
    spread = rod.coords.std(0)
    assert spread[2] > 1.5 * spread[:2].max()


def test_shapes_image_through_the_simulator():
    shapes = [make_instance(f, np.random.default_rng(i)) for i, f in enumerate(FAMILIES)]
    batch = ParticleSimulator(shapes, snr=5.0, seed=0).sample(len(shapes),
                                                            labels=np.arange(len(shapes)))
    assert np.isfinite(batch.particles).all()
    np.testing.assert_allclose(batch.clean.std(axis=(1, 2, 3)), 1.0, rtol=1e-3)


def test_mixed_stream_batches_pair_views_of_new_instances():
    settings = TrainSettings(families=["ellipsoid", "rod"], real_share=0.5, batch_size=8)
    stream = MixedStream(settings, start_step=0)
    b = stream.batch(5)
    labels = b["labels"].numpy()
    assert b["particles"].shape == (8, 48, 48, 48) and b["pose_points"].shape == (8, 256, 3)
    assert (labels[:4] < 14).all()
    np.testing.assert_array_equal(labels[4:], [14, 14, 15, 15])  # two views per instance
    np.testing.assert_allclose(b["pose_weights"].sum(1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(b["pose_points"][4], b["pose_points"][5])
    assert not np.array_equal(b["particles"][4], b["particles"][5])  # another pose and noise
    np.testing.assert_array_equal(b["particles"], stream.batch(5)["particles"])  # resumable
    with pytest.raises(ValueError, match="unknown families"):
        MixedStream(TrainSettings(families=["ring", "banana"]), 0)
