"""The published NVS-Adapter sampler: schedule values, the Euler + in-model CFG loop bit for bit against the
golden trajectory given the network's eps, progress per step, interruption and seeded determinism."""
import pytest
import torch

from tests.paths import GOLDEN_DIR
from nvs_core.checkpoints import load_safetensors
from nvs_core.nvsadapter.sampler import denoiser_sigmas, euler_cfg, quantize, sampling_schedule
from nvs_core.progress import Interrupted, Progress

CASE_D = GOLDEN_DIR / "nvsadapter" / "case_d_sampler.safetensors"


def test_schedule():
    timesteps, sigmas = sampling_schedule(50)
    assert timesteps[:3].tolist() == [999, 979, 959] and timesteps[-1].item() == 19 and len(timesteps) == 50
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,) and sigmas[-1].item() == 0.0
    assert sigmas[0].item() == pytest.approx(14.614641, abs=1e-5)
    table = denoiser_sigmas()
    assert table[0].item() == pytest.approx(0.029168, abs=1e-5) and torch.equal(sigmas[:-1], table[timesteps])
    index, snapped = quantize(sigmas[:-1], table)
    assert torch.equal(index, timesteps) and torch.equal(snapped, sigmas[:-1])
    with pytest.raises(ValueError, match="steps must be"):
        sampling_schedule(0)


@pytest.mark.skipif(not CASE_D.is_file(), reason=f"no golden case d at {CASE_D}")
def test_loop_is_bit_exact_given_the_networks_eps():
    t = load_safetensors(CASE_D)[0]
    step = iter(range(50))

    def eps_fn(net_input, index, uncond):
        i = next(step)
        assert torch.equal(net_input, t["output.net_input"][i]) and torch.equal(index, t["output.net_timestep_idx"][i])
        assert uncond.tolist() == [True, True, False, False]  # the uncond half first
        return t["output.net_eps"][i]

    record = {}
    final = euler_cfg(eps_fn, t["input.x_T_noise"], float(t["input.cfg_scale"]), 50, record=record,
                      progress=lambda total, desc="": Progress(total, desc))
    assert torch.equal(final, t["output.final"])
    assert torch.equal(record["x_trajectory"], t["output.x_trajectory"])
    assert torch.equal(record["denoised_cfg"], t["output.denoised_cfg"])


def _toy_eps(net_input, index, uncond):
    return 0.1 * net_input + uncond.float().reshape(-1, 1, 1, 1, 1)


def test_progress_per_step_and_interrupt():
    updates = []
    noise = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    euler_cfg(_toy_eps, noise, 3.0, 7,
              progress=lambda total, desc="": Progress(total, desc, on_update=lambda d, n: updates.append((d, n))))
    assert updates == [(i, 7) for i in range(1, 8)]
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Interrupted):
        euler_cfg(_toy_eps, noise, 3.0, 10,
                  progress=lambda total, desc="": Progress(total, desc, should_stop=stop_after_three))


def test_cfg_uses_the_uncond_half_first():
    noise = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    a = euler_cfg(_toy_eps, noise, 1.0, 3, progress=lambda total, desc="": Progress(total, desc))
    cond_only = euler_cfg(lambda x, i, u: 0.1 * x, noise, 1.0, 3, progress=lambda total, desc="": Progress(total, desc))
    assert torch.allclose(a, cond_only, atol=1e-5)  # scale 1 keeps only the conditional (second) half
