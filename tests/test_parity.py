"""Parity with the public CryoLens reference: every golden array of ../shared/parity/.

Tolerances are those of ../shared/parity/README.md. Reference-only splat layouts (its swapped
sigmas/weights, odd column orders) are rebuilt here from our decoder's own outputs, to show our
numbers carry the same information.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_helpers import needs_parity

pytestmark = needs_parity

ENC_ATOL, RAW_ATOL, CONV_ATOL, RECON_RTOL = 1e-6, 2e-4, 1e-5, 1e-5
CONSTANT = 2  # position of input 4 (constant_3.7) in the dev subset


def _close(ours, ref, atol, what):
    err = np.abs(np.asarray(ours, np.float64) - ref).max()
    assert err <= atol, f"{what}: max |ours - reference| = {err:.3g} > {atol:g}"
    return err


def _t(array):
    return torch.from_numpy(np.ascontiguousarray(array, np.float32))


@pytest.fixture(scope="module")
def mu(golden):
    return _t(golden["mu"])


def _decode(engine, z, pose, gw, region, segment=None):
    decoder = engine.model.decoder
    with torch.inference_mode():
        splats = decoder.splats(z, pose, gw)
        if segment:
            splats = splats.segment(segment)
        render = decoder.render(splats, region)
        if region == "conv":
            render = decoder.final_convolution(render)
    return render.numpy()


def _identity(engine, n):
    return engine.model.identity_pose(n)


def test_grid_is_torch_linspace(parity_engine, golden):
    assert np.array_equal(parity_engine.model.decoder.grid_axis.numpy(), golden["grid_linspace74"])


def test_normalisation_bit_exact_including_constant_volume(parity_engine, golden):
    norm = parity_engine.normalise(golden["inputs"])
    assert np.array_equal(norm.volumes, golden["normalized"])
    assert np.array_equal(norm.mean.astype(np.float64), golden["norm_mean"])
    assert np.array_equal(norm.std.astype(np.float64), golden["norm_std"])
    assert np.allclose(norm.volumes[CONSTANT], -0.1925, atol=1e-4)


def test_encoder_heads(parity_engine, golden):
    f = parity_engine.features(golden["inputs"])
    _close(f.embedding, golden["mu"], ENC_ATOL, "mu")
    _close(f.log_variance, golden["log_var"], ENC_ATOL, "log_var")
    _close(f.pose_axis_angle, golden["pose_raw"], ENC_ATOL, "pose")
    _close(f.global_weight, golden["global_weight"][:, 0], ENC_ATOL, "global_weight")
    _close(f.pose, golden["quaternion"], ENC_ATOL, "quaternion")
    from cryolens.model.rotation import pose_to_matrix

    _close(pose_to_matrix(_t(golden["pose_raw"])).numpy(), golden["rotation_matrix"], ENC_ATOL,
           "rotation matrix")


def test_encoder_float64_truth(parity_engine, golden):
    """Ours is as close to the float64 truth as the reference's float32 is (constant excluded)."""
    f = parity_engine.features(golden["inputs"])
    keep = [i for i in range(len(golden["inputs"])) if i != CONSTANT]
    for ours, key in [(f.embedding, "mu"), (f.log_variance, "log_var"),
                      (f.pose_axis_angle, "pose_raw"), (f.pose, "quaternion")]:
        truth = golden[key + "_f64"][keep]
        ref_err = np.abs(golden[key][keep] - truth).max()
        our_err = np.abs(ours[keep] - truth).max()
        assert our_err <= 2 * ref_err + 1e-7, (key, our_err, ref_err)


def test_pipeline_reconstruction(parity_engine, golden):
    r = parity_engine.reconstruct(golden["inputs"])
    rows = zip(r.reconstruction, golden["recon_pipeline"], golden["norm_std"], strict=True)
    for i, (ours, ref, std) in enumerate(rows):
        span = max(float(ref.max() - ref.min()), float(std))
        _close(ours, ref, RECON_RTOL * span, f"recon_pipeline[{i}]")
    _close(r.features.embedding, golden["mu"], ENC_ATOL, "mu from reconstruct")


def test_pipeline_reconstruction_without_final_convolution(parity_engine, golden):
    positions = [list(golden["subset_of_golden_idx"]).index(i)
                 for i in golden["recon_pipeline_noconv_idx"]]
    r = parity_engine.reconstruct(golden["inputs"][positions], final_convolution=False)
    for ours, ref, std in zip(r.reconstruction, golden["recon_pipeline_noconv"],
                              golden["norm_std"][positions], strict=True):
        _close(ours, ref, RAW_ATOL * std + 1e-5 * abs(ref).max(), "recon_pipeline_noconv")


@pytest.mark.parametrize("mode", ["id", "pred"])
def test_decoder_conv_outputs(parity_engine, golden, mu, mode):
    n = len(mu)
    pose, gw = (_identity(parity_engine, n) if mode == "id"
                else (_t(golden["pose_raw"]), _t(golden["global_weight"])))
    out = _decode(parity_engine, mu, pose, gw, "conv")
    _close(out, golden[f"dec_{mode}_conv"], CONV_ATOL, f"dec_{mode}_conv")
    keep = [i for i in range(n) if i != CONSTANT]
    truth = golden[f"dec_{mode}_conv_f64"][keep]
    ref_err = np.abs(golden[f"dec_{mode}_conv"][keep] - truth).max()
    assert np.abs(out[keep] - truth).max() <= 2 * ref_err + 2e-6


def test_decoder_explicit_poses_including_tiny_axis(parity_engine, golden, mu):
    out = _decode(parity_engine, mu, _t(golden["explicit_pose"]), _t(golden["explicit_gw"]), "conv")
    _close(out, golden["dec_explicit_conv"], CONV_ATOL, "dec_explicit_conv")


@pytest.mark.parametrize("segment", ["affinity", "free"])
def test_segments(parity_engine, golden, mu, segment):
    pose, gw = _identity(parity_engine, len(mu))
    out = _decode(parity_engine, mu, pose, gw, "conv", segment)
    _close(out, golden[f"seg_id_{segment}_conv"], CONV_ATOL, f"seg_id_{segment}_conv")
    pos = golden["noconv_subset_pos"]
    raw = _decode(parity_engine, mu[pos], pose[pos], gw[pos], "full", segment)
    _close(raw, golden[f"seg_id_{segment}_noconv"], RAW_ATOL, f"seg_id_{segment}_noconv")


def test_segments_from_engine(parity_engine, golden):
    r = parity_engine.reconstruct(golden["inputs"], segments=True, denormalise=False)
    _close(r.affinity_reconstruction, golden["seg_id_affinity_conv"], CONV_ATOL,
           "engine affinity segment")
    _close(r.free_reconstruction, golden["seg_id_free_conv"], CONV_ATOL, "engine free segment")
    _close(r.reconstruction, golden["dec_id_conv"], CONV_ATOL, "engine combined")


@pytest.mark.parametrize("mode", ["id", "pred"])
def test_raw_renders(parity_engine, golden, mu, mode):
    pos = golden["noconv_subset_pos"]
    n = len(pos)
    pose, gw = (_identity(parity_engine, n) if mode == "id"
                else (_t(golden["pose_raw"][pos]), _t(golden["global_weight"][pos])))
    raw = _decode(parity_engine, mu[pos], pose, gw, "full")
    _close(raw, golden[f"dec_{mode}_noconv"], RAW_ATOL, f"dec_{mode}_noconv")


def test_z_sweep(parity_engine, golden):
    z, pose, gw = _t(golden["zsweep_z"]), _t(golden["zsweep_pose"]), _t(golden["zsweep_gw"])
    raw = _decode(parity_engine, z, pose, gw, "full")
    _close(raw, golden["zsweep_noconv"], RAW_ATOL, "zsweep_noconv")
    conv = _decode(parity_engine, z, pose, gw, "conv")
    _close(conv, golden["zsweep_conv"], CONV_ATOL, "zsweep_conv")
    # Our separable renderer has no |p|^2+|c|^2-2p.c cancellation: as close to float64 truth.
    ref_err = np.abs(golden["zsweep_conv"] - golden["zsweep_conv_f64"]).max()
    assert np.abs(conv - golden["zsweep_conv_f64"]).max() <= 2 * ref_err


def test_forward_frame_splats(parity_engine, golden, mu):
    with torch.inference_mode():
        s = parity_engine.model.decoder.splats(mu, _t(golden["pose_raw"]),
                                               _t(golden["global_weight"]))
    _close(s.centres.numpy(), golden["fwd_splat_coords"], ENC_ATOL, "fwd_splat_coords")
    _close(s.weights.numpy(), golden["fwd_splat_weights"], ENC_ATOL, "fwd_splat_weights")
    raw = (s.sigmas.numpy() - 0.005) / 0.095
    _close(raw, golden["fwd_splat_sigmas_raw"], 1e-5, "fwd_splat_sigmas_raw")


def test_engine_splats_are_the_forward_frame_in_voxels(parity_engine, golden):
    s = parity_engine.splats(golden["inputs"])
    coords = golden["fwd_splat_coords"]  # (N, 3, S) rows x, y, z in grid units
    expected = (coords[:, ::-1].transpose(0, 2, 1) + 1) * 36.5 - 13
    _close(s.centers, expected, 1e-4, "splat centres (voxels)")
    sigma = (golden["fwd_splat_sigmas_raw"] * 0.095 + 0.005) * 36.5
    _close(s.scales, sigma, 1e-5, "splat sigmas (voxels)")
    _close(s.weights, golden["fwd_splat_weights"], ENC_ATOL, "splat weights")
    assert s.n_affinity == 614 and s.n_free == 154
    assert (s.segment[:614] == 0).all() and (s.segment[614:] == 1).all()


def test_reference_splat_layouts_follow_from_ours(parity_engine, golden, mu):
    """The reference's three splat layouts, rebuilt from our decoder (documenting its quirks)."""
    dec = parity_engine.model.decoder
    with torch.inference_mode():
        s = dec.splats(mu, _t(golden["pose_raw"]), _t(golden["global_weight"]))
        z_a = mu[:, :32]
        raw_centroids = dec.affinity_centroids(z_a).numpy()
        raw_sigma = dec.affinity_sigmas(z_a).numpy()
        soft_weight = dec.affinity_weights(z_a).numpy()
    coords = s.centres.numpy() * (66 / 74)  # extraction scales by 66/48, not 74/48
    _close(coords.transpose(0, 2, 1)[:, :, [1, 0, 2]], golden["splat_centroids"], ENC_ATOL,
           "splat_centroids (y, x, z)")
    _close(s.weights.numpy(), golden["splat_sigmas_ret"], ENC_ATOL, "'sigmas' = weights")
    _close((s.sigmas.numpy() - 0.005) / 0.095, golden["splat_weights_ret"], 1e-5, "'weights' = σ0")
    _close(raw_centroids.reshape(-1, 614, 3), golden["pipe_splat_centroids"], ENC_ATOL,
           "pipeline centroids (interleaved)")
    _close(raw_sigma, golden["pipe_splat_sigmas"], ENC_ATOL, "pipeline sigmas")
    _close(soft_weight * golden["global_weight"], golden["pipe_splat_weights"], ENC_ATOL,
           "pipeline weights × raw logit")
    particle = (s.centres.numpy().transpose(0, 2, 1) + 1) * 24
    _close(particle[:, :, [2, 0, 1]], golden["particle_splat_centroids"], 1e-4,
           "particle centroids")
    _close(s.weights.numpy(), golden["particle_splat_weights"], ENC_ATOL, "particle weights")
