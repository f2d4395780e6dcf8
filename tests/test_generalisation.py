"""The leave-family-out evaluation (cryolens.generalisation): frozen sets, honest metrics."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cryolens.evaluate import gaussian_blur
from cryolens.generalisation import (
    GENERALISATION_SEED,
    PROTEINS,
    best_blur,
    evaluation_set,
    few_shot_accuracy,
    fingerprint,
    held_out_structures,
    nn_accuracy,
)
from cryolens.shapes import FAMILIES, HELD_OUT_FAMILIES, TRAINING_FAMILIES
from cryolens.synth import load_structures

#: Digest of the 16 evaluation instances of every family (coordinates to 0.01 Å): a change to
#: any generator changes the evaluation sets, and this says so.
INSTANCES_DIGEST = "845007f06010135a"
#: fingerprint() of the held-out evaluation sets of 16 (SNR 5, then SNR 1).
HELD_OUT_FINGERPRINTS = {
    ("ring", 5.0): "463a493b6ee9e969", ("filament", 5.0): "7a340b23eac34560",
    (PROTEINS, 5.0): "f453d4b6e76721b0", ("ring", 1.0): "293e2369696a231b",
    ("filament", 1.0): "40af1c535bc8ace1", (PROTEINS, 1.0): "ba2411c73b3bf11a",
}


def test_the_evaluation_instances_are_frozen():
    from cryolens.shapes import make_instance

    h = hashlib.sha256()
    for g, family in enumerate(FAMILIES):
        for i in range(16):
            s = make_instance(family, np.random.default_rng([GENERALISATION_SEED, g, i]))
            h.update(np.round(s.coords.astype(np.float64), 2).tobytes())
            h.update(np.round(s.weights.astype(np.float64), 3).tobytes())
    assert h.hexdigest()[:16] == INSTANCES_DIGEST


@pytest.mark.slow  # simulates 224 particles
def test_the_held_out_evaluation_sets_are_frozen():
    for k, snr in enumerate((5.0, 1.0)):
        for group in ("ring", "filament", PROTEINS):
            batch, _ = evaluation_set(group, snr, 16, snr_index=k)
            assert fingerprint(batch) == HELD_OUT_FINGERPRINTS[group, snr], (group, snr)


def test_held_out_proteins_are_real_and_not_training_structures():
    held = held_out_structures()
    assert len(held) >= 3
    training = {s.pdb_id for s in load_structures()}
    assert not {s.pdb_id for s in held} & training
    for s in held:
        centre = (s.coords * s.weights[:, None]).sum(0) / s.weights.sum()
        assert len(s.coords) > 200 and np.abs(centre).max() < 1e-2  # centred, Å
    assert set(HELD_OUT_FAMILIES).isdisjoint(TRAINING_FAMILIES) and len(HELD_OUT_FAMILIES) >= 2


def test_family_sets_pair_two_views_of_each_instance():
    batch, instance = evaluation_set("ring", 5.0, 2)
    np.testing.assert_array_equal(instance, [0, 0, 1, 1])
    assert not np.allclose(batch.clean[0], batch.clean[1])  # two poses of one ring
    again, _ = evaluation_set("ring", 5.0, 2)
    np.testing.assert_array_equal(batch.particles, again.particles)


def test_best_blur_finds_the_sigma_that_undoes_the_noise_best():
    rng = np.random.default_rng(0)
    truth = gaussian_blur(rng.standard_normal((4, 24, 24, 24)).astype(np.float32), 3.0)
    noisy = truth + 0.3 * truth.std() * rng.standard_normal(truth.shape).astype(np.float32)
    r, sigma = best_blur(noisy, truth)
    assert sigma >= 1.0 and r > 0.95
    r_sharp, sigma_sharp = best_blur(truth, truth)  # nothing to remove: the least blur wins
    assert sigma_sharp == 0.5 and r_sharp > r


def test_embedding_checks_on_clusters():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 8)) * 10
    labels = np.repeat(np.arange(3), 10)
    emb = centres[labels] + rng.standard_normal((30, 8))
    acc, nearest = nn_accuracy(emb, labels)
    assert acc == 1.0 and (nearest != np.arange(30)).all()
    assert few_shot_accuracy(emb, labels) == 1.0
    assert few_shot_accuracy(rng.standard_normal((30, 8)), labels) < 0.8  # chance is 1/3
