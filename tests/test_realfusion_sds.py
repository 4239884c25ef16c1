"""SDS through the SD backend seam: parity with golden case f (stub VAE/UNet), t range, NaN counting, the tiny
diffusers backend end to end, direction prompts with a learned token, the SD 1.5 check."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nvs_core.realfusion.sds import (SDSConfig, SDSGuidance, TextConditioning, check_sd15_backend,
                                     encode_direction_prompts, encode_prompts)
from nvs_core.sd.interface import NoiseSchedule, SDBackend
from tests.paths import GOLDEN_DIR

CASE = GOLDEN_DIR / "realfusion" / "case_f_losses.safetensors"


class StubBackend(SDBackend):
    """Golden case f's stubs: latents = (W @ avgpool8(x) + b) * 0.18215; the UNet returns fixed eps_u / eps_c."""

    def __init__(self, W, b, eps_u, eps_c):
        self.schedule = NoiseSchedule.scaled_linear()
        self.W, self.b, self.eps = W, b, (eps_u, eps_c)
        self.calls = []

    def unet(self, latents, timesteps, context, chunks=None, patches=None):
        self.calls.append((tuple(chunks), timesteps.clone()))
        return torch.cat([self.eps[0], self.eps[1]]) if len(chunks) == 2 else self.eps[1]

    @property
    def text_encoder(self):
        raise ValueError("no text encoder")

    def tokenize(self, prompts):
        raise ValueError("no tokenizer")

    def encode_images(self, images, sample=True, generator=None):
        pooled = F.avg_pool2d(images, 8)
        return (torch.einsum("oc,bchw->bohw", self.W, pooled) + self.b[None, :, None, None]) * 0.18215

    def decode_latents(self, latents):
        return latents


def _text(width=4):
    return TextConditioning(torch.zeros(6, 2, width), torch.zeros(1, 2, width))


@pytest.mark.skipif(not CASE.is_file(), reason="golden fixtures not found")
@pytest.mark.parametrize("tag", ["t20", "t500", "t980", "tnan"])
def test_sds_matches_golden_case_f(tag):
    t = load_file(str(CASE))
    p, o = f"input.sds.{tag}.", f"output.sds.{tag}."
    backend = StubBackend(t["input.sds.stub_vae_W"], t["input.sds.stub_vae_b"], t[p + "eps_uncond"],
                          t[p + "eps_cond"])
    guidance = SDSGuidance(backend, _text())
    step = int(t[p + "t"].reshape(()))
    noise = t[p + "noise"]
    if p + "pred_rgb" in t:
        pred = t[p + "pred_rgb"].clone().requires_grad_(True)
        out = guidance.step(pred, 0, t=step, noise=noise)
        torch.testing.assert_close(out.latents.detach(), t[o + "latents"], atol=1e-6, rtol=1e-6)
        out.surrogate.backward()
        torch.testing.assert_close(pred.grad, t[o + "pred_rgb_grad"], atol=1e-7, rtol=1e-4)
        grad, nonfinite = out.grad, out.nonfinite
        assert backend.calls[-1][0] == ("uncond", "cond") and float(backend.calls[-1][1][0]) == step
    else:
        latents = torch.zeros_like(noise)
        grad, nonfinite = guidance.gradient(latents, guidance.text.for_direction(0), step, noise)
    torch.testing.assert_close(grad, t[o + "grad"], atol=1e-4, rtol=1e-5)
    assert torch.isfinite(grad).all()
    raw = (1 - guidance.alphas_cumprod[step]) * (t[p + "eps_uncond"] + 100 * (t[p + "eps_cond"] - t[p + "eps_uncond"])
                                                 - noise)
    assert nonfinite == int((~torch.isfinite(raw)).sum())
    assert (nonfinite > 0) == (tag == "tnan")


def test_t_range_is_20_to_980():
    guidance = SDSGuidance(StubBackend(torch.eye(4, 3), torch.zeros(4), None, None), _text())
    g = torch.Generator().manual_seed(0)
    draws = {guidance.sample_t(g) for _ in range(20000)}
    assert min(draws) == 20 and max(draws) == 980 and len(draws) == 961


def test_bad_t_range():
    with pytest.raises(ValueError, match="t_range"):
        SDSGuidance(StubBackend(torch.eye(4, 3), torch.zeros(4), None, None), _text(), SDSConfig(t_range=(20, 1000)))


@pytest.fixture(scope="module")
def tiny():
    from nvs_core.sd.tiny import tiny_backend_with_tokenizer

    return tiny_backend_with_tokenizer()


def test_tiny_backend_end_to_end(tiny):
    text = encode_direction_prompts(tiny, "a photo of a cat")
    guidance = SDSGuidance(tiny, text, SDSConfig(resolution=32, guidance_scale=7.5))
    rgb = torch.rand(1, 3, 16, 16, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    out = guidance.step(rgb, 2, generator=g, t=500)
    out.surrogate.backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert out.latents.shape == (1, 4, 16, 16) and out.nonfinite == 0
    # the gradient is w (eps_u + s (eps_c - eps_u) - eps) with two separate UNet calls
    noise = torch.randn(out.latents.shape, generator=torch.Generator().manual_seed(1))
    grad, _ = guidance.gradient(out.latents, text.for_direction(2), 500, noise)
    abar = tiny.schedule.alphas_cumprod[500].float()
    noisy = abar.sqrt() * out.latents.detach() + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eu = tiny.unet(noisy, torch.tensor([500.0]), text.uncond)
        ec = tiny.unet(noisy, torch.tensor([500.0]), text.cond[2:3])
    torch.testing.assert_close(grad, (1 - abar) * (eu + 7.5 * (ec - eu) - noise), atol=1e-5, rtol=1e-4)


def test_direction_prompts_and_learned_token(tiny):
    plain = encode_direction_prompts(tiny, "a photo of a cat")
    assert plain.cond.shape[0] == 6 and plain.uncond.shape[0] == 1
    assert not torch.allclose(plain.cond[0], plain.cond[2])  # front vs back prompt
    learned = encode_direction_prompts(tiny, "a photo of a cat", learned={"cat": torch.randn(32) * 3})
    assert not torch.allclose(plain.cond, learned.cond)
    torch.testing.assert_close(plain.uncond, learned.uncond)
    with pytest.raises(ValueError, match="expects 32"):
        encode_prompts(tiny, ["a cat"], learned={"cat": torch.randn(768)})


def test_sd15_check(tiny):
    with pytest.raises(ValueError, match="found a 32-wide text context"):
        check_sd15_backend(tiny)
