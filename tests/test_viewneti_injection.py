"""ViewNeTI's per-(layer, timestep) contexts through the SD backend interface, on tiny random models."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from nvs_core.sd import COND, NUM_LAYERS, UNCOND, LayerCall, UNetPatches, prepared
from nvs_core.sd.tiny import OBJECT, VIEW, prompt_ids, tiny_backend
from nvs_core.viewneti.injection import ViewNetiContexts
from nvs_core.viewneti.mapper import ViewNetiMapper
from nvs_core.viewneti.text import PlaceholderVectors, encode_text_with_mapper_outputs
from tests.test_sd_backend import reference_with_projection_hooks

WIDTH = 32




@pytest.fixture(scope="module")
def backend():
    return tiny_backend(seed=1)


def _mapper(view_dims: int, seed: int) -> ViewNetiMapper:
    torch.manual_seed(seed)
    mapper = ViewNetiMapper([0.03, 2.0] + [0.5] * view_dims, word_dim=WIDTH, hidden_dim=16, fourier_dim=16,
                            target_norm=0.4, bypass_alpha=5.0)
    with torch.no_grad():  # random weights large enough that every (t, l) gives a different context
        for p in mapper.parameters():
            p.normal_(0, 0.5)
    return mapper.train(False)


@pytest.fixture(scope="module")
def mappers():
    return _mapper(12, 0), _mapper(0, 1)


@pytest.fixture(scope="module")
def cameras():
    return torch.rand(2, 12, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _contexts(backend, mappers, cameras, **kwargs):
    view, obj = mappers
    return ViewNetiContexts(backend, prompt_ids(), view, VIEW, cameras, obj, OBJECT, **kwargs)


def _direct(backend, mappers, cameras, t, layer):
    """A_l(t), B_l(t) straight from the mappers and the text encoder, one camera row at a time."""
    view, obj = mappers
    keys, values = [], []
    for row in range(cameras.shape[0]):
        v = view(torch.tensor([t]), torch.tensor([float(layer)]), cameras[row:row + 1])
        o = obj(torch.tensor([t]), torch.tensor([float(layer)]))
        enc = encode_text_with_mapper_outputs(backend.text_encoder, prompt_ids(),
                                              view_vectors=PlaceholderVectors.from_mapper_output(VIEW, v),
                                              object_vectors=PlaceholderVectors.from_mapper_output(OBJECT, o))
        keys.append(enc.keys)
        values.append(enc.values)
    return torch.cat(keys), torch.cat(values)


def _call(layer, t, chunk=COND, rows=2):
    timesteps = torch.full((rows,), float(t))
    return LayerCall(layer, chunk, timesteps, timesteps, rows)


def test_cached_contexts_equal_the_direct_encoding(backend, mappers, cameras):
    provider = _contexts(backend, mappers, cameras)
    with torch.no_grad():
        for t in (999.0, 433.0):
            for layer in (0, 6, 15):
                keys, values = provider.contexts(_call(layer, t))
                ref_keys, ref_values = _direct(backend, mappers, cameras, t, layer)
                assert torch.allclose(keys, ref_keys, atol=1e-5) and torch.allclose(values, ref_values, atol=1e-5)
                changed = (values != keys).any(-1)
                assert changed[:, 1].all() and changed[:, 7].all() and changed.sum() == 4  # the bypass rows only
    assert provider.contexts(_call(3, 999.0, UNCOND)) is None
    a, _ = provider.contexts(_call(3, 999.0))
    b, _ = provider.contexts(_call(4, 999.0))
    c, _ = provider.contexts(_call(3, 433.0))
    assert not torch.allclose(a, b) and not torch.allclose(a, c) and not torch.allclose(a[0], a[1])  # l, t, camera


def test_cache_is_compact_and_follows_the_schedule(backend, mappers, cameras):
    provider = _contexts(backend, mappers, cameras)
    schedule = [999.0, 666.0, 333.0]
    with prepared(provider, schedule):
        assert sorted(provider._cache) == sorted(schedule)
        per_step = NUM_LAYERS * 2 * (16 + 2) * WIDTH * 4  # keys (77 here 16 rows) + 2 bypassed rows of the values
        assert provider.cache_bytes == len(schedule) * per_step
        provider.contexts(_call(0, 500.0))  # a timestep outside the schedule is computed once and kept
        assert len(provider._cache) == 4
    assert provider.cache_bytes == 0  # released after the run
    half = _contexts(backend, mappers, cameras, cache_dtype=torch.float16)
    half.prepare([999.0])
    assert half.cache_bytes == per_step // 2 and half.contexts(_call(2, 999.0))[0].dtype == torch.float16


def test_patched_unet_equals_reference_with_direct_contexts(backend, mappers, cameras):
    """Cond chunk (2 cameras) gets k = to_k(A_l(t)), v = to_v(B_l(t)); the uncond chunk is untouched."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    with torch.no_grad():
        uncond = backend.encode_text(prompt_ids()).keys.expand(2, -1, -1)
        plain_cond = backend.text_encoder(input_ids=prompt_ids()).last_hidden_state.expand(2, -1, -1)
        context = torch.cat([uncond, plain_cond])
        provider = _contexts(backend, mappers, cameras)
        provider.prepare([766.0])
        patched = backend.unet(latents, 766.0, context, (UNCOND, COND), UNetPatches(contexts=provider))
        plain = backend.unet(latents, 766.0, context, (UNCOND, COND))
        direct = [_direct(backend, mappers, cameras, 766.0, layer) for layer in range(NUM_LAYERS)]
    order = [f"{layer.name}.transformer_blocks.0.attn2" for layer in backend.layers]
    reference = reference_with_projection_hooks(backend, order, latents, 766.0, context, (UNCOND, COND),
                                                [k for k, _ in direct], [v for _, v in direct])
    assert torch.allclose(patched, reference, atol=1e-5, rtol=0), (patched - reference).abs().max()
    assert torch.allclose(patched[:2], plain[:2], atol=1e-6)
    assert (patched[2:] - plain[2:]).abs().max() > 1e-3


def test_cfg_sampling_loop_uses_only_the_prepared_schedule(backend, mappers, cameras):
    schedule = backend.schedule
    timesteps = [999.0, 799.0, 599.0, 399.0]
    provider = _contexts(backend, mappers, cameras[:1])
    computed = []
    original = provider._store
    provider._store = lambda t: computed.append(t) or original(t)
    uncond = backend.encode_text(prompt_ids()).keys
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * float(schedule.sigma(999))
    with torch.no_grad(), prepared(provider, timesteps):
        prepared_steps = list(computed)
        for i, t in enumerate(timesteps):  # Euler in sigma space, as ComfyUI samples
            sigma = float(schedule.sigma(t))
            next_sigma = float(schedule.sigma(timesteps[i + 1])) if i + 1 < len(timesteps) else 0.0
            eps = backend.predict_noise(x / (1 + sigma ** 2) ** 0.5, t, uncond, uncond, 5.0,
                                        UNetPatches(contexts=provider))
            x = x + eps * (next_sigma - sigma)
    assert prepared_steps == timesteps and computed == timesteps and torch.isfinite(x).all()


def test_uncached_contexts_carry_gradients_to_the_mappers(backend, mappers, cameras):
    view, obj = _mapper(12, 2).train(True), _mapper(0, 3).train(True)
    provider = ViewNetiContexts(backend, prompt_ids(), view, VIEW, cameras, obj, OBJECT, cache=False)
    latents = torch.randn(2, 4, 8, 8)
    context = backend.encode_text(prompt_ids()).keys.expand(2, -1, -1)
    timesteps = torch.tensor([120.0, 870.0])  # per-row timesteps, as in training
    out = backend.unet(latents, timesteps, context, (COND,), UNetPatches(contexts=provider))
    out.square().mean().backward()
    assert view.output_layer[0].weight.grad.abs().sum() > 0 and obj.output_layer[0].weight.grad.abs().sum() > 0
    assert provider.cache_bytes == 0


def test_row_counts_are_checked(backend, mappers, cameras):
    provider = _contexts(backend, mappers, cameras)
    with pytest.raises(ValueError, match="2 camera rows but the cond chunk has 3 rows"):
        provider.contexts(_call(0, 999.0, rows=3))
    with pytest.raises(ValueError, match="exactly once"):
        ViewNetiContexts(backend, prompt_ids(), mappers[0], 7, cameras)  # 7 occurs twice
    with pytest.raises(ValueError, match="normalised camera numbers"):
        ViewNetiContexts(backend, prompt_ids(), mappers[0], VIEW)
    one = _contexts(backend, mappers, cameras[:1])
    with torch.no_grad():
        keys, _ = one.contexts(_call(5, 999.0, rows=4))  # one camera broadcasts over the chunk
    assert keys.shape[0] == 1


def test_prepare_reports_each_step_and_stops_on_interrupt(backend, mappers, cameras):
    from nvs_core.progress import Interrupted, Progress

    updates = []
    provider = _contexts(backend, mappers, cameras)
    def recording(total, desc):
        return Progress(total, desc, on_update=lambda done, tot: updates.append((done, tot)))

    provider.prepare([999.0, 500.0, 1.0], progress=recording)
    assert updates == [(1, 3), (2, 3), (3, 3)]
    provider.release()
    def stop(total, desc):  # the user interrupts once the first step is cached
        return Progress(total, desc, should_stop=lambda: len(provider._cache) >= 1)

    with pytest.raises(Interrupted):
        provider.prepare([999.0, 500.0], progress=stop)
    assert provider.cache_bytes > 0 and len(provider._cache) == 1  # stopped after the first step
