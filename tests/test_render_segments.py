"""The decoder's segment renders: the whole render, the affinity splats' and the free splats'
alone, rendered in one pass on the CPU, equal to three separate renders to float32 rounding."""
import pytest
import torch

from cryolens.model import CryoLensConfig, CryoLensVAE


@pytest.mark.parametrize("config", [
    CryoLensConfig(box_size=32, latent_dims=10, affinity_dims=7, n_affinity=60, n_free=15),
    CryoLensConfig(box_size=16, latent_dims=8, affinity_dims=8, n_affinity=20, n_free=0),
])
@pytest.mark.parametrize("region", ["conv", "crop"])
def test_segments_in_one_pass_equal_three_renders(config, region):
    torch.manual_seed(7)
    model = CryoLensVAE(config).eval()
    decoder = model.decoder
    x = torch.randn(3, config.box_size, config.box_size, config.box_size)
    with torch.inference_mode():
        enc = model.encode(x)
        splats = decoder.splats(enc.mu, enc.pose, enc.global_weight)
        together = decoder.render_segments(splats, region)
        apart = [decoder.render(group, region)
                 for group in (splats, splats.segment("affinity"), splats.segment("free"))]
    n = len(decoder.region_axis(region))
    for one, other in zip(together, apart, strict=True):
        assert one.shape == (3, n, n, n)
        assert float(one.min()) >= 0.0 and float(one.max()) <= 1.0
        assert torch.allclose(one, other, rtol=0, atol=1e-6), (one - other).abs().max()
    if config.n_free == 0:
        assert not together[2].any()
    # and with autograd (three renders), the same values
    with torch.enable_grad():
        graded = decoder.render_segments(splats, region)
    for one, other in zip(graded, apart, strict=True):
        assert torch.allclose(one.detach(), other, rtol=0, atol=1e-6)
