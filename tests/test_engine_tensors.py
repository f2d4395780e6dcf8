"""Tensors in, tensors out; the device z-score and the pipelined path (exercised on the CPU
too, where streams and pinned memory fall away); CUDA-only checks that skip without a GPU."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from model_helpers import spread_model

from cryolens.engine import Engine, zscore, zscore_tensor
from cryolens.errors import InputError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bench/gpu_check.sh runs these there)")


@pytest.fixture(scope="module")
def model():
    return spread_model()


@pytest.fixture(scope="module")
def volumes():
    return (np.random.default_rng(1).standard_normal((5, 48, 48, 48)) * 3 + 2).astype(np.float32)


def _fields(result) -> dict:
    out = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if dataclasses.is_dataclass(value):
            out.update({f"features.{k}": v for k, v in _fields(value).items()})
        elif value is not None and not isinstance(value, int):
            out[field.name] = value
    return out


def _calls(engine):
    return {
        "features": lambda v: engine.features(v),
        "reconstruct": lambda v: engine.reconstruct(v),
        "reconstruct+segments": lambda v: engine.reconstruct(v, segments=True,
                                                             use_predicted_pose=True),
        "reconstruct raw": lambda v: engine.reconstruct(v, final_convolution=False,
                                                        denormalise=False),
        "splats": lambda v: engine.splats(v),
        "normalise": lambda v: engine.normalise(v),
    }


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "device-zscore"])
def test_tensor_input_gives_the_same_numbers_as_numpy(model, volumes, exact):
    """CPU tensors in: CPU tensors out, bit-identical to the numpy results."""
    engine = Engine(model, device="cpu", exact_zscore=exact, memory_budget=1)  # 1 a chunk
    for name, call in _calls(engine).items():
        from_numpy, from_tensor = _fields(call(volumes)), _fields(call(torch.from_numpy(volumes)))
        assert from_numpy.keys() == from_tensor.keys(), name
        for key, value in from_numpy.items():
            assert isinstance(value, np.ndarray), (name, key)
            tensor = from_tensor[key]
            assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu", (name, key)
            assert np.array_equal(value, tensor.numpy()), (name, key)


def test_tensor_outputs_are_ordinary_tensors(model, volumes):
    r = Engine(model, device="cpu").reconstruct(torch.from_numpy(volumes[:2]))
    r.reconstruction += 1  # not an inference-mode tensor: callers may modify it
    assert not r.reconstruction.requires_grad


def test_other_dtypes_and_a_single_volume(model, volumes):
    engine = Engine(model, device="cpu", exact_zscore=False)
    ref = engine.features(volumes[:2]).embedding
    as64 = engine.features(torch.from_numpy(volumes[:2].astype(np.float64))).embedding
    assert np.array_equal(ref, as64.numpy())
    assert np.array_equal(ref, engine.features(volumes[:2].astype(np.float64)).embedding)
    assert engine.features(torch.from_numpy(volumes[0])).embedding.shape == (1, 8)
    readonly = volumes[:2].copy()
    readonly.flags.writeable = False
    assert np.array_equal(ref, engine.features(readonly).embedding)


def test_device_zscore_is_the_numpy_zscore_up_to_rounding(volumes):
    exact = zscore(volumes)
    normalised, mean, std = zscore_tensor(torch.from_numpy(volumes))
    assert np.allclose(normalised.numpy(), exact.volumes, rtol=0, atol=2e-6)
    assert np.allclose(mean.numpy(), exact.mean, rtol=1e-6)
    assert np.allclose(std.numpy(), exact.std, rtol=1e-6)
    # A constant volume: the true z-score, 0, not numpy's float32 rounding residue.
    constant = torch.full((1, 48, 48, 48), 3.7)
    assert zscore_tensor(constant)[0].abs().max() == 0


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "device-zscore"])
def test_device_path_agrees_with_the_exact_path(model, volumes, exact):
    """The pipelined (device z-score) path, chunked or whole, gives the exact path's numbers up
    to the z-score's rounding."""
    ref = Engine(model, device="cpu").reconstruct(volumes, segments=True)
    for budget in (1, 10**12):
        other = Engine(model, device="cpu", exact_zscore=exact, memory_budget=budget)
        got = other.reconstruct(volumes, segments=True)
        for key, value in _fields(ref).items():
            scale = np.abs(value).max() + 1
            assert np.allclose(_fields(got)[key], value, rtol=0, atol=1e-4 * scale), key


def test_non_finite_tensor_input_is_an_input_error(model):
    bad = torch.zeros(2, 48, 48, 48, dtype=torch.float64)
    bad[1, 3, 4, 5] = 1e39  # beyond float32
    for exact in (True, False):
        engine = Engine(model, device="cpu", exact_zscore=exact)
        with pytest.raises(InputError, match="finite"):
            engine.reconstruct(bad)
        with pytest.raises(InputError, match="finite"):
            engine.features(bad.numpy())
    with pytest.raises(InputError, match="real numbers"):
        Engine(model, device="cpu").features(torch.zeros(1, 48, 48, 48, dtype=torch.bool))
    with pytest.raises(InputError, match="shape"):
        Engine(model, device="cpu").features(torch.zeros(1, 48, 48, 47))


@needs_cuda
def test_cuda_tensors_in_give_cuda_tensors_out_matching_numpy(model, volumes):
    engine = Engine(model, device="cuda", memory_budget=200 * 1024**2)  # several chunks
    cuda_volumes = torch.from_numpy(volumes).cuda()
    for name, call in _calls(engine).items():
        from_numpy, from_tensor = _fields(call(volumes)), _fields(call(cuda_volumes))
        for key, value in from_numpy.items():
            tensor = from_tensor[key]
            assert tensor.device.type == "cuda", (name, key)
            assert np.allclose(value, tensor.cpu().numpy(), rtol=0, atol=1e-6), (name, key)


@needs_cuda
def test_cuda_device_path_matches_the_cpu_and_stays_within_the_budget(model, volumes):
    cpu = Engine(model, device="cpu").reconstruct(volumes, segments=True)
    budget = 100 * 1024**2
    engine = Engine(model, device="cuda", memory_budget=budget)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    many = np.concatenate([volumes] * 8)
    got = engine.reconstruct(many, segments=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= budget
    for key, value in _fields(cpu).items():
        scale = np.abs(value).max() + 1
        assert np.allclose(_fields(got)[key][:5], value, rtol=0, atol=2e-5 * scale), key
        assert np.allclose(_fields(got)[key][:5], _fields(got)[key][35:], rtol=0,
                           atol=1e-6 * scale), key


@needs_cuda
def test_cuda_answers_of_successive_calls_are_their_own(model, volumes):
    """The engine stages chunks through memory it keeps between calls: an answer already
    returned is never written by the next call, and the same input gives the same numbers."""
    engine = Engine(model, device="cuda", max_chunk=2)
    first = engine.reconstruct(volumes)
    kept = first.reconstruction.copy()
    engine.reconstruct(volumes[::-1].copy())
    second = engine.reconstruct(volumes)
    assert np.array_equal(first.reconstruction, kept)
    assert np.array_equal(first.reconstruction, second.reconstruction)
    assert isinstance(second.reconstruction, np.ndarray) and second.reconstruction.flags.writeable


@needs_cuda
def test_cuda_float32_overflow_is_z_scored_again_on_the_host(model, volumes):
    """One voxel of 1e20: the device z-score's float32 variance overflows, so the batch is
    z-scored again with numpy (float64 for that particle), as the CPU engine does."""
    batch = volumes[:3].copy()
    batch[1, 10, 11, 12] = 1e20
    assert not torch.isfinite(zscore_tensor(torch.from_numpy(batch).cuda())[2]).all()
    cpu = Engine(copy.deepcopy(model), device="cpu").reconstruct(batch)
    engine = Engine(copy.deepcopy(model), device="cuda")  # an engine moves its model
    assert not engine.exact_zscore
    for got in (engine.reconstruct(batch), engine.reconstruct(torch.from_numpy(batch).cuda())):
        for key, value in _fields(cpu).items():
            ours = _fields(got)[key]
            ours = ours.cpu().numpy() if isinstance(ours, torch.Tensor) else ours
            assert np.isfinite(ours).all(), key
            assert np.allclose(ours, value, rtol=1e-5, atol=1e-5 * (np.abs(value).max() + 1)), key
    norm = engine.normalise(batch)
    assert np.isfinite(norm.volumes).all() and np.isfinite(norm.std).all()


@needs_cuda
def test_a_pipelined_batch_is_split_in_two_chunks_at_least(model):
    """Numpy batches on CUDA: one chunk would leave no copy to overlap with compute. The
    batches the model sees (its encoder's inputs, seen by a forward hook): halves, not below
    128 particles, and never more than max_chunk."""
    engine = Engine(copy.deepcopy(model), device="cuda", max_chunk=1024, memory_budget=10**12)
    stack = np.random.default_rng(2).standard_normal((2048, 48, 48, 48)).astype(np.float32)
    seen: list[int] = []
    hook = engine.model.encoder.register_forward_pre_hook(lambda module, args: seen.append(
        len(args[0])))
    try:
        sizes = {}
        for n in (2048, 512, 301, 200, 100):
            seen.clear()
            engine.features(stack[:n])
            sizes[n] = list(seen)
    finally:
        hook.remove()
    assert sizes == {2048: [1024, 1024], 512: [256, 256], 301: [151, 150], 200: [128, 72],
                     100: [100]}
