"""Magnitude-preserving (MP) building blocks of EDM2 (Karras et al. 2024), as VIVID uses them.

Every op keeps unit expected magnitude of activations; the weights are normalised at every call,
so stored weights need not be unit-norm. Equation numbers refer to the EDM2 paper.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F


def normalize(x: torch.Tensor, dim: Optional[Union[int, Sequence[int]]] = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(M)), M = number of elements reduced over (default: all but dim 0).

    The norm is taken in float32 and eps is added to the *scaled* norm.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    rms_scale = math.sqrt(norm.numel() / x.numel())  # 1 / sqrt(M)
    norm = torch.add(eps, norm, alpha=rms_scale)
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """'down': 2x2 box average with stride 2; 'up': nearest-neighbour x2; 'keep': identity."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    raise ValueError(f"unknown resample mode {mode!r}")


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1-t) a + t b) / sqrt((1-t)^2 + t^2)  (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Channel concat [a * C(1-t)/sqrt(Na), b * C t/sqrt(Nb)], C = sqrt((Na+Nb)/((1-t)^2+t^2))  (Eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    weight_a = c / math.sqrt(n_a) * (1 - t)
    weight_b = c / math.sqrt(n_b) * t
    return torch.cat([weight_a * a, weight_b * b], dim=dim)


class MPFourier(nn.Module):
    """y = sqrt(2) cos(x (x) freqs + phases)  (Eq. 75), computed in float32.

    ``freqs`` (2 pi randn) and ``phases`` (2 pi rand) are random buffers saved with the network:
    load them, never regenerate them.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * math.sqrt(2)
        return y.to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [kh, kw]) or fully connected layer (kernel []), no bias.

    W_eff = normalize(W) * gain / sqrt(fan_in)  (Eq. 47), computed in float32 at every call, then cast
    to the input dtype. A 0-d float16 ``gain`` makes ``gain / sqrt(fan_in)`` round to float16, as the
    original does when it runs a float16 checkpoint unconverted on the CPU.

    In training mode the stored weight is first replaced by normalize(W) (forced weight
    normalisation, Eq. 66): it keeps every output channel at unit magnitude so that Adam's
    steps stay a fixed fraction of the weight. Outputs stay the same up to normalize's eps
    (about 1e-4 relative): W_eff depends only on the direction of each row.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: Union[float, torch.Tensor] = 1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        fan_in = w[0].numel()
        w = w * (gain / math.sqrt(fan_in))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)
