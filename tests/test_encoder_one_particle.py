"""A particle encodes to the same features alone as in a batch (on a CPU, a batch of one takes
its own convolution path), to float32 rounding."""
import torch

from cryolens.model import CryoLensConfig, CryoLensVAE


def test_one_particle_encodes_as_in_a_batch():
    torch.manual_seed(5)
    model = CryoLensVAE(CryoLensConfig(box_size=32, latent_dims=10, affinity_dims=7,
                                       n_affinity=50, n_free=11)).eval()
    x = torch.randn(3, 32, 32, 32)
    with torch.inference_mode():
        together = model.encode(x)
        for i in range(3):
            alone = model.encode(x[i : i + 1])
            for field in ("mu", "log_var", "pose", "global_weight"):
                a, b = getattr(alone, field), getattr(together, field)[i : i + 1]
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (field, (a - b).abs().max())
    with torch.enable_grad():  # and the same under autograd (torch's own path)
        alone = model.encode(x[:1])
    assert torch.allclose(alone.mu.detach(), together.mu[:1], rtol=1e-5, atol=1e-6)
