"""The decoder's final convolution through the FFT equals torch's conv3d, also after its kernel
changes (the FFT path keeps the kernel's spectrum between inference calls)."""
import torch

from cryolens.model import CryoLensConfig, CryoLensVAE


def _decoder_and_render():
    torch.manual_seed(3)
    config = CryoLensConfig(box_size=16, latent_dims=8, affinity_dims=6, n_affinity=20, n_free=5)
    decoder = CryoLensVAE(config).decoder.eval()
    n = len(decoder.region_axis("conv"))
    return decoder, torch.rand(2, n, n, n)


def _agree(decoder, render):
    fft = decoder.final_convolution(render, "fft")
    direct = decoder.final_convolution(render, "direct")
    assert fft.shape == direct.shape == (2, 16, 16, 16)
    # float32 FFT rounding, relative to the output's scale
    assert torch.allclose(fft, direct, atol=1e-5 * float(direct.abs().max()))


def test_fft_follows_the_kernel_after_in_place_changes_and_loads():
    decoder, render = _decoder_and_render()
    spread = decoder._decoder[2]
    with torch.inference_mode():
        _agree(decoder, render)
        _agree(decoder, render)  # the kept spectrum
    with torch.no_grad():
        spread.weight.mul_(-3.0)  # an optimiser step changes the weight in place
    with torch.inference_mode():
        _agree(decoder, render)
    state = {k: v.clone() for k, v in decoder.state_dict().items()}
    state["_decoder.2.weight"] = torch.randn_like(spread.weight)
    decoder.load_state_dict(state)
    with torch.no_grad():
        _agree(decoder, render)
    decoder.double()  # a new dtype (and storage)
    with torch.inference_mode():
        fft = decoder.final_convolution(render.double(), "fft")
        assert fft.dtype == torch.float64
        assert torch.allclose(fft, decoder.final_convolution(render.double(), "direct"),
                              atol=1e-10)


def test_fft_with_autograd_gives_the_kernel_a_gradient():
    decoder, render = _decoder_and_render()
    spread = decoder._decoder[2]
    with torch.inference_mode():
        decoder.final_convolution(render, "fft")  # leaves a kept spectrum behind
    decoder.final_convolution(render, "fft").sum().backward()
    fft_grad = spread.weight.grad.clone()
    spread.weight.grad = None
    decoder.final_convolution(render, "direct").sum().backward()
    assert torch.allclose(fft_grad, spread.weight.grad, rtol=1e-4, atol=1e-3)
