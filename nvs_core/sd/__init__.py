"""Stable Diffusion 1.x/2.x backends: one interface for methods that steer an SD UNet (ARCHITECTURE.md section 2).

- ``interface``: layer indices 0..15, chunk labels, the noise schedule (sigma <-> timestep), the patch
  protocols (cross-attention contexts, after-self-attention hook) and the abstract ``SDBackend``;
- ``diffusers_backend``: the diffusers adapter and loaders (diffusers folders, single-file checkpoints
  with the local configs in ``configs/``); it imports diffusers/transformers lazily.
The ComfyUI adapter lives in ``nodes/sd_comfy.py`` (nvs_core never imports ComfyUI).
"""
from .interface import (COND, DIFFUSERS_ATTENTIONS, LAYER_NAMES, LDM_BLOCKS, NUM_LAYERS, PREDICTION_TYPES, UNCOND,
                        AfterSelfAttention, BlockCall, CrossAttentionContexts, LayerCall, NoiseSchedule, SDBackend,
                        UNetCallWrapper, UNetPatches, override_cross_attention_context, prepared, shared_timestep)

__all__ = [
    "COND", "UNCOND", "NUM_LAYERS", "LAYER_NAMES", "LDM_BLOCKS", "DIFFUSERS_ATTENTIONS", "PREDICTION_TYPES",
    "LayerCall", "BlockCall", "CrossAttentionContexts", "AfterSelfAttention", "UNetPatches", "NoiseSchedule",
    "SDBackend", "UNetCallWrapper", "override_cross_attention_context", "prepared", "shared_timestep",
]
