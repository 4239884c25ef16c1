"""The diffusers adapter of the SD backend interface: UNet2DConditionModel, CLIPTextModel, AutoencoderKL.

How the capabilities are implemented, only for the duration of one ``unet`` call (the modules are left
as they were afterwards):
- (a) the 16 ``attn2`` modules, looked up by name (``DIFFUSERS_ATTENTIONS``), get an attention processor
  that asks the provider for each chunk's contexts and runs k = to_k(keys), v = to_v(values); chunks and
  calls without an override go to the module's own processor unchanged;
- (b) each transformer block's ``forward`` is replaced by the SD 1.x/2.x block computation with the hook
  after the self-attention residual (where ComfyUI's ``middle_patch`` sits); a pre-hook on its
  Transformer2DModel records the token grid (h, w);
- (f) a ``unet_wrapper`` gets the call's rows and a ``run`` that evaluates the UNet, with the other patches,
  on the batch it builds (one COND chunk).
Loading: diffusers folders, and single-file LDM checkpoints (``.safetensors``/``.ckpt``) through
diffusers' ``from_single_file`` with a local config folder (``configs/sd15``, ``sd21``, ``sd21-base`` ship
with this package; no download is ever attempted). diffusers/transformers are imported lazily.
"""
from __future__ import annotations

import json
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .interface import (COND, DIFFUSERS_ATTENTIONS, NUM_LAYERS, PREDICTION_TYPES, BlockCall, NoiseSchedule,
                        SDBackend, UNetPatches, chunk_rows, override_cross_attention_context, shared_timestep)

PathLike = Union[str, Path]
CONFIG_DIR = Path(__file__).with_name("configs")
SHIPPED_CONFIGS = ("sd15", "sd21", "sd21-base")


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One of the 16 layers in a diffusers UNet."""

    index: int
    name: str               # the Transformer2DModel, e.g. "down_blocks.0.attentions.0"
    transformer: nn.Module  # Transformer2DModel
    block: nn.Module        # its single BasicTransformerBlock
    attn2: nn.Module        # the block's cross-attention


def attention_names_in_call_order(unet: nn.Module) -> List[str]:
    """The Transformer2DModel names of any ``UNet2DConditionModel`` layout, in call order (down, mid, up)."""
    names = []
    for group in ("down_blocks", "up_blocks"):
        if group == "up_blocks" and getattr(getattr(unet, "mid_block", None), "attentions", None) is not None:
            names += [f"mid_block.attentions.{j}" for j in range(len(unet.mid_block.attentions))]
        for i, block in enumerate(getattr(unet, group)):
            names += [f"{group}.{i}.attentions.{j}" for j in range(len(getattr(block, "attentions", None) or ()))]
    return names


def cross_attention_layers(unet: nn.Module, any_layout: bool = False) -> List[CrossAttentionLayer]:
    """The 16 cross-attention layers of an SD 1.x/2.x ``UNet2DConditionModel``, index 0..15 in call order.

    ``any_layout=True`` accepts other block layouts (e.g. the tiny 2-level UNets of golden fixtures): the
    layers are then every transformer block in call order, however many there are."""
    cross = [name for name, module in unet.named_modules()
             if name.endswith(".attn2") and getattr(module, "is_cross_attention", False)]
    if any_layout:
        names = attention_names_in_call_order(unet)
    elif len(cross) != NUM_LAYERS:
        raise ValueError(f"expected an SD 1.x/2.x UNet with {NUM_LAYERS} cross-attention layers, found {len(cross)}")
    else:
        names = DIFFUSERS_ATTENTIONS
    layers = []
    for index, name in enumerate(names):
        try:
            transformer = unet.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {index}: the UNet has no {name} (not the SD 1.x/2.x block layout)") from None
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None or len(blocks) != 1 or getattr(blocks[0], "attn2", None) is None:
            raise ValueError(f"layer {index}: {name} is not a Transformer2DModel with one cross-attention block")
        layers.append(CrossAttentionLayer(index, name, transformer, blocks[0], blocks[0].attn2))
    return layers


# -------------------------------------------------------------------------------- patched calls

@dataclass
class _ActiveCall:
    chunks: tuple
    timesteps: torch.Tensor  # (n,) per row of one chunk
    sigmas: torch.Tensor
    shared: Optional[float]  # the timestep all rows share, if they do
    patches: UNetPatches
    spatial: Dict[int, tuple]


def _attention_with_separate_values(attn, hidden_states, keys_context, values_context, attention_mask=None):
    """diffusers' AttnProcessor2_0 with k = to_k(keys_context) and v = to_v(values_context)."""
    residual = hidden_states
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, keys_context.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        keys_context = attn.norm_encoder_hidden_states(keys_context)
        values_context = attn.norm_encoder_hidden_states(values_context)
    key = attn.to_k(keys_context)
    value = attn.to_v(values_context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                   is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class _ContextOverrideProcessor:
    """Cross-attention processor for one layer: provider contexts where given, else the original processor."""

    def __init__(self, layer: int, call: _ActiveCall, original):
        self.layer, self.call, self.original = layer, call, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        override = None
        if encoder_hidden_states is not None:
            override = override_cross_attention_context(encoder_hidden_states, self.call.chunks, self.layer,
                                                        self.call.timesteps, self.call.sigmas,
                                                        self.call.patches.contexts, self.call.shared)
        if override is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return _attention_with_separate_values(attn, hidden_states, override[0], override[1], attention_mask)


def _check_sd_block(block: nn.Module, name: str) -> None:
    if getattr(block, "norm_type", None) != "layer_norm" or getattr(block, "pos_embed", None) is not None \
            or getattr(block, "only_cross_attention", False) or hasattr(block, "fuser"):
        raise ValueError(f"{name}: the after-self-attention hook needs a plain SD 1.x/2.x transformer block")


def _block_forward_with_hook(block, layer: int, call: _ActiveCall, hidden_states, attention_mask=None,
                             encoder_hidden_states=None, encoder_attention_mask=None, timestep=None,
                             cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    """diffusers' BasicTransformerBlock.forward for SD blocks (layer_norm, no gating), plus the hook."""
    cross_attention_kwargs = dict(cross_attention_kwargs or {})
    attn_output = block.attn1(block.norm1(hidden_states), encoder_hidden_states=None, attention_mask=attention_mask,
                              **cross_attention_kwargs)
    hidden_states = attn_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    info = BlockCall(layer, call.chunks, call.timesteps, call.sigmas, call.spatial.get(layer, (0, 0)))
    hidden_states = call.patches.after_self_attention(hidden_states, info)
    attn_output = block.attn2(block.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                              attention_mask=encoder_attention_mask, **cross_attention_kwargs)
    hidden_states = attn_output + hidden_states
    hidden_states = block.ff(block.norm3(hidden_states)) + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


# ------------------------------------------------------------------------------------ the backend

class DiffusersSDBackend(SDBackend):
    """SD 1.x/2.x from diffusers/transformers modules. ``text_encoder``/``tokenizer``/``vae`` are optional
    (capabilities that need a missing one raise a ValueError naming it). ``any_layout=True`` also takes
    UNets with another transformer-block count (``num_layers`` of them, in call order)."""

    def __init__(self, unet: nn.Module, text_encoder: Optional[nn.Module] = None, tokenizer=None,
                 vae: Optional[nn.Module] = None, schedule: Optional[NoiseSchedule] = None,
                 prediction_type: str = "epsilon", any_layout: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet_model = unet
        self.layers = cross_attention_layers(unet, any_layout)
        self.num_layers = len(self.layers)
        self._text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.schedule = schedule or NoiseSchedule.scaled_linear()
        self.prediction_type = prediction_type
        if vae is not None:
            self.latent_scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    # ---- (a) (b)
    @contextmanager
    def _patched(self, call: _ActiveCall):
        restore = []
        try:
            if call.patches.contexts is not None:
                for layer in self.layers:
                    original = layer.attn2.processor
                    layer.attn2.set_processor(_ContextOverrideProcessor(layer.index, call, original))
                    restore.append(lambda attn=layer.attn2, p=original: attn.set_processor(p))
            if call.patches.after_self_attention is not None:
                for layer in self.layers:
                    _check_sd_block(layer.block, layer.name)
                    restore.append(self._override_forward(layer, call))

                    def record(module, args, index=layer.index):
                        call.spatial[index] = tuple(args[0].shape[-2:])

                    restore.append(layer.transformer.register_forward_pre_hook(record).remove)
            yield
        finally:
            for undo in reversed(restore):
                undo()

    @staticmethod
    def _override_forward(layer: CrossAttentionLayer, call: _ActiveCall):
        block = layer.block
        previous = block.__dict__.get("forward")  # an instance-level forward someone else installed
        block.forward = types.MethodType(
            lambda self, *args, **kwargs: _block_forward_with_hook(self, layer.index, call, *args, **kwargs), block)

        def undo():
            if previous is None:
                del block.forward
            else:
                block.forward = previous
        return undo

    def unet(self, latents, timesteps, context, chunks=None, patches=None):
        chunks = tuple(chunks or (COND,))
        rows = chunk_rows(latents.shape[0], chunks)
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=latents.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(latents.shape[0])
        if patches is not None and patches.unet_wrapper is not None:
            inner = UNetPatches(patches.contexts, patches.after_self_attention)

            def run_batch(batch_latents, batch_timesteps, batch_context):
                return self.unet(batch_latents, batch_timesteps, batch_context, (COND,), inner)

            return patches.unet_wrapper(latents, timesteps, context, chunks, run_batch).to(latents.dtype)
        dtype = self.unet_model.dtype
        run = lambda: self.unet_model(latents.to(dtype), timesteps, encoder_hidden_states=context.to(dtype),
                                      return_dict=False)[0]
        if not patches:
            return run().to(latents.dtype)
        step = timesteps[:rows]
        call = _ActiveCall(chunks, step, self.schedule.sigma(step.detach().cpu()).to(step.device),
                           shared_timestep(step), patches, {})
        with self._patched(call):
            return run().to(latents.dtype)

    # ---- (d)
    @property
    def text_encoder(self) -> nn.Module:
        if self._text_encoder is None:
            raise ValueError("this SD backend was built without a text encoder")
        return self._text_encoder

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this SD backend was built without a tokenizer: pass token ids, or load a diffusers "
                             "folder with tokenizer/ (or give tokenizer_folder)")
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def add_placeholder_tokens(self, tokens: Sequence[str]) -> List[int]:
        """Add new tokens to the tokenizer (and rows to the embedding table); returns their ids."""
        if self.tokenizer is None:
            raise ValueError("adding placeholder tokens needs a tokenizer")
        self.tokenizer.add_tokens(list(tokens))
        if len(self.tokenizer) > self.text_encoder.get_input_embeddings().num_embeddings:
            self.text_encoder.resize_token_embeddings(len(self.tokenizer))  # rows the injection overwrites anyway
        return self.tokenizer.convert_tokens_to_ids(list(tokens))

    # ---- (e)
    def _vae(self) -> nn.Module:
        if self.vae is None:
            raise ValueError("this SD backend was built without a VAE")
        return self.vae

    def encode_images(self, images, sample=True, generator=None):
        vae = self._vae()
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * self.latent_scaling_factor

    def decode_latents(self, latents):
        vae = self._vae()
        return vae.decode((latents / self.latent_scaling_factor).to(vae.dtype), return_dict=False)[0]

    def to(self, device=None, dtype=None) -> "DiffusersSDBackend":
        for module in (self.unet_model, self._text_encoder, self.vae):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self


# ------------------------------------------------------------------------------------------ loading

def _scheduler_settings(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _schedule_from_settings(settings: dict) -> NoiseSchedule:
    kind = settings.get("beta_schedule", "scaled_linear")
    if kind != "scaled_linear":
        raise ValueError(f"unsupported beta_schedule {kind!r}: SD 1.x/2.x use 'scaled_linear'")
    return NoiseSchedule.scaled_linear(settings.get("beta_start", 0.00085), settings.get("beta_end", 0.012),
                                       settings.get("num_train_timesteps", 1000))


def _frozen(module: Optional[nn.Module], device, dtype) -> Optional[nn.Module]:
    if module is None:
        return None
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device=device).train(False).requires_grad_(False)


def load_diffusers_folder(folder: PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                          components: Sequence[str] = ("unet", "text_encoder", "tokenizer", "vae"),
                          prediction_type: Optional[str] = None) -> DiffusersSDBackend:
    """An SD 1.x/2.x diffusers folder (model_index.json layout); local files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{folder}: not a diffusers Stable Diffusion folder (no unet/ subfolder)")
    local = dict(local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local)
    text_encoder = tokenizer = vae = None
    if "text_encoder" in components and (folder / "text_encoder").is_dir():
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    if "tokenizer" in components and (folder / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **local)
    if "vae" in components and (folder / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **local)
    settings = _scheduler_settings(folder)
    return DiffusersSDBackend(_frozen(unet, device, dtype), _frozen(text_encoder, device, dtype), tokenizer,
                              _frozen(vae, device, dtype), _schedule_from_settings(settings),
                              prediction_type or settings.get("prediction_type", "epsilon"))


def _read_checkpoint(path: Path) -> Dict[str, torch.Tensor]:
    from ..checkpoints import CheckpointError, load_safetensors, load_torch_weights, sniff_format

    fmt = sniff_format(path)
    if fmt == "safetensors":
        return load_safetensors(path)[0]
    if fmt in ("torch_zip", "torch_legacy"):
        obj = load_torch_weights(path)
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if isinstance(obj, dict):
            return obj
    raise CheckpointError(path, f"found {fmt}: expected an SD checkpoint (.safetensors or a weights-only .ckpt)")


def _config_folder(config: PathLike) -> Path:
    folder = CONFIG_DIR / str(config) if str(config) in SHIPPED_CONFIGS else Path(config)
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no unet/config.json; give one of {SHIPPED_CONFIGS} or a local diffusers "
                                "folder (configs are enough)")
    return folder


def _text_encoder_from_ldm(checkpoint: Dict[str, torch.Tensor], folder: Path, source: Path):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    if any(k.startswith("cond_stage_model.transformer.") for k in checkpoint):
        state = convert_ldm_clip_checkpoint(checkpoint)          # SD 1.x: OpenAI CLIP in HF layout
    elif any(k.startswith("cond_stage_model.model.") for k in checkpoint):
        state = convert_open_clip_checkpoint(model, checkpoint)  # SD 2.x: OpenCLIP, penultimate layer kept
    else:
        return None
    expected = model.state_dict()
    if not any(k.startswith("text_model.") for k in expected):  # transformers 5 flattened the module tree
        state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{source}: text encoder weights missing for {missing[:3]} (config {folder / 'text_encoder'})")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: text encoder {key} has shape {tuple(value.shape)}, the config expects "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    embeddings = getattr(model, "text_model", model).embeddings
    if embeddings.position_ids.is_meta:
        embeddings.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                                   persistent=False)
    return model


def load_single_file(checkpoint: PathLike, config: PathLike = "sd15", device="cpu",
                     dtype: torch.dtype = torch.float32, prediction_type: Optional[str] = None,
                     tokenizer_folder: Optional[PathLike] = None) -> DiffusersSDBackend:
    """A single-file SD checkpoint in the original LDM layout, converted by diffusers' ``from_single_file``
    with a local config folder: "sd15", "sd21" (768-v), "sd21-base" or a diffusers folder. Components
    absent from the file (e.g. a UNet-only file) are left out. Nothing is downloaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(checkpoint)
    folder = _config_folder(config)
    state = _read_checkpoint(path)
    local = dict(config=str(folder), local_files_only=True, torch_dtype=dtype)
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise ValueError(f"{path}: no model.diffusion_model.* keys; not an LDM Stable Diffusion checkpoint")
    unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **local)
    vae = None
    if any(k.startswith("first_stage_model.") for k in state) and (folder / "vae").is_dir():
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **local)
    text_encoder = _text_encoder_from_ldm(state, folder, path) if (folder / "text_encoder").is_dir() else None
    tokenizer = None
    tokenizer_folder = Path(tokenizer_folder) if tokenizer_folder else folder / "tokenizer"
    if tokenizer_folder.is_dir():
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    del state
    settings = _scheduler_settings(folder)
    return DiffusersSDBackend(_frozen(unet, device, dtype), _frozen(text_encoder, device, dtype), tokenizer,
                              _frozen(vae, device, dtype), _schedule_from_settings(settings),
                              prediction_type or settings.get("prediction_type", "epsilon"))
