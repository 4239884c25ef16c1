"""The NVS-Adapter through the ComfyUI adapter's patch logic, without ComfyUI: the DIFFUSION_MODEL wrapper and
the middle_patch as ComfyUI calls them (research/comfyui-host.md 3.2/3.3), on a tiny adapter."""
import copy
import importlib

import pytest
import torch

from nvs_core.nvsadapter.config import TINY_SD
from nvs_core.nvsadapter.model import NVSAdapter
from nvs_core.nvsadapter.network import AdapterCondition, AdapterUNetCall, hook_for
from nvs_core.sd import LDM_BLOCKS
from nvs_core.sd import tiny
from tests.conftest import load_pack

H = TINY_SD.latent_resolution
Q = 2


@pytest.fixture(scope="module")
def sd_comfy():
    return importlib.import_module(load_pack().__name__ + ".nodes.sd_comfy")


class FakeSampling:
    def timestep(self, sigma):
        return (sigma * 100).round()


def _call(seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter = tiny.randomize_(NVSAdapter(TINY_SD), g, 0.2)
    condition = AdapterCondition(torch.randn(1, 1, 4, H, H, generator=g), torch.randn(1, 1, 24, generator=g),
                                 torch.randn(1, 1 + Q, 144, H, H, generator=g))
    return AdapterUNetCall(adapter, condition, seed=7)


def test_diffusion_model_wrapper_rebuilds_the_batch_and_runs_the_middle_patch(sd_comfy):
    call = _call()
    patch = sd_comfy.ComfyPatch(call.patches, FakeSampling())
    x, context = torch.randn(2 * Q, 4, H, H), torch.randn(2 * Q, 7, 32)
    timesteps = torch.tensor([999.0] * Q + [999.0] * Q)
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.full((Q,), 14.6)}  # ComfyUI order: negative first
    seen = {}

    def executor(latents, steps, ctx, y, control, transformer_options):
        seen.update(latents=latents, steps=steps, ctx=ctx, options=transformer_options)
        kind, block = LDM_BLOCKS[0]
        extra = {"transformer_index": 0, "block": (kind, block), "block_index": 0, "cond_or_uncond": [0],
                 "sigmas": transformer_options["sigmas"], "activations_shape": [latents.shape[0], 32, H, H]}
        hidden = torch.randn(latents.shape[0], H * H, 32)
        seen["middle"] = patch.middle_patch(hidden, extra)  # the adapter is bound during the call
        return latents * 2

    out = patch.diffusion_model(executor, x, timesteps, context, None, None, options)
    assert torch.equal(out, x * 2)  # the host's rows come back, in their order
    assert seen["latents"].shape == (2 + 2 * Q, 4, H, H) and seen["options"]["cond_or_uncond"] == [0]
    assert seen["steps"].tolist() == [999.0, 0.0] + [999.0] * 2 * Q  # uncond object's reference at 999, cond's at 0
    assert torch.equal(seen["latents"][1], call.condition.reference_latents[0, 0])  # clean, unscaled
    assert torch.equal(seen["latents"][2:], x)
    assert seen["middle"].shape == (2 + 2 * Q, H * H, 32)
    assert hook_for(call.adapter).batch is None
    assert options["cond_or_uncond"] == [1, 0]  # the caller's options are not changed


def test_wrapper_refuses_what_it_cannot_batch(sd_comfy):
    patch = sd_comfy.ComfyPatch(_call().patches, FakeSampling())
    x, context = torch.randn(2 * Q, 4, H, H), torch.randn(2 * Q, 7, 32)
    options = {"cond_or_uncond": [1, 0]}
    with pytest.raises(ValueError, match="ControlNets"):
        patch.diffusion_model(lambda *a: None, x, torch.zeros(2 * Q), context, None, object(), options)
    with pytest.raises(ValueError, match="3 views"):
        patch.diffusion_model(lambda *a: None, x[:3], torch.zeros(3), context[:3], None, None, {"cond_or_uncond": [0]})


def test_reseed_follows_the_samplers_seed_and_state_is_shared(sd_comfy):
    call = _call()
    patch = sd_comfy.ComfyPatch(call.patches, FakeSampling())
    draws = []
    executor = lambda *args, **kwargs: draws.append(torch.randn(3, generator=call.generator))  # noqa: E731
    patch.reseed_outer_sample(executor, None, None, None, torch.ones(2), None, None, False, 123)
    patch.reseed_outer_sample(executor, None, None, None, torch.ones(2), None, None, False, seed=123)
    assert torch.equal(draws[0], draws[1])
    options = {"wrappers": {"x": [patch.diffusion_model]}}
    assert copy.deepcopy(options)["wrappers"]["x"][0].__self__ is patch and copy.deepcopy(call) is call
