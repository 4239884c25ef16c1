"""The ComfyUI adapter of nvs_core's SD backend interface (ARCHITECTURE.md section 2).

ComfyUI objects come in as arguments (MODEL = ModelPatcher, CLIP, VAE); ComfyUI modules are imported only
inside functions. Every version-sensitive call of this adapter is in this module.

- (a) ``attn2_patch``: layer = ``transformer_index`` (checked against ``block``/``block_index``), chunk
  labels from ``cond_or_uncond`` (0 = cond, 1 = uncond), timesteps = ``model_sampling.timestep(sigmas)``
  (what the UNet itself receives); the provider's contexts replace ``context`` (keys) and ``value``.
- (b) ``middle_patch``: ComfyUI calls it right after the attn1 residual, before norm2/attn2.
- (f) a ``DIFFUSION_MODEL`` wrapper for a UNet-call wrapper patch: ComfyUI's rows (already c_in-scaled, with
  the discrete timesteps and ``cond_or_uncond`` labels) go to the method, which builds its own batch and runs the
  wrapped diffusion model on it as one chunk; stock samplers and direct calls both go through it. A wrapper
  with ``reseed`` gets the sampler's seed from an ``OUTER_SAMPLE`` wrapper.
- An ``OUTER_SAMPLE`` wrapper runs ``provider.check_batch(latent batch size)`` (if the provider has it) and
  ``provider.prepare(timesteps of the run's sigmas)`` before sampling and ``release()`` after it, so contexts
  are precomputed for the schedule and freed when it ends.
- All of it lives on a ``clone()`` of the incoming MODEL. The state object behind the patches holds no
  heavy tensors itself and is shared rather than deep-copied when ComfyUI copies ``transformer_options``.
- (c) ``unet``/``predict_noise`` call the patched clone's diffusion model directly (the same
  transformer_options a sampler would pass). ``differentiable=True`` (outside inference mode): the call runs
  through ``torch.func.functional_call`` with ordinary-tensor aliases of the loaded weights that are inference
  tensors (same storage, no copy), so backward works through ComfyUI's inference-mode UNet without the
  identity weight wrappers that made ComfyUI copy every weight per forward (and keep the copies for backward:
  the whole UNet again, 3.3 GB fp32 for SD 2.1). ``patch_model(differentiable=True)`` keeps the wrappers for a
  patched MODEL that ComfyUI's own samplers would run with gradients.
- (d) text: a transformers ``CLIPTextModel`` copy of the CLIP's weights up to the layer ComfyUI uses
  (e.g. SD 2.x penultimate), so ``encode_text`` with injected vectors matches ComfyUI's own encoding.
- (e) VAE: the CLIP-free LDM autoencoder of the VAE object; encoding samples the posterior like
  diffusers; a copy with ordinary tensors is made for differentiable encoding.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..nvs_core.sd.interface import (COND, LDM_BLOCKS, NUM_LAYERS, UNCOND, BlockCall, NoiseSchedule, SDBackend,
                                     UNetPatches, chunk_rows, override_cross_attention_context, prepared,
                                     shared_timestep)

from . import host

PATCH_KEY = "nvs_sd_backend"
COMFY_CHUNK_LABELS = {0: COND, 1: UNCOND}


def _chunks(extra_options) -> tuple:
    return tuple(COMFY_CHUNK_LABELS[int(c)] for c in extra_options["cond_or_uncond"])


def _layer(extra_options) -> int:
    """Our layer index, from ComfyUI's running transformer count, checked against the LDM block."""
    layer = int(extra_options["transformer_index"])
    block = tuple(extra_options.get("block") or ())
    if layer >= NUM_LAYERS or extra_options.get("block_index", 0) != 0 or block != LDM_BLOCKS[layer]:
        raise ValueError(f"transformer {layer} at block {block}: the NVS SD backend supports the SD 1.x/2.x UNet "
                         f"layout only (16 cross-attention blocks, {LDM_BLOCKS[min(layer, NUM_LAYERS - 1)]} here)")
    return layer


class ComfyPatch:
    """The state behind the patches of one patched clone: the method's patches and the model's sampling."""

    def __init__(self, patches: UNetPatches, model_sampling):
        self.patches = patches
        self.model_sampling = model_sampling
        self._step_of = None  # (sigmas tensor, timesteps, shared timestep) of the current UNet call

    def __deepcopy__(self, memo):
        return self  # clone() deep-copies transformer_options: share the provider, never copy its cache

    def _step(self, extra_options):
        # every layer of one UNet call gets the same sigmas tensor: convert it once
        sigmas = extra_options["sigmas"]
        if self._step_of is None or self._step_of[0] is not sigmas:
            timesteps = self.model_sampling.timestep(sigmas).float()
            self._step_of = (sigmas, timesteps, shared_timestep(timesteps))
        return self._step_of[1], sigmas, self._step_of[2]

    def attn2_patch(self, n, context, value, extra_options):
        timesteps, sigmas, shared = self._step(extra_options)
        override = override_cross_attention_context(context, _chunks(extra_options), _layer(extra_options),
                                                    timesteps, sigmas, self.patches.contexts, shared)
        if override is None:
            return n, context, value
        return n, override[0], override[1]

    def middle_patch(self, x, extra_options):
        timesteps, sigmas, _ = self._step(extra_options)
        spatial = tuple(extra_options.get("activations_shape", (0, 0))[-2:])
        info = BlockCall(_layer(extra_options), _chunks(extra_options), timesteps, sigmas, spatial)
        return self.patches.after_self_attention(x, info)

    def outer_sample(self, executor, *args, **kwargs):
        sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
        sigmas = sigmas[sigmas > 0]
        check_batch = getattr(self.patches.contexts, "check_batch", None)
        latent = kwargs["latent_image"] if "latent_image" in kwargs else (args[1] if len(args) > 1 else None)
        if check_batch is not None and latent is not None:  # before the (long) preparation
            check_batch(int(latent.shape[0]))
        with prepared(self.patches.contexts, self.model_sampling.timestep(sigmas).float(),
                      progress=host.progress_factory()):
            return executor(*args, **kwargs)

    def reseed_outer_sample(self, executor, *args, **kwargs):
        """``OUTER_SAMPLE`` wrapper: a UNet-call wrapper's own random draws follow the sampler's seed."""
        seed = kwargs["seed"] if "seed" in kwargs else (args[7] if len(args) > 7 else None)
        if seed is not None:
            self.patches.unet_wrapper.reseed(seed)
        return executor(*args, **kwargs)

    def diffusion_model(self, executor, x, timesteps, context=None, y=None, control=None, transformer_options=None,
                        **kwargs):
        """``DIFFUSION_MODEL`` wrapper for a UNet-call wrapper patch: the method rebuilds the batch around the
        rows ComfyUI passes (labelled by ``cond_or_uncond``) and runs the UNet on it as one chunk."""
        options = transformer_options if transformer_options is not None else {}
        if control is not None or y is not None:
            raise ValueError("this patched model rebuilds the UNet batch itself: ControlNets and class-label (y) "
                             "conditioning are not supported with it")

        def run(latents, steps, batch_context):
            inner = dict(options)
            inner["cond_or_uncond"] = [0]
            return executor(latents.to(x), steps.to(device=x.device, dtype=timesteps.dtype),
                            batch_context.to(context), None, None, inner, **kwargs)

        return self.patches.unet_wrapper(x, timesteps, context, _chunks(options), run)


def patch_model(model, patches: UNetPatches, differentiable: bool = False):
    """A clone of a ComfyUI MODEL with the patches installed; the input MODEL is not changed."""
    import comfy.patcher_extension

    patched = model.clone()
    state = ComfyPatch(patches, model.get_model_object("model_sampling"))
    if patches.contexts is not None:
        patched.set_model_attn2_patch(state.attn2_patch)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY, state.outer_sample)
    if patches.after_self_attention is not None:
        patched.set_model_patch(state.middle_patch, "middle_patch")
    if patches.unet_wrapper is not None:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY,
                                     state.diffusion_model)
        if hasattr(patches.unet_wrapper, "reseed"):
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY + ".reseed",
                                         state.reseed_outer_sample)
    if differentiable:
        for name, _ in patched.model.diffusion_model.named_parameters():
            # forces ComfyUI's cast to copy each weight: inference-mode weights cannot be saved for backward
            patched.add_weight_wrapper(f"diffusion_model.{name}", _identity)
    return patched


def _identity(weight):
    return weight


def _ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor sharing an inference tensor's storage: no copy, and autograd may save
    it for backward. Other tensors are returned as they are."""
    if not tensor.is_inference() or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor
    with torch.inference_mode(False):
        return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
            tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def ordinary_weights(module: torch.nn.Module) -> dict:
    """{name: ordinary alias} for the module's parameters and buffers that are inference tensors (ComfyUI loads
    models inside inference mode), for ``torch.func.functional_call``."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return {name: _ordinary(t) for name, t in named if t.is_inference()}


def model_context_dim(model):
    """The cross-attention context width of a MODEL's UNet (1024 for SD 2.x, 768 for SD 1.x), or None."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    width = config.get("context_dim")
    return int(width) if width is not None else None


def model_unet_config(model) -> dict:
    """The UNet config of a MODEL (``context_dim``, ``model_channels``, ``channel_mult``, ``in_channels``, ...);
    empty when the model does not say."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    return dict(config) if isinstance(config, dict) else {}


def set_guidance_scale(patched, scale: float) -> None:
    """Guide a patched MODEL with ``scale`` whatever the sampler's cfg (in-model CFG on the denoised predictions:
    uncond + scale (cond - uncond)); the unconditional chunk runs even at a sampler cfg of 1."""
    def guidance(args):
        return args["uncond"] + (args["cond"] - args["uncond"]) * scale

    patched.set_model_sampler_cfg_function(guidance, disable_cfg1_optimization=True)


def clip_vision_encoder(clip_vision):
    """pixels (B, 3, S, S), already CLIP-normalised -> the projected image embeddings (B, D) of a ComfyUI
    CLIP_VISION (what ``encode_image(...).image_embeds`` gives, without its own resize/crop)."""
    def encode(pixels):
        import comfy.model_management

        comfy.model_management.load_model_gpu(clip_vision.patcher)
        out = clip_vision.model(pixel_values=pixels.to(clip_vision.load_device).float(), intermediate_output=-2)
        return out[2].float().to(pixels.device)

    return encode


def prediction_type_of(model) -> str:
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.EDM) or not isinstance(sampling, comfy.model_sampling.EPS):
        raise ValueError(f"the NVS SD backend needs an eps or v-prediction SD model, got {type(sampling).__name__}")
    return "v_prediction" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "epsilon"


# ---------------------------------------------------------------------------------------- text

def transformers_text_encoder(clip, device=None, dtype: torch.dtype = torch.float32):
    """A transformers ``CLIPTextModel`` with the CLIP's weights, cut at the hidden layer ComfyUI encodes
    with (``last_hidden_state`` = ComfyUI's cond for the same tokens). SD 1.x/2.x single-CLIP models."""
    import comfy.clip_model
    import transformers

    stage = clip.cond_stage_model
    inner = getattr(stage, getattr(stage, "clip", ""), None)
    text_model = getattr(getattr(inner, "transformer", None), "text_model", None)
    if text_model is None or not hasattr(text_model, "encoder"):
        raise ValueError(f"unsupported CLIP {type(stage).__name__}: expected an SD 1.x/2.x single CLIP text model")
    if not getattr(inner, "layer_norm_hidden_state", True) or inner.layer not in ("last", "hidden"):
        raise ValueError(f"unsupported CLIP layer option {inner.layer!r}")
    total = len(text_model.encoder.layers)
    layers = total
    if inner.layer == "hidden":
        layers = total + inner.layer_idx + 1 if inner.layer_idx < 0 else inner.layer_idx + 1
    first = text_model.encoder.layers[0]
    activation = next(name for name, fn in comfy.clip_model.ACTIVATIONS.items() if fn is first.mlp.activation)
    vocab, width = text_model.embeddings.token_embedding.weight.shape
    config = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=first.mlp.fc1.weight.shape[0],
        num_hidden_layers=layers, num_attention_heads=first.self_attn.heads,
        max_position_embeddings=text_model.embeddings.position_embedding.weight.shape[0], hidden_act=activation,
        layer_norm_eps=first.layer_norm1.eps, projection_dim=width, bos_token_id=inner.special_tokens["start"],
        eos_token_id=inner.special_tokens["end"], pad_token_id=inner.special_tokens.get("pad", 0))
    with torch.device("meta"):
        model = transformers.CLIPTextModel(config)
    prefix = "" if not any(k.startswith("text_model.") for k in model.state_dict()) else "text_model."
    with torch.inference_mode(False):  # ordinary tensors, so gradients can flow to injected vectors
        state = {}
        for key, value in text_model.state_dict().items():
            parts = key.split(".")
            if parts[:2] == ["encoder", "layers"] and int(parts[2]) >= layers:
                continue
            state[prefix + key] = value.detach().to(device=device or value.device, dtype=dtype).clone()
        model.load_state_dict(state, strict=False, assign=True)
        embeddings = getattr(model, "text_model", model).embeddings
        embeddings.register_buffer("position_ids", torch.arange(config.max_position_embeddings,
                                                                device=device).expand((1, -1)), persistent=False)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"CLIP weights missing for {leftover[:3]}")
    return model.train(False).requires_grad_(False)


def clip_token_embedding_shape(clip):
    """(vocabulary size, token width) of an SD 1.x/2.x CLIP, without copying it."""
    stage = clip.cond_stage_model
    inner = getattr(stage, getattr(stage, "clip", ""), None)
    text_model = getattr(getattr(inner, "transformer", None), "text_model", None)
    embedding = getattr(getattr(text_model, "embeddings", None), "token_embedding", None)
    if embedding is None:
        raise ValueError(f"unsupported CLIP {type(stage).__name__}: expected an SD 1.x/2.x single CLIP text model")
    vocab, width = embedding.weight.shape
    return int(vocab), int(width)


def text_dtype_for(clip) -> torch.dtype:
    """fp16 for the transformers text-encoder copy on a CUDA device (as upstream ViewNeTI ran it), else fp32."""
    return torch.float16 if torch.device(clip.patcher.load_device).type == "cuda" else torch.float32


def encode_prompt(clip, text: str):
    """ComfyUI's own CONDITIONING for a plain prompt (what CLIPTextEncode gives)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# ---------------------------------------------------------------------------------------- backend

class ComfySDBackend(SDBackend):
    """The SD backend interface over ComfyUI's MODEL (and optionally CLIP and VAE) objects."""

    def __init__(self, model, clip=None, vae=None, differentiable: bool = False,
                 text_dtype: torch.dtype = torch.float32):
        self.model = model
        self.clip, self.vae = clip, vae
        self.differentiable = differentiable
        self.text_dtype = text_dtype
        self.model_sampling = model.get_model_object("model_sampling")
        self.schedule = NoiseSchedule.from_sigmas(self.model_sampling.sigmas.detach().cpu())
        self.prediction_type = prediction_type_of(model)
        self.latent_format = model.get_model_object("latent_format")
        self.latent_scaling_factor = float(self.latent_format.scale_factor)
        self._patched = {}
        self._text_encoder = None
        self._vae_encoder = None

    # ---- (a) (b): patched MODEL for ComfyUI's samplers, or direct calls
    def patched_model(self, patches: UNetPatches):
        key = (id(patches.contexts), id(patches.after_self_attention), id(patches.unet_wrapper))
        if key not in self._patched:
            self._patched[key] = (patches, patch_model(self.model, patches))
        return self._patched[key][1]

    def _unpatched(self):
        return self.model

    def unet(self, latents, timesteps, context, chunks=None, patches=None):
        import comfy.model_management
        import comfy.patcher_extension

        chunks = tuple(chunks or (COND,))
        rows = chunk_rows(latents.shape[0], chunks)
        patcher = self.patched_model(patches) if patches else self._unpatched()
        comfy.model_management.load_models_gpu([patcher])
        base = patcher.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        device = patcher.load_device
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=device).reshape(-1)
        timesteps = timesteps.expand(latents.shape[0]) if timesteps.numel() == 1 else timesteps
        options = dict(patcher.model_options.get("transformer_options", {}))
        options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
        options["cond_or_uncond"] = [0 if label == COND else 1 for label in chunks]
        options["sigmas"] = self.model_sampling.sigma(timesteps[:rows])
        args = (latents.to(device=device, dtype=dtype), timesteps)
        kwargs = dict(context=context.to(device=device, dtype=dtype), control=None, transformer_options=options)
        if self.differentiable and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            # the weights as loaded now (after ComfyUI's own weight patches), aliased, not copied
            unet = base.diffusion_model
            output = torch.func.functional_call(unet, ordinary_weights(unet), args, kwargs, tie_weights=False,
                                                strict=False)
        else:
            output = base.diffusion_model(*args, **kwargs)
        return output.float().to(latents.device)

    # ---- (d)
    @property
    def text_encoder(self):
        if self._text_encoder is None:
            if self.clip is None:
                raise ValueError("this SD backend was built without a CLIP")
            self._text_encoder = transformers_text_encoder(self.clip, self.clip.patcher.load_device, self.text_dtype)
        return self._text_encoder

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """ComfyUI's tokenizer (embedding:... syntax aside); the first 77-token chunk of each prompt."""
        if self.clip is None:
            raise ValueError("this SD backend was built without a CLIP")
        rows = []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            chunk = next(iter(tokens.values()))[0]
            rows.append([t[0] if isinstance(t[0], int) else 0 for t in chunk])
        return torch.tensor(rows, dtype=torch.long)

    def release_text_encoder(self) -> None:
        """Drop the transformers copy of the CLIP (rebuilt on the next text encoding)."""
        self._text_encoder = None

    # ---- (e)
    def _vae_model(self):
        if self.vae is None:
            raise ValueError("this SD backend was built without a VAE")
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.vae.patcher])
        return self.vae.first_stage_model

    def _moments(self, autoencoder, images):
        if hasattr(autoencoder, "quant_conv"):
            return autoencoder.quant_conv(autoencoder.encoder(images))
        return autoencoder.encode(images, unregularized=True)[0]

    def encode_images(self, images, sample=True, generator=None):
        autoencoder = self._vae_model()
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            if self._vae_encoder is None:  # ordinary-tensor copy of the encoder side, made once
                with torch.inference_mode(False):
                    self._vae_encoder = copy.deepcopy(autoencoder).requires_grad_(False)
                    for tensor in list(self._vae_encoder.parameters()) + list(self._vae_encoder.buffers()):
                        tensor.data = tensor.data.clone()
            autoencoder = self._vae_encoder
        parameter = next(autoencoder.parameters())
        moments = self._moments(autoencoder, images.to(device=parameter.device, dtype=self.vae.vae_dtype)).float()
        mean, logvar = moments.chunk(2, dim=1)
        latents = mean
        if sample:
            std = (0.5 * logvar.clamp(-30.0, 20.0)).exp()
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
            latents = mean + std * noise.to(mean.device)
        return self.latent_format.process_in(latents).to(images.device)

    def decode_latents(self, latents):
        autoencoder = self._vae_model()
        parameter = next(autoencoder.parameters())
        z = self.latent_format.process_out(latents).to(device=parameter.device, dtype=self.vae.vae_dtype)
        return autoencoder.decode(z).float().to(latents.device)
