"""The GeNVS model (``NerfDiffDLV3``): ``input_unet`` (image -> frustum volume), ``nerf`` (field + renderer)
and ``ddpm_pipeline`` (the preconditioned ``image_v1`` denoiser), built from a :class:`GeNVSConfig`."""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import nn

from .config import GeNVSConfig
from .denoiser import build_denoiser
from .encoder import InputUNet, preprocess
from .nerf import (DEFAULT_RENDER_MEMORY_MB, NeRFField, RenderDraws, SourceViews, render_views,
                   upsample_condition)


class GeNVS(nn.Module):
    def __init__(self, config: Optional[GeNVSConfig] = None):
        super().__init__()
        self.config = cfg = config if config is not None else GeNVSConfig()
        self.input_unet = InputUNet(cfg.encoder.layers, cfg.decoder.channels, cfg.decoder.atrous_rates,
                                    cfg.encoder.in_channels)
        n = cfg.nerf
        self.nerf = NeRFField(cfg.resolution_z, n.sigma_color_rank, n.color_feat_dim, n.hidden_dim, n.num_layers,
                              n.bound, n.min_near)
        self.ddpm_pipeline = build_denoiser(cfg.denoiser)

    # ---------------------------------------------------------------- stages
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """Source images (..., 3, H, W) in [0, 1] -> volumes (..., C*D, H, W) (same leading dims)."""
        lead = images01.shape[:-3]
        x = images01.reshape(-1, *images01.shape[-3:])
        p = next(self.input_unet.parameters())
        vol = self.input_unet(preprocess(x.to(device=p.device, dtype=p.dtype)))
        return vol.reshape(*lead, *vol.shape[1:])

    def render(self, src: SourceViews, tgt_poses: torch.Tensor, intrinsics: torch.Tensor,
               size: Optional[int] = None, draws: Optional[RenderDraws] = None, random_importance: bool = False,
               generator: Optional[torch.Generator] = None, memory_mb: float = DEFAULT_RENDER_MEMORY_MB, check=None):
        """Features (B,Q,F,S,S), depth and opacity (B,Q,1,S,S) at ``size`` (default: the render size)."""
        size = size or self.config.render_size
        n = self.config.nerf
        return render_views(self.nerf, tgt_poses, intrinsics, src, size, size, draws, random_importance, generator,
                            memory_mb, n.num_steps, n.upsample_steps, check)

    @staticmethod
    def condition(features: torch.Tensor) -> torch.Tensor:
        """The denoiser's condition: the render nearest-upsampled x2, (N, F, 2S, 2S)."""
        return upsample_condition(features)

    @contextlib.contextmanager
    def mode(self, published_train_mode: bool = False):
        """Eval mode (default) or the published sampling path's train mode, restored afterwards."""
        was = [(m, m.training) for m in self.modules()]
        self.train(published_train_mode)
        try:
            yield self
        finally:
            for m, training in was:
                m.training = training


def build_genvs(config: Union[GeNVSConfig, dict, None] = None, device: Union[str, torch.device, None] = None,
                dtype: Optional[torch.dtype] = None) -> GeNVS:
    """A GeNVS model in eval mode; ``device='meta'`` builds the structure without allocating."""
    if isinstance(config, dict):
        config = GeNVSConfig.from_dict(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = GeNVS(config)
    model.train(False).requires_grad_(False)
    return model.to(dtype) if dtype is not None else model
