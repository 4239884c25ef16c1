"""The ComfyUI adapter's patch logic without ComfyUI: the calls ComfyUI makes, with the arguments it passes
(research/comfyui-host.md 3.2); the real host is exercised in tests/host/test_host_sd_backend.py."""
import copy
import importlib

import pytest
import torch

from nvs_core.sd import COND, LDM_BLOCKS, UNCOND, UNetPatches
from tests.conftest import load_pack


@pytest.fixture(scope="module")
def sd_comfy():
    return importlib.import_module(load_pack().__name__ + ".nodes.sd_comfy")


class FakeSampling:
    """ComfyUI's model_sampling surface the adapter uses: sigma -> discrete timestep."""

    def timestep(self, sigma):
        return (sigma * 100).round()


class Recorder:
    def __init__(self, keys, values):
        self.keys, self.values, self.calls, self.events = keys, values, [], []

    def contexts(self, call):
        self.calls.append(call)
        return (self.keys, self.values) if call.chunk == COND else None

    def prepare(self, timesteps, progress=None):
        self.events.append(("prepare", torch.as_tensor(timesteps).tolist()))

    def release(self):
        self.events.append(("release",))


def _extra(layer, cond_or_uncond=(1, 0), sigma=2.5, rows=2):
    kind, block = LDM_BLOCKS[layer]
    return {"transformer_index": layer, "block": (kind, block), "block_index": 0,
            "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.full((rows,), sigma),
            "activations_shape": [2 * rows, 320, 8, 6], "original_shape": [2 * rows, 4, 64, 48]}


def test_attn2_patch_replaces_the_cond_chunk_by_label(sd_comfy):
    keys, values = torch.ones(1, 77, 8), torch.full((1, 77, 8), 2.0)
    provider = Recorder(keys, values)
    patch = sd_comfy.ComfyPatch(UNetPatches(contexts=provider), FakeSampling())
    n, context = torch.randn(4, 16, 8), torch.randn(4, 77, 8)
    out_n, out_k, out_v = patch.attn2_patch(n, context, context, _extra(9))  # ComfyUI order: [uncond, cond]
    assert out_n is n
    assert torch.equal(out_k[:2], context[:2]) and torch.equal(out_v[:2], context[:2])
    assert torch.equal(out_k[2:], keys.expand(2, -1, -1)) and torch.equal(out_v[2:], values.expand(2, -1, -1))
    call = next(c for c in provider.calls if c.chunk == COND)
    assert call.layer == 9 and call.rows == 2 and call.shared_timestep == 250.0
    assert torch.equal(call.timesteps, torch.tensor([250.0, 250.0]))
    _, k2, _ = patch.attn2_patch(n, context, context, _extra(9, cond_or_uncond=(0, 1)))
    assert torch.equal(k2[:2], keys.expand(2, -1, -1)) and torch.equal(k2[2:], context[2:])


def test_uncond_only_call_is_left_alone(sd_comfy):
    patch = sd_comfy.ComfyPatch(UNetPatches(contexts=Recorder(torch.ones(1, 77, 8), torch.ones(1, 77, 8))),
                                FakeSampling())
    n, context = torch.randn(2, 16, 8), torch.randn(2, 77, 8)
    assert patch.attn2_patch(n, context, context, _extra(0, cond_or_uncond=(1,))) == (n, context, context)


def test_layers_outside_the_sd_layout_are_refused(sd_comfy):
    patch = sd_comfy.ComfyPatch(UNetPatches(contexts=Recorder(torch.ones(1, 77, 8), torch.ones(1, 77, 8))),
                                FakeSampling())
    extra = _extra(3)
    extra["block"] = ("input", 4)  # transformer 3 must be input block 5 in SD 1.x/2.x
    with pytest.raises(ValueError, match="SD 1.x/2.x UNet layout only"):
        patch.attn2_patch(torch.zeros(4, 1, 8), torch.zeros(4, 77, 8), None, extra)
    extra = _extra(3)
    extra["block_index"] = 1  # a second transformer block per level (SDXL-style)
    with pytest.raises(ValueError, match="SD 1.x/2.x UNet layout only"):
        patch.attn2_patch(torch.zeros(4, 1, 8), torch.zeros(4, 77, 8), None, extra)


def test_middle_patch_sees_layer_chunks_and_grid(sd_comfy):
    seen = []

    def hook(hidden, info):
        seen.append(info)
        return hidden + 1

    patch = sd_comfy.ComfyPatch(UNetPatches(after_self_attention=hook), FakeSampling())
    x = torch.zeros(4, 48, 320)
    assert torch.equal(patch.middle_patch(x, _extra(6)), x + 1)
    assert seen[0].layer == 6 and seen[0].chunks == (UNCOND, COND) and seen[0].spatial_shape == (8, 6)


def test_patch_state_is_shared_not_deep_copied(sd_comfy):
    provider = Recorder(torch.ones(1, 77, 8), torch.ones(1, 77, 8))
    patch = sd_comfy.ComfyPatch(UNetPatches(contexts=provider), FakeSampling())
    options = {"patches": {"attn2_patch": [patch.attn2_patch]}}
    copied = copy.deepcopy(options)  # what ModelPatcher.clone() does to transformer_options
    assert copied["patches"]["attn2_patch"][0].__self__ is patch and patch.patches.contexts is provider


def test_outer_sample_prepares_the_schedule_and_releases(sd_comfy):
    provider = Recorder(torch.ones(1, 77, 8), torch.ones(1, 77, 8))
    patch = sd_comfy.ComfyPatch(UNetPatches(contexts=provider), FakeSampling())
    sigmas = torch.tensor([9.99, 5.0, 1.23, 0.0])

    def executor(noise, latent, sampler, sigmas, *rest, **kwargs):
        provider.events.append(("sample",))
        return "samples"

    assert patch.outer_sample(executor, None, None, None, sigmas, None, None, False, 0) == "samples"
    assert provider.events == [("prepare", [999.0, 500.0, 123.0]), ("sample",), ("release",)]

    def failing(*args, **kwargs):
        raise RuntimeError("interrupted")

    provider.events.clear()
    with pytest.raises(RuntimeError, match="interrupted"):
        patch.outer_sample(failing, None, None, None, sigmas=sigmas)
    assert provider.events[-1] == ("release",)
