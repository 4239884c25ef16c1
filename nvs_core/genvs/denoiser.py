"""The GeNVS denoiser: k-diffusion's ``image_v1`` U-Net (commit cd94d86 of the unofficial GeNVS) behind
``DenoiserWithVariance(KarrasAugmentWrapper(.))``, written from its documented semantics.

Parameter names follow the checkpoint: ``ddpm_pipeline.inner_model.inner_model.*``. The published file
stores the same tensors a second time under ``ddpm_pipeline.model.inner_model.inner_model.*``; here the
preconditioner *is* ``ddpm_pipeline`` so every tensor has one name (the loader collapses the copy).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class AdaGN(nn.Module):
    """Group norm without affine, modulated by (w + 1, b) from a linear map of the mapping output."""

    def __init__(self, feats_in: int, channels: int, num_groups: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.mapper = nn.Linear(feats_in, channels * 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        weight, bias = self.mapper(cond).chunk(2, dim=-1)
        x = F.group_norm(x, self.num_groups, eps=self.eps)
        return torch.addcmul(bias[:, :, None, None], x, weight[:, :, None, None] + 1)


class ResConvBlock(nn.Module):
    """AdaGN -> GELU -> conv3x3 -> dropout2d -> AdaGN -> GELU -> conv3x3 -> dropout2d, plus a skip."""

    def __init__(self, feats_in: int, c_in: int, c_mid: int, c_out: int, group_size: int = 32,
                 dropout_rate: float = 0.0):
        super().__init__()
        # Indices match the published Sequential: 0 AdaGN, 1 GELU, 2 conv, 3 dropout, 4 AdaGN, ...
        self.main = nn.ModuleList([
            AdaGN(feats_in, c_in, max(1, c_in // group_size)), nn.GELU(), nn.Conv2d(c_in, c_mid, 3, padding=1),
            nn.Dropout2d(dropout_rate),
            AdaGN(feats_in, c_mid, max(1, c_mid // group_size)), nn.GELU(), nn.Conv2d(c_mid, c_out, 3, padding=1),
            nn.Dropout2d(dropout_rate)])
        self.skip = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.main:
            h = layer(h, cond) if isinstance(layer, AdaGN) else layer(h)
        return h + (x if self.skip is None else self.skip(x))


class SelfAttention2d(nn.Module):
    """Multi-head self-attention; the qkv projection's channels are [q | k | v], each head-major."""

    def __init__(self, channels: int, n_head: int, feats_in: int, num_groups: int, dropout_rate: float = 0.0):
        super().__init__()
        if channels % n_head:
            raise ValueError(f"attention channels {channels} not divisible by {n_head} heads")
        self.norm_in = AdaGN(feats_in, channels, num_groups)
        self.n_head = n_head
        self.qkv_proj = nn.Conv2d(channels, channels * 3, 1)
        self.out_proj = nn.Conv2d(channels, channels, 1)
        self.dropout_rate = dropout_rate

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv_proj(self.norm_in(x, cond))
        qkv = qkv.view(n, 3, self.n_head, c // self.n_head, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(1)
        p = self.dropout_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return x + self.out_proj(y.transpose(-1, -2).reshape(n, c, h, w))


class Downsample2d(nn.Module):
    """Reflect pad 1, depthwise 4x4 kernel outer([1,3,3,1]/8), stride 2."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([[1 / 8, 3 / 8, 3 / 8, 1 / 8]])
        self.register_buffer("kernel", k.T @ k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (1, 1, 1, 1), "reflect")
        return F.conv2d(x, self.kernel.to(x).expand(c, 1, 4, 4), stride=2, groups=c)


class Upsample2d(nn.Module):
    """Reflect pad 1, depthwise transposed conv with kernel outer([1,3,3,1]/4), stride 2, padding 3."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([[1 / 8, 3 / 8, 3 / 8, 1 / 8]]) * 2
        self.register_buffer("kernel", k.T @ k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (1, 1, 1, 1), "reflect")
        return F.conv_transpose2d(x, self.kernel.to(x).expand(c, 1, 4, 4), stride=2, padding=3, groups=c)


class _Stage(nn.ModuleList):
    def run(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, cond) if isinstance(layer, (ResConvBlock, SelfAttention2d)) else layer(x)
        return x


def _stage_layers(n_layers, feats_in, c_in, c_mid, c_out, group_size, head_size, dropout_rate, self_attn):
    layers = []
    for i in range(n_layers):
        my_in = c_in if i == 0 else c_mid
        my_out = c_mid if i < n_layers - 1 else c_out
        layers.append(ResConvBlock(feats_in, my_in, c_mid, my_out, group_size, dropout_rate))
        if self_attn:
            layers.append(SelfAttention2d(my_out, max(1, my_out // head_size), feats_in,
                                          max(1, my_out // group_size), dropout_rate))
    return layers


class UNet(nn.Module):
    def __init__(self, d_blocks: Sequence[_Stage], u_blocks: Sequence[_Stage]):
        super().__init__()
        self.d_blocks = nn.ModuleList(d_blocks)
        self.u_blocks = nn.ModuleList(u_blocks)  # deepest stage first

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.d_blocks:
            x = block.run(x, cond)
            skips.append(x)
        for i, (block, skip) in enumerate(zip(self.u_blocks, reversed(skips))):
            x = block.run(x if i == 0 else torch.cat([x, skip], dim=1), cond)
        return x


class FourierFeatures(nn.Module):
    def __init__(self, out_features: int):
        super().__init__()
        # A random buffer in the published model: always loaded from the checkpoint, never regenerated.
        self.register_buffer("weight", torch.randn(out_features // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class ImageDenoiserModelV1(nn.Module):
    def __init__(self, c_in: int, feats_in: int, depths: Sequence[int], channels: Sequence[int],
                 self_attn_depths: Sequence[bool], mapping_cond_dim: int = 0, unet_cond_dim: int = 0,
                 dropout_rate: float = 0.0, has_variance: bool = False, group_size: int = 32, head_size: int = 64):
        super().__init__()
        self.c_in, self.has_variance, self.unet_cond_dim = c_in, has_variance, unet_cond_dim
        self.timestep_embed = FourierFeatures(feats_in)
        self.mapping_cond = nn.Linear(mapping_cond_dim, feats_in, bias=False) if mapping_cond_dim > 0 else None
        self.mapping = nn.Sequential(nn.Linear(feats_in, feats_in), nn.GELU(), nn.Linear(feats_in, feats_in),
                                     nn.GELU())
        self.proj_in = nn.Conv2d(c_in + unet_cond_dim, channels[0], 1)
        self.proj_out = nn.Conv2d(channels[0], c_in + (1 if has_variance else 0), 1)
        d_blocks, u_blocks = [], []
        for i, depth in enumerate(depths):
            layers = [Downsample2d() if i > 0 else nn.Identity()]
            layers += _stage_layers(depth, feats_in, channels[max(0, i - 1)], channels[i], channels[i], group_size,
                                    head_size, dropout_rate, self_attn_depths[i])
            d_blocks.append(_Stage(layers))
        for i, depth in enumerate(depths):
            c_up_in = channels[i] * 2 if i < len(depths) - 1 else channels[i]
            layers = _stage_layers(depth, feats_in, c_up_in, channels[i], channels[max(0, i - 1)], group_size,
                                   head_size, dropout_rate, self_attn_depths[i])
            layers.append(Upsample2d() if i > 0 else nn.Identity())
            u_blocks.append(_Stage(layers))
        self.u_net = UNet(d_blocks, list(reversed(u_blocks)))

    def mapping_output(self, sigma: torch.Tensor, mapping_cond: Optional[torch.Tensor] = None,
                       details: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        timestep_embed = self.timestep_embed((sigma.log() / 4)[:, None])
        if mapping_cond is None or self.mapping_cond is None:
            cond_embed = torch.zeros_like(timestep_embed)
        else:
            cond_embed = self.mapping_cond(mapping_cond)
        out = self.mapping(timestep_embed + cond_embed)
        if details is not None:
            details.update(timestep_embed=timestep_embed, mapping_out=out)
        return out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, mapping_cond: Optional[torch.Tensor] = None,
                unet_cond: Optional[torch.Tensor] = None, return_variance: bool = False,
                details: Optional[Dict[str, torch.Tensor]] = None):
        cond = self.mapping_output(sigma, mapping_cond, details)
        if unet_cond is not None:
            x = torch.cat([x, unet_cond.to(x.dtype)], dim=1)  # the render is concatenated unscaled
        out = self.proj_out(self.u_net(self.proj_in(x), cond))
        logvar = None
        if self.has_variance:
            out, logvar = out[:, :-1], out[:, -1].flatten(1).mean(1)
        return (out, logvar) if return_variance and self.has_variance else out


class KarrasAugmentWrapper(nn.Module):
    """Passes the 9-d augmentation conditioning (zeros at inference) as the mapping condition."""

    def __init__(self, model: ImageDenoiserModelV1):
        super().__init__()
        self.inner_model = model

    def forward(self, x, sigma, aug_cond: Optional[torch.Tensor] = None, mapping_cond=None, **kwargs):
        if aug_cond is None:
            aug_cond = x.new_zeros([x.shape[0], 9])
        mapping_cond = aug_cond if mapping_cond is None else torch.cat([aug_cond, mapping_cond], dim=1)
        return self.inner_model(x, sigma, mapping_cond=mapping_cond, **kwargs)


class DenoiserWithVariance(nn.Module):
    """Karras preconditioning around the wrapped network: D(x, s) = F(c_in x, s) c_out + x c_skip."""

    def __init__(self, inner_model: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.inner_model = inner_model
        self.sigma_data = sigma_data

    def get_scalings(self, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + sd ** 2) ** 0.5
        return c_skip, c_out, c_in

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        c_skip, c_out, c_in = [s[:, None, None, None] for s in self.get_scalings(sigma)]
        return self.inner_model(x * c_in, sigma, **kwargs) * c_out + x * c_skip

    def loss(self, x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        """Per-sample loss with the learned variance (the published training objective)."""
        c_skip, c_out, c_in = [s[:, None, None, None] for s in self.get_scalings(sigma)]
        noised = x + noise * sigma[:, None, None, None]
        out, logvar = self.inner_model(noised * c_in, sigma, return_variance=True, **kwargs)
        target = (x - c_skip * noised) / c_out
        logvar = logvar[:, None, None, None]
        return (((out - target) ** 2 / logvar.exp() + logvar) / 2).flatten(1).mean(1)


def build_denoiser(cfg) -> DenoiserWithVariance:
    """``ddpm_pipeline`` from a :class:`~nvs_core.genvs.config.DenoiserConfig`."""
    net = ImageDenoiserModelV1(cfg.input_channels, cfg.mapping_out, cfg.depths, cfg.channels, cfg.self_attn_depths,
                               mapping_cond_dim=cfg.mapping_cond_dim, unet_cond_dim=cfg.unet_cond_dim,
                               dropout_rate=cfg.dropout_rate, has_variance=cfg.has_variance,
                               group_size=cfg.group_size, head_size=cfg.head_size)
    return DenoiserWithVariance(KarrasAugmentWrapper(net), cfg.sigma_data)
