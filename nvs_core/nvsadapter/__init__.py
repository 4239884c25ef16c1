"""NVS-Adapter (kakaobrain/nvs-adapter, "Plug-and-Play Novel View Synthesis from a Single Image"), from scratch.

SD 2.1 base stays frozen (the user's own model, through the SD backend interface); the adapter adds, in every
transformer block after self-attention, a learnable-query composer, cross-view attention to the reference view
and attention to the CLIP ViT-H image embedding, with Plücker-ray embeddings of the relative cameras.

- ``config``: the adapter's shape for any SD UNet layout (``SD21_BASE`` = the released ``base_query_4``);
- ``model``: the adapter modules (published state-dict keys) and the per-block computation;
- ``cameras``: the published camera chain (focal quirk, double flips, relative poses), rays on the latent grid,
  the 144-channel embedding, and the conversion from ``NVS_CAMERA``;
- ``network``: the batch builder ([reference rows, query rows], per-row timesteps, in-model CFG rows) and one
  evaluation through ``SDBackend.unet`` with the after-self-attention patch;
- ``sampler``: the published 50-step Euler with in-model CFG;
- ``pipeline``: reference preprocessing (white background, CLIP image embedding) and views in groups;
- ``loading``: the Lightning checkpoint (adapter tensors only, EMA by default) and the ``nvsadapter`` converter.

Published quirks reproduced (see each module): reference features doubled in every block's image-attention step;
focal W / (2 tan(fov)); two rotation flips; reference row at t = 0 and unscaled (uncond: N(0, 1) at t = 999,
rays 0, image embedding 0); sin(x + pi/2) for the "cos" channels; sigma table square root in float32.
"""
from .cameras import rays_context_for_cameras, rays_context_spherical
from .config import SD21_BASE, AdapterLayer, NVSAdapterConfig
from .loading import convert_nvs_adapter, extract_adapter, load_nvs_adapter
from .model import AdapterBlock, NVSAdapter
from .pipeline import clip_image_embedding, generate_views, prepare_reference
from .network import AdapterBatch, AdapterHook, adapter_eps, adapter_forward, build_batch
from .sampler import denoiser_sigmas, euler_cfg, sample, sampling_schedule

__all__ = [
    "NVSAdapterConfig", "AdapterLayer", "SD21_BASE", "NVSAdapter", "AdapterBlock", "rays_context_for_cameras",
    "rays_context_spherical", "AdapterBatch", "AdapterHook", "build_batch", "adapter_eps", "adapter_forward",
    "sample", "euler_cfg", "sampling_schedule", "denoiser_sigmas", "load_nvs_adapter", "extract_adapter",
    "convert_nvs_adapter", "generate_views", "prepare_reference", "clip_image_embedding",
]
