"""The SD backend interface and its diffusers adapter, on tiny random SD components built from configs."""
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from nvs_core.sd import (COND, DIFFUSERS_ATTENTIONS, LAYER_NAMES, LDM_BLOCKS, NUM_LAYERS, UNCOND, NoiseSchedule,
                         UNetPatches, override_cross_attention_context)
from nvs_core.sd.diffusers_backend import (CONFIG_DIR, SHIPPED_CONFIGS, DiffusersSDBackend, cross_attention_layers,
                                           load_diffusers_folder, load_single_file)
from nvs_core.sd.tiny import OBJECT, ldm_checkpoint, prompt_ids, tiny_backend
from nvs_core.viewneti.text import PlaceholderVectors

TOKENS, WIDTH = 16, 32




@pytest.fixture(scope="module")
def backend():
    return tiny_backend(seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, TOKENS, WIDTH, generator=g)
    keys = [torch.randn(1, TOKENS, WIDTH, generator=g) for _ in range(NUM_LAYERS)]
    values = [torch.randn(1, TOKENS, WIDTH, generator=g) for _ in range(NUM_LAYERS)]
    return latents, context, keys, values


@pytest.fixture(scope="module")
def call_order(backend, inputs):
    """Names of the cross-attention modules in the order a plain forward calls them."""
    latents, context, _, _ = inputs
    order = []
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
             for name, module in backend.unet_model.named_modules() if name.endswith(".attn2")]
    try:
        with torch.no_grad():
            backend.unet(latents, 500.0, context)
    finally:
        for hook in hooks:
            hook.remove()
    return order


class PerLayerContexts:
    """Cond chunk: keys A_l, values B_l; uncond untouched. Records what it was asked."""

    def __init__(self, keys, values):
        self.keys, self.values, self.calls = keys, values, []

    def contexts(self, call):
        self.calls.append(call)
        return (self.keys[call.layer], self.values[call.layer]) if call.chunk == COND else None


def reference_with_projection_hooks(backend, order, latents, timestep, context, chunks, keys, values):
    """Independent reference: the stock UNet with forward hooks on each layer's to_k / to_v that replace the
    cond rows' projections by to_k(A_l) / to_v(B_l); layer l = the l-th cross-attention called."""
    rows = latents.shape[0] // len(chunks)
    cond_rows = [slice(i * rows, (i + 1) * rows) for i, label in enumerate(chunks) if label == COND]
    hooks = []
    for layer, name in enumerate(order):
        attn = backend.unet_model.get_submodule(name)
        for projection, source in ((attn.to_k, keys[layer]), (attn.to_v, values[layer])):
            def replace(module, args, output, source=source):
                output = output.clone()
                for part in cond_rows:
                    output[part] = F.linear(source, module.weight, module.bias).expand(rows, -1, -1)
                return output
            hooks.append(projection.register_forward_hook(replace))
    try:
        with torch.no_grad():
            return backend.unet(latents, timestep, context, chunks)
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------------- layer indices

def test_layer_index_is_call_order_in_ldm_names(backend, call_order):
    assert LAYER_NAMES[0] == "IN01" and LAYER_NAMES[6] == "MID" and LAYER_NAMES[-1] == "OUT11"
    assert len(call_order) == NUM_LAYERS
    assert call_order == [f"{name}.transformer_blocks.0.attn2" for name in DIFFUSERS_ATTENTIONS]
    assert [layer.name for layer in backend.layers] == list(DIFFUSERS_ATTENTIONS)
    # named_modules() lists the mid block last: the index is the call order, not the registration order
    registered = [n for n, _ in backend.unet_model.named_modules() if n.endswith(".attn2")]
    assert registered[-1].startswith("mid_block") and registered != call_order
    # LDM name of each index (IN01 = input_blocks.1 ... OUT11 = output_blocks.11) agrees with LDM_BLOCKS
    for name, (kind, block) in zip(LAYER_NAMES, LDM_BLOCKS):
        assert name == {"input": f"IN{block:02d}", "middle": "MID", "output": f"OUT{block:02d}"}[kind]


def test_ldm_block_of_each_layer_is_the_diffusers_module_diffusers_converts_it_to(backend):
    """diffusers' own single-file converter maps input_blocks.N.1 / middle_block.1 / output_blocks.N.1 onto
    the module our index names: same physical layer in the LDM (ComfyUI) and diffusers layouts."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    checkpoint = ldm_checkpoint(backend.unet_model)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(backend.unet_model.config))
    state = backend.unet_model.state_dict()
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)
    for (kind, block), name in zip(LDM_BLOCKS, DIFFUSERS_ATTENTIONS):
        ldm = {"input": f"input_blocks.{block}.1", "middle": "middle_block.1",
               "output": f"output_blocks.{block}.1"}[kind]
        weight = checkpoint[f"model.diffusion_model.{ldm}.transformer_blocks.0.attn2.to_k.weight"]
        assert torch.equal(weight, state[f"{name}.transformer_blocks.0.attn2.to_k.weight"])


def test_shipped_configs_have_the_sd_layout():
    from diffusers import UNet2DConditionModel

    for name in SHIPPED_CONFIGS:
        config = json.loads((CONFIG_DIR / name / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        layers = cross_attention_layers(unet)
        heads = [layer.attn2.heads for layer in layers]
        assert heads[0] == (8 if name == "sd15" else 5) and layers[6].name == "mid_block.attentions.0"
        assert layers[0].attn2.to_k.in_features == (768 if name == "sd15" else 1024)


def test_non_sd_unet_is_refused():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
    with pytest.raises(ValueError, match="16 cross-attention layers, found 6"):
        DiffusersSDBackend(unet)


# ------------------------------------------------------------------------- (a) context override

def test_patched_unet_equals_independent_reference(backend, inputs, call_order):
    latents, context, keys, values = inputs
    provider = PerLayerContexts(keys, values)
    with torch.no_grad():
        patched = backend.unet(latents, 500.0, context, (UNCOND, COND), UNetPatches(contexts=provider))
        plain = backend.unet(latents, 500.0, context, (UNCOND, COND))
    reference = reference_with_projection_hooks(backend, call_order, latents, 500.0, context, (UNCOND, COND),
                                                keys, values)
    assert torch.allclose(patched, reference, atol=1e-5, rtol=0), (patched - reference).abs().max()
    assert torch.allclose(patched[0], plain[0], atol=1e-6)           # uncond untouched
    assert (patched[1] - plain[1]).abs().max() > 1e-3                # cond changed
    assert [c.layer for c in provider.calls if c.chunk == COND] == list(range(NUM_LAYERS))
    call = provider.calls[0]
    assert call.rows == 1 and float(call.timesteps[0]) == 500.0
    assert torch.allclose(call.sigmas, backend.schedule.sigma(torch.tensor([500.0])))
    # the modules are left as they were
    assert all(type(layer.attn2.processor).__name__ != "_ContextOverrideProcessor" for layer in backend.layers)


def test_chunks_are_found_by_label_not_position(backend, inputs):
    latents, context, keys, values = inputs
    provider = PerLayerContexts(keys, values)
    swapped = torch.stack([context[1], context[0]])
    with torch.no_grad():
        first = backend.unet(latents, 300.0, context, (UNCOND, COND), UNetPatches(contexts=provider))
        second = backend.unet(latents.flip(0), 300.0, swapped, (COND, UNCOND), UNetPatches(contexts=provider))
    assert torch.allclose(first, second.flip(0), atol=1e-6)


def test_keys_and_values_really_come_from_different_contexts(backend, inputs, call_order):
    latents, context, keys, _ = inputs
    with torch.no_grad():
        same = backend.unet(latents, 500.0, context, (UNCOND, COND), UNetPatches(PerLayerContexts(keys, keys)))
    reference = reference_with_projection_hooks(backend, call_order, latents, 500.0, context, (UNCOND, COND),
                                                keys, keys)
    assert torch.allclose(same, reference, atol=1e-5, rtol=0)


def test_repeated_tokens_leave_attention_unchanged(backend, inputs):
    """A longer override (2T tokens) is merged with T-token chunks by repetition, which is exact."""
    latents, context, _, _ = inputs
    doubled = [context[1:].repeat(1, 2, 1)] * NUM_LAYERS
    with torch.no_grad():
        patched = backend.unet(latents, 500.0, context, (UNCOND, COND), UNetPatches(PerLayerContexts(doubled, doubled)))
        plain = backend.unet(latents, 500.0, context, (UNCOND, COND))
    assert torch.allclose(patched, plain, atol=1e-5)


def test_override_helper_validates_shapes():
    context = torch.zeros(4, 7, 8)

    class Wrong:
        def contexts(self, call):
            return torch.zeros(3, 7, 8), torch.zeros(3, 7, 8)

    with pytest.raises(ValueError, match="does not fit 2 rows"):
        override_cross_attention_context(context, (UNCOND, COND), 3, torch.zeros(2), torch.zeros(2), Wrong())
    with pytest.raises(ValueError, match="cannot be split"):
        override_cross_attention_context(torch.zeros(3, 7, 8), (UNCOND, COND), 0, torch.zeros(1), torch.zeros(1),
                                         Wrong())


# -------------------------------------------------------------------- (b) after self-attention

def test_after_self_attention_hook(backend, inputs):
    latents, context, _, _ = inputs
    seen = []

    def identity(hidden, info):
        seen.append(info)
        return hidden

    with torch.no_grad():
        plain = backend.unet(latents, 500.0, context, (UNCOND, COND))
        hooked = backend.unet(latents, 500.0, context, (UNCOND, COND), UNetPatches(after_self_attention=identity))
    assert torch.equal(hooked, plain)  # the block computation is diffusers' own, exactly
    assert [i.layer for i in seen] == list(range(NUM_LAYERS)) and seen[0].chunks == (UNCOND, COND)
    assert [i.spatial_shape for i in seen] == [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] * 2 + [(2, 2)] \
        + [(4, 4)] * 3 + [(8, 8)] * 3 + [(16, 16)] * 3
    assert all(type(layer.block).__dict__.get("forward") is not None and "forward" not in layer.block.__dict__
               for layer in backend.layers)


def test_after_self_attention_hook_matches_a_residual_reference(backend, inputs):
    """Adding d_l to the uncond rows after the attn1 residual equals adding it to attn1's output."""
    latents, context, _, _ = inputs
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(1, 1, layer.block.norm1.normalized_shape[0], generator=g) for layer in backend.layers]

    def add_to_uncond(hidden, info):
        rows = hidden.shape[0] // len(info.chunks)
        out = hidden.clone()
        index = info.chunks.index(UNCOND)
        out[index * rows:(index + 1) * rows] += deltas[info.layer]
        return out

    with torch.no_grad():
        hooked = backend.unet(latents, 700.0, context, (COND, UNCOND), UNetPatches(after_self_attention=add_to_uncond))
    hooks = []
    for layer in backend.layers:
        def shift(module, args, output, delta=deltas[layer.index]):
            output = output.clone()
            output[1:] += delta
            return output
        hooks.append(layer.block.attn1.register_forward_hook(shift))
    try:
        with torch.no_grad():
            reference = backend.unet(latents, 700.0, context, (COND, UNCOND))
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.allclose(hooked, reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- (c) noise prediction, CFG

def test_cfg_noise_prediction_and_gradients(backend, inputs):
    latents, context, _, _ = inputs
    x = latents[:1].clone().requires_grad_(True)
    cond, uncond = context[1:].clone().requires_grad_(True), context[:1]
    eps = backend.predict_noise(x, 400, cond, uncond, guidance_scale=7.5)
    with torch.no_grad():
        eps_c = backend.unet(x, 400.0, cond)
        eps_u = backend.unet(x, 400.0, uncond)
    assert torch.allclose(eps, eps_u + 7.5 * (eps_c - eps_u), atol=1e-4)
    eps.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and cond.grad.abs().sum() > 0
    with torch.no_grad():  # guidance 1 or no uncond: the cond pass only
        assert torch.allclose(backend.predict_noise(latents[:1], 400, cond.detach()), eps_c, atol=1e-6)


def test_v_prediction_is_converted_to_eps(backend, inputs):
    latents, context, _, _ = inputs
    v_backend = DiffusersSDBackend(backend.unet_model, prediction_type="v_prediction")
    with torch.no_grad():
        v = backend.unet(latents[:1], 250.0, context[1:])
        eps = v_backend.predict_noise(latents[:1], 250, context[1:])
    abar = v_backend.schedule.alphas_cumprod[250].float()
    assert torch.allclose(eps, abar.sqrt() * v + (1 - abar).sqrt() * latents[:1], atol=1e-5)


def test_schedule_matches_diffusers_and_maps_sigma_to_timestep():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.scaled_linear()
    assert torch.allclose(schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5)
    t = torch.tensor([0, 1, 250, 500, 999])
    sigmas = schedule.sigma(t.float())
    assert torch.equal(schedule.timestep(sigmas), t.float())
    assert abs(float(schedule.sigma(999)) - 14.6146) < 1e-3 and abs(float(schedule.sigma(0)) - 0.0292) < 1e-4
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    assert torch.allclose(schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(schedule.velocity(x0, noise, t), scheduler.get_velocity(x0, noise, t), atol=1e-5)
    # x_t * sqrt(1 + sigma^2) = x0 + sigma * eps (k-diffusion / ComfyUI scale)
    x_t = schedule.add_noise(x0, noise, t)
    assert torch.allclose(x_t * (1 + sigmas[:, None, None, None] ** 2).sqrt(), x0 + sigmas[:, None, None, None] * noise,
                          atol=1e-4)
    v = schedule.velocity(x0, noise, t)
    assert torch.allclose(schedule.x0_from_output(v, x_t, t, "v_prediction"), x0, atol=1e-4)
    assert torch.allclose(schedule.eps_from_output(v, x_t, t, "v_prediction"), noise, atol=1e-4)


# --------------------------------------------------------------------------- (d) text, (e) VAE

def test_text_embeddings_are_injected_at_the_placeholder(backend):
    ids = prompt_ids(2)
    word = torch.randn(WIDTH)
    encoder = backend.text_encoder
    with torch.no_grad():
        injected = backend.encode_text(ids, object_vectors=PlaceholderVectors(OBJECT, word))
        table = encoder.get_input_embeddings().weight
        saved = table[OBJECT].clone()
        table[OBJECT] = word
        try:
            stock = encoder(input_ids=ids).last_hidden_state
        finally:
            table[OBJECT] = saved
    assert torch.allclose(injected.keys, stock, atol=1e-6) and torch.equal(injected.keys, injected.values)
    learned = word.clone().requires_grad_(True)
    backend.encode_text(ids, object_vectors=PlaceholderVectors(OBJECT, learned)).keys.sum().backward()
    assert learned.grad.abs().sum() > 0


def test_tokenizer_with_added_placeholder_tokens(backend, tmp_path):
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, ".</w>": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                           model_max_length=TOKENS)
    with_tokenizer = DiffusersSDBackend(backend.unet_model, backend.text_encoder, tokenizer)
    view, obj = with_tokenizer.add_placeholder_tokens(["<view>", "<object>"])
    ids = with_tokenizer.tokenize(["<view>. a b <object>"])
    assert ids.shape == (1, TOKENS) and ids[0, :7].tolist() == [0, view, 4, 2, 3, obj, 1]
    assert backend.text_encoder.get_input_embeddings().num_embeddings == 64  # large enough: not resized
    with torch.no_grad():
        encoding = with_tokenizer.encode_text(ids, view_vectors=PlaceholderVectors(view, torch.randn(WIDTH)))
    assert encoding.keys.shape == (1, TOKENS, WIDTH)


def test_vae_gradients_flow_through_the_encoder(backend):
    images = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    latents = backend.encode_images(images, generator=torch.Generator().manual_seed(0))
    again = backend.encode_images(images, generator=torch.Generator().manual_seed(0))
    mean = backend.encode_images(images, sample=False)
    assert latents.shape == (1, 4, 8, 8) and torch.equal(latents, again) and not torch.equal(latents, mean)
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in backend.vae.parameters())  # frozen
    with torch.no_grad():
        decoded = backend.decode_latents(mean)
    assert decoded.shape == (1, 3, 16, 16)
    direct = backend.vae.decode(mean / backend.latent_scaling_factor).sample
    assert torch.allclose(decoded, direct, atol=1e-6)


def test_missing_components_are_named():
    bare = DiffusersSDBackend(tiny_backend().unet_model)
    with pytest.raises(ValueError, match="without a text encoder"):
        bare.encode_text(prompt_ids())
    with pytest.raises(ValueError, match="without a VAE"):
        bare.encode_images(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="without a tokenizer"):
        bare.tokenize(["a photo"])


# ----------------------------------------------------------------------------------- loading

def _tiny_config_folder(backend, folder, prediction_type="v_prediction"):
    backend.unet_model.save_config(folder / "unet")
    backend.text_encoder.config.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "prediction_type": prediction_type}))
    return folder


def test_single_file_checkpoint_loads_with_a_local_config(backend, tmp_path):
    from safetensors.torch import save_file

    folder = _tiny_config_folder(backend, tmp_path / "config")
    path = tmp_path / "tiny.safetensors"
    save_file(ldm_checkpoint(backend.unet_model, backend.text_encoder), str(path))
    loaded = load_single_file(path, folder)
    assert loaded.prediction_type == "v_prediction" and loaded.vae is None
    for mine, theirs in ((loaded.unet_model, backend.unet_model), (loaded.text_encoder, backend.text_encoder)):
        ref = theirs.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in mine.state_dict().items())
    ids = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(loaded.text_encoder(input_ids=ids).last_hidden_state,
                              backend.text_encoder(input_ids=ids).last_hidden_state, atol=1e-6)
    save_file({"first_stage_model.x": torch.zeros(1)}, str(tmp_path / "vae_only.safetensors"))
    with pytest.raises(ValueError, match="not an LDM Stable Diffusion checkpoint"):
        load_single_file(tmp_path / "vae_only.safetensors", folder)
    with pytest.raises(FileNotFoundError, match="no unet/config.json"):
        load_single_file(path, tmp_path)


def test_diffusers_folder_loads_locally(backend, tmp_path):
    backend.unet_model.save_pretrained(tmp_path / "sd" / "unet")
    backend.text_encoder.save_pretrained(tmp_path / "sd" / "text_encoder")
    backend.vae.save_pretrained(tmp_path / "sd" / "vae")
    loaded = load_diffusers_folder(tmp_path / "sd")
    assert loaded.tokenizer is None and loaded.prediction_type == "epsilon"
    ref = backend.unet_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.unet_model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="not a diffusers Stable Diffusion folder"):
        load_diffusers_folder(tmp_path / "missing")
