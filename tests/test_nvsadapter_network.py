"""NVS-Adapter through the SD backend seam on a tiny SD 2.x-layout UNet (16 layers): batch layout, in-model CFG
rows, the after-self-attention insertion point, any query count, and errors for models it does not fit."""
import functools

import pytest
import torch

from nvs_core.nvsadapter.config import TINY_SD
from nvs_core.nvsadapter.model import NVSAdapter
from nvs_core.nvsadapter.network import AdapterHook, adapter_forward, build_batch, check_backend
from nvs_core.sd import tiny
from nvs_core.sd.diffusers_backend import DiffusersSDBackend
from nvs_core.sd.interface import COND, NUM_LAYERS

H = TINY_SD.latent_resolution


@functools.lru_cache(maxsize=None)
def _backend() -> DiffusersSDBackend:
    unet = tiny.randomize_(tiny.tiny_unet(0), torch.Generator().manual_seed(0), 0.2)
    return DiffusersSDBackend(unet)


@functools.lru_cache(maxsize=None)
def _adapter(seed=1) -> NVSAdapter:
    return tiny.randomize_(NVSAdapter(TINY_SD), torch.Generator().manual_seed(seed), 0.2).train(False)


def _inputs(objects=2, queries=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(query_latents=torch.randn(objects, queries, 4, H, H, generator=g),
                timesteps=torch.randint(0, 1000, (objects,), generator=g),
                text_context=torch.randn(objects, 7, 32, generator=g),
                image_context=torch.randn(objects, 1, 24, generator=g),
                rays_context=torch.randn(objects, 1 + queries, 144, H, H, generator=g),
                reference_latents=torch.randn(objects, 1, 4, H, H, generator=g))


def _run(uncond=None, noise=None, adapter=None, **inputs):
    with torch.no_grad():
        return adapter_forward(_backend(), adapter or _adapter(), **inputs, uncond=uncond, noise=noise)


def test_batch_layout_and_uncond_rows():
    x = _inputs(objects=2, queries=3)
    drawn = torch.full((1, 1, 4, H, H), 7.0)
    batch = build_batch(**x, uncond=torch.tensor([False, True]), noise=lambda shape: drawn)
    assert batch.latents.shape == (8, 4, H, H) and (batch.objects, batch.queries) == (2, 3)
    t = x["timesteps"]
    assert batch.timesteps.tolist() == [0, 999] + [t[0].item()] * 3 + [t[1].item()] * 3
    assert torch.equal(batch.latents[0], x["reference_latents"][0, 0])
    assert torch.equal(batch.latents[1], drawn[0, 0])  # unconditional reference: fresh N(0,1), unscaled
    assert torch.equal(batch.latents[2:5], x["query_latents"][0])
    assert torch.equal(batch.latents[5:], x["query_latents"][1])
    assert torch.equal(batch.rays[0], x["rays_context"][0, 0]) and not batch.rays[1].any() and not batch.rays[5:].any()
    assert torch.equal(batch.rays[2:5], x["rays_context"][0, 1:])
    assert not batch.image[1].any() and not batch.image[5:].any() and torch.equal(batch.image[2], x["image_context"][0])
    assert torch.equal(batch.text[5], x["text_context"][1])  # the text is never dropped
    assert torch.equal(x["rays_context"], _inputs(2, 3)["rays_context"])  # inputs are not modified in place


def test_after_self_attention_sees_layers_in_call_order():
    calls = []
    original = AdapterHook.__call__

    def spy(self, hidden, call):
        calls.append((call.layer, call.chunks, call.spatial_shape, hidden.shape))
        return original(self, hidden, call)

    AdapterHook.__call__ = spy
    try:
        out = _run(**_inputs(objects=1, queries=2))
    finally:
        AdapterHook.__call__ = original
    assert out.shape == (1, 2, 4, H, H)
    assert [c[0] for c in calls] == list(range(NUM_LAYERS))
    for (layer, chunks, spatial, shape), spec in zip(calls, TINY_SD.layers()):
        side = H // 2 ** spec.level
        assert chunks == (COND,) and spatial == (side, side) and shape == (3, side * side, spec.channels)


def test_zero_adapter_leaves_query_rows_to_plain_sd():
    """With every adapter output projection zero, the query rows are exactly the frozen UNet's own."""
    adapter = NVSAdapter(TINY_SD).zero_init_outputs()
    x = _inputs(objects=1, queries=2)
    got = _run(adapter=adapter, **x)
    with torch.no_grad():
        t = x["timesteps"].repeat_interleave(2).float()
        plain = _backend().unet(x["query_latents"][0], t, x["text_context"].expand(2, -1, -1))
    assert torch.allclose(got[0], plain, atol=1e-5, rtol=1e-5)


def test_objects_are_independent_and_uncond_ignores_conditioning():
    x = _inputs(objects=2, queries=2)
    fixed = torch.randn(1, 1, 4, H, H, generator=torch.Generator().manual_seed(9))
    mixed = _run(uncond=torch.tensor([False, True]), noise=lambda shape: fixed, **x)
    alone = _run(**{k: v[:1] for k, v in x.items()})
    assert torch.allclose(mixed[0], alone[0], atol=1e-5, rtol=1e-5)
    other = dict(x, rays_context=torch.randn_like(x["rays_context"]),
                 image_context=torch.randn_like(x["image_context"]),
                 reference_latents=torch.randn_like(x["reference_latents"]))
    again = _run(uncond=torch.tensor([False, True]), noise=lambda shape: fixed, **other)
    assert torch.allclose(again[1], mixed[1], atol=1e-5, rtol=1e-5)  # the uncond object saw none of it
    assert not torch.allclose(again[0], mixed[0], atol=1e-3)


@pytest.mark.parametrize("queries", [1, 3])
def test_any_number_of_target_views(queries):
    assert _run(**_inputs(objects=1, queries=queries)).shape == (1, queries, 4, H, H)


def test_models_the_adapter_does_not_fit():
    x = _inputs(objects=1, queries=1)
    with pytest.raises(ValueError, match="width 768.*SD 1.x"):
        _run(**dict(x, text_context=torch.randn(1, 7, 768)))
    with pytest.raises(ValueError, match="expected 24 .*CLIP ViT-H"):
        _run(**dict(x, image_context=torch.randn(1, 1, 32)))
    with pytest.raises(ValueError, match="rays context"):
        _run(**dict(x, rays_context=torch.randn(1, 3, 144, H, H)))
    with pytest.raises(ValueError, match="at least one target view"):
        build_batch(**dict(x, query_latents=torch.randn(1, 0, 4, H, H), rays_context=torch.randn(1, 1, 144, H, H)))
    v_model = DiffusersSDBackend(_backend().unet_model, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="eps-prediction"):
        check_backend(v_model, _adapter())
    golden_like = NVSAdapter(TINY_SD.__class__(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                               attention_resolutions=(2, 1), num_head_channels=16, context_dim=32,
                                               image_context_dim=24, latent_resolution=8))
    with pytest.raises(ValueError, match="16 transformer blocks, the NVS-Adapter expects 7"):
        check_backend(_backend(), golden_like)
    with pytest.raises(ValueError, match="width"):
        _run(adapter=NVSAdapter(TINY_SD.__class__(**{**TINY_SD.to_dict(), "model_channels": 64})), **x)


def test_sampling_through_the_backend_is_seeded():
    from nvs_core.nvsadapter.sampler import sample
    from nvs_core.progress import silent_progress

    x = _inputs(objects=1, queries=2)
    noise = torch.randn(1, 2, 4, H, H, generator=torch.Generator().manual_seed(5))

    def run(seed):
        with torch.no_grad():
            return sample(_backend(), _adapter(), noise, x["text_context"], x["image_context"], x["rays_context"],
                          x["reference_latents"], steps=3, generator=torch.Generator().manual_seed(seed),
                          progress=silent_progress)

    first = run(0)
    assert first.shape == (1, 2, 4, H, H) and torch.isfinite(first).all()
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))  # seeds drive the uncond reference draw


def test_host_sampler_call_equals_the_in_model_cfg():
    """A host sampler's CFG call ([uncond chunk, cond chunk] of Q rows, text per chunk) through the UNet-call
    wrapper gives the published in-model CFG: the uncond chunk becomes the unconditional object."""
    from nvs_core.nvsadapter.network import AdapterCondition, AdapterUNetCall, adapter_eps, hook_for

    x = _inputs(objects=1, queries=2)
    condition = AdapterCondition(x["reference_latents"], x["image_context"], x["rays_context"])
    call = AdapterUNetCall(_adapter(), condition, seed=4)
    latents, t = x["query_latents"][0], x["timesteps"].float()
    with torch.no_grad():
        got = _backend().predict_noise(latents, t, x["text_context"], x["text_context"], 3.0, call.patches)
        published = build_batch(torch.cat([x["query_latents"]] * 2), x["timesteps"].repeat(2),
                                *(torch.cat([x[k]] * 2) for k in ("text_context", "image_context", "rays_context",
                                                                  "reference_latents")),
                                uncond=torch.tensor([True, False]), generator=torch.Generator().manual_seed(4))
        eps_u, eps_c = adapter_eps(_backend(), _adapter(), published)
    assert torch.allclose(got, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    assert hook_for(_adapter()).batch is None  # unbound after the call
    call.reseed(4)
    with torch.no_grad():
        again = _backend().predict_noise(latents, t, x["text_context"], x["text_context"], 3.0, call.patches)
    assert torch.equal(again, got)
    with pytest.raises(ValueError, match="3 views, the NVS-Adapter conditioning was made for 2"):
        _backend().predict_noise(torch.randn(3, 4, H, H), t, x["text_context"], None, 1.0, call.patches)
    with pytest.raises(ValueError, match="width 768.*SD 1.x"):
        _backend().predict_noise(latents, t, torch.randn(1, 7, 768), None, 1.0, call.patches)


def test_reduced_precision_adapter():
    """A bfloat16 adapter in a float32 UNet: the hook computes in the adapter's dtype and casts back."""
    import copy

    x = _inputs(objects=1, queries=2)
    reference = _run(**x)
    got = _run(adapter=copy.deepcopy(_adapter()).to(torch.bfloat16), **x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - reference).abs().max() < 0.1 * reference.abs().max()


def test_ray_embeddings_are_reused_only_while_rays_and_weights_are_unchanged():
    adapter = tiny.randomize_(NVSAdapter(TINY_SD), torch.Generator().manual_seed(5), 0.2).train(False)
    hook = AdapterHook(adapter)
    batch = build_batch(**_inputs(objects=1, queries=2))

    def tokens(b):
        with torch.no_grad(), hook.bind(b):
            return hook.posemb_tokens(0), hook._posemb

    first, cache = tokens(batch)
    again, cache_again = tokens(batch)  # a later sampling step: same rays, same weights
    assert cache_again is cache and again is first
    moved = build_batch(**_inputs(objects=1, queries=2, seed=4))
    other, other_cache = tokens(moved)
    assert other_cache is not cache and not torch.equal(other, first)
    assert torch.equal(tokens(batch)[0], first)  # back to the first rays: recomputed, the same values
    with torch.no_grad():
        next(adapter.pe_blocks.parameters()).mul_(2.0)  # weights changed in place: no stale tokens
    changed, _ = tokens(batch)
    assert not torch.equal(changed, first)
    assert torch.equal(changed, adapter.posemb(batch.rays, 0).flatten(2).transpose(1, 2))


def test_ray_embedding_cache_works_on_inference_tensors():
    """ComfyUI runs nodes under inference mode: rays and weights made there keep no version counter."""
    with torch.inference_mode():
        adapter = tiny.randomize_(NVSAdapter(TINY_SD), torch.Generator().manual_seed(6), 0.2).train(False)
        hook = AdapterHook(adapter)
        batch = build_batch(**_inputs(objects=1, queries=2))
        with hook.bind(batch):
            first, cache = hook.posemb_tokens(0), hook._posemb
        with hook.bind(batch):
            assert hook._posemb is cache and hook.posemb_tokens(0) is first
        batch.rays.add_(1.0)  # edited in place: the cache holds its own copy, so this is seen
        with hook.bind(batch):
            assert hook._posemb is not cache and not torch.equal(hook.posemb_tokens(0), first)
