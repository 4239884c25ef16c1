"""EDM preconditioning around the VIVID denoiser (``NVPrecond``), sigma_data = 0.5.

D(dst; sigma) = c_skip dst + c_out F(c_in dst, c_noise, features(src), geometry), with
  c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2),    c_noise = ln(sigma) / 4.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .geometry import LABEL_DIM, label_statistics
from .layers import MPConv, MPFourier
from .networks import SRXAttnUNet, UNetEncoder, XAttnUNet


class NVPrecond(nn.Module):
    """The VIVID network as published: source-view ``encoder`` + ``unet`` denoiser + log-variance head.

    Constructed from the ``_init_kwargs`` stored with a checkpoint. ``uncond=True`` (the guidance
    net) has no encoder: its label is multiplied by 0 and its cross-attention sees zero features.
    ``super_res=True`` is the 64 -> 256 net, conditioned on an upsampled low-res image plus
    ``noisy_sr`` times fresh noise.

    ``label_standardization`` (ours, absent from the published kwargs): {"mean": [...], "std": [...]}
    of the raw label entries at ``img_resolution`` for nets trained on data unlike RealEstate10K.
    Callers always pass labels standardised with the published statistics; such a net maps them
    back to raw values and re-standardises them with its own (entries with std 0 become 0).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, super_res: bool = False,
                 no_time_enc: Optional[bool] = None, depth_input: bool = False, warp_depth_coor: bool = False,
                 uncond: Optional[bool] = None, noisy_sr: Optional[float] = 0.25,
                 label_standardization: Optional[dict] = None, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.super_res = super_res
        self.no_time_enc = no_time_enc
        self.depth_input = depth_input
        self.warp_depth_coor = warp_depth_coor
        self.uncond = uncond
        self.noisy_sr = noisy_sr
        self.label_standardization = self._check_standardization(label_standardization, label_dim)
        # Warped depth coordinates add logvar_channels Fourier channels to both inputs.
        extra_channels = logvar_channels * int(warp_depth_coor)
        self.encoder = None if uncond else UNetEncoder(
            img_resolution=img_resolution, img_channels=img_channels + int(depth_input) + extra_channels,
            label_dim=label_dim, **unet_kwargs)
        unet_class = SRXAttnUNet if super_res else XAttnUNet
        self.unet = unet_class(img_resolution=img_resolution, img_channels=img_channels + extra_channels,
                               label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def compute_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """float16 only for use_fp16 nets on CUDA (weights are still normalised in float32)."""
        return torch.float16 if (self.use_fp16 and not force_fp32 and device.type == "cuda") else torch.float32

    @staticmethod
    def _check_standardization(values: Optional[dict], label_dim: int) -> Optional[dict]:
        if values is None:
            return None
        mean, std = values.get("mean"), values.get("std")
        if label_dim != LABEL_DIM:
            raise ValueError(f"label_standardization applies to the {LABEL_DIM}-d VIVID camera label, "
                             f"not label_dim {label_dim}")
        if mean is None or std is None or len(mean) != label_dim or len(std) != label_dim or min(std) < 0:
            raise ValueError(f"label_standardization needs 'mean' and 'std' lists of {label_dim} values "
                             f"(std >= 0), got {values}")
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}

    def restandardize(self, geometry: torch.Tensor) -> torch.Tensor:
        """Labels standardised with the published statistics -> this net's own (identity without them)."""
        if self.label_standardization is None:
            return geometry
        pub_mean, pub_std = label_statistics(self.img_resolution, geometry.dtype, geometry.device)
        raw = geometry * pub_std + pub_mean
        mean = torch.tensor(self.label_standardization["mean"], dtype=geometry.dtype, device=geometry.device)
        std = torch.tensor(self.label_standardization["std"], dtype=geometry.dtype, device=geometry.device)
        return torch.where(std > 0, (raw - mean) / std.clamp(min=1e-12), torch.zeros_like(raw))

    def _label(self, geometry: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
        if self.label_dim == 0:
            return None
        if geometry is None:
            geometry = torch.zeros([1, self.label_dim], device=device)
        else:
            geometry = self.restandardize(geometry.to(torch.float32).reshape(-1, self.label_dim))
        return geometry * int(not self.uncond)

    def zero_features(self, batch: int, dtype: torch.dtype, device: torch.device) -> List[torch.Tensor]:
        """What the unconditional net attends to instead of encoder features."""
        return [torch.zeros(batch, block.out_channels, block.resolution, block.resolution, dtype=dtype, device=device)
                for block in self.unet.cross_attention_blocks()]

    def source_features(self, src: torch.Tensor, c_noise: torch.Tensor, geometry: Optional[torch.Tensor],
                        dtype: torch.dtype = torch.float32, batch: Optional[int] = None) -> List[torch.Tensor]:
        """One feature map per XAttnBlock: encoder outputs for the clean source (zeros if uncond).

        ``geometry`` is the label as the net sees it (see ``forward``); the encoder shares the
        denoiser's c_noise = ln(sigma)/4 unless ``no_time_enc``.
        """
        if self.encoder is None:
            return self.zero_features(src.shape[0] if batch is None else batch, dtype, src.device)
        return self.encoder(src.to(dtype), c_noise * int(not self.no_time_enc), geometry)

    def forward(self, src: torch.Tensor, dst: torch.Tensor, sigma: torch.Tensor,
                geometry: Optional[torch.Tensor] = None, conditioning_image: Optional[torch.Tensor] = None, *,
                conditioning_noise: Optional[torch.Tensor] = None, features: Optional[Sequence[torch.Tensor]] = None,
                force_fp32: bool = False, return_logvar: bool = False, return_features: bool = False):
        """Denoised estimate of the target view.

        src: clean source view (N, C, H, W) in [-1, 1]; dst: noisy target; sigma: (N,) or 0-d;
        geometry: (N, 20) standardised label (None = zeros). SR nets need ``conditioning_image``;
        its noise is ``conditioning_noise`` if given, else drawn from the global RNG as the
        original does. ``features`` reuses precomputed encoder outputs.
        """
        if self.warp_depth_coor:
            raise ValueError("this VIVID network expects warped depth coordinates (warp_depth_coor), which ComfyUI-NVS "
                             "does not support (no published VIVID model uses them)")
        x = dst.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        geometry = self._label(geometry, x.device)
        dtype = self.compute_dtype(x.device, force_fp32)

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        x_in = (c_in * x).to(dtype)
        if self.super_res:
            if conditioning_image is None:
                raise ValueError("a super-resolution VIVID net needs conditioning_image (the upsampled low-res view)")
            if conditioning_noise is None:
                conditioning_noise = torch.randn_like(conditioning_image)
            conditioning_image = conditioning_image + self.noisy_sr * conditioning_noise
            x_in = torch.cat([x_in, conditioning_image], dim=1)

        if features is not None:
            features = list(features)
        else:
            features = self.source_features(src, c_noise, geometry, dtype=x_in.dtype, batch=x_in.shape[0])
        if return_features:
            return features

        F_x = self.unet(x_in, features, c_noise, geometry)
        D_x = c_skip * dst + c_out * F_x.to(torch.float32)
        if return_logvar:
            # Learned log-variance u(sigma) (EDM2 Eq. 21); used only by the training loss.
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x
