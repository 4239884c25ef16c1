"""GeNVS (unofficial, ``jfozard/genvs_unofficial``): 3D-aware diffusion conditioned on a feature render.

Each source image is lifted by a DeepLabV3+ network (``encoder``) into a camera-frustum feature volume;
a small NeRF averaged over source views renders a 16-channel feature image at the target camera
(``nerf``); a k-diffusion ``image_v1`` denoiser conditioned on that render samples the novel view
(``denoiser``, ``sampler``). Long orbits are generated autoregressively (``orbit``). Cameras convert
from ``NVS_CAMERA`` in ``cameras``; weights load from ``genvs.pt`` or our format in ``loading``.

Documented differences from the published scripts, each behind a named option:
- sampling runs in eval mode by default; ``published_train_mode=True`` reproduces the scripts, which
  never leave train mode (random importance samples, denoiser dropout 0.05 active);
- the renderer evaluates the field once per coarse and once per fine sample and reuses those values
  for the final composite (the original evaluates all 128 samples a third time; same values);
- rendering is chunked over rays and the autoregressive orbit caches encoder volumes instead of
  re-encoding every conditioning view at every step; neither changes a result.
"""
from .config import GeNVSConfig, full_config, tiny_config
from .model import GeNVS, build_genvs

__all__ = ["GeNVSConfig", "full_config", "tiny_config", "GeNVS", "build_genvs"]
