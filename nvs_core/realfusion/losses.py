"""RealFusion's losses and small training helpers (``nerf/trainer.py``, ``sd/sd.py``), pure functions.

Loss table (published defaults; golden case f):

| term | formula | weight |
|---|---|---|
| input-view RGB | ``MSE(pred * alpha, gt * alpha)`` over the sampled input-view rays | 5.0 |
| input-view mask | ``MSE(weights_sum, alpha)`` | 0.5 |
| entropy | ``mean(-a log2 a - (1 - a) log2(1 - a))``, ``a = clamp(ws, 1e-5, 1 - 1e-5)`` | 1e-4 |
| orientation | ``mean(stopgrad(1 - exp(-sigma)) * max(n . d, 0)^2)`` over samples (renderer) | 1e-2 |
| 2-D normal smoothness | ``MSE(N, stopgrad(gaussian_blur(N, 9)))``, sigma 1.7, reflect padding | 0.5 |
| opacity, 3-D smoothness | ``mean(ws^2)``, ``mean |n - n(x + 0.01 eps)|`` | 0, 0 |

The SDS step (``sds_latent_gradient``) is the closed form ``lambda (1 - alpha_bar_t) (eps_hat - eps)`` with
``eps_hat = eps_u + s (eps_c - eps_u)`` and ``nan_to_num`` (NaN -> 0, +-inf -> +-float32 max).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

AnnealedValue = Union[float, Sequence]


# ------------------------------------------------------------------------------ regularisers

def entropy_loss(weights_sum: torch.Tensor) -> torch.Tensor:
    a = weights_sum.clamp(1e-5, 1 - 1e-5)
    return (-a * torch.log2(a) - (1 - a) * torch.log2(1 - a)).mean()


def opacity_loss(weights_sum: torch.Tensor) -> torch.Tensor:
    return (weights_sum ** 2).mean()


def orientation_loss(sigmas: torch.Tensor, normals: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Per-sample orientation penalty, averaged over every row (padding rows included, as published)."""
    weights = 1 - torch.exp(-sigmas)
    return (weights.detach() * (normals * dirs).sum(-1).clamp(min=0) ** 2).mean()


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def default_blur_sigma(kernel_size: int) -> float:
    """torchvision's default sigma for a kernel size: 0.3 ((k - 1) / 2 - 1) + 0.8 (1.7 for 9)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(img: torch.Tensor, kernel_size: int = 9, sigma: Optional[float] = None) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] as torchvision's ``gaussian_blur`` (2-D kernel, reflect padding)."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    sigma = default_blur_sigma(kernel_size) if sigma is None else sigma
    k1 = gaussian_kernel1d(kernel_size, sigma, img.dtype, img.device)
    k2 = torch.mm(k1[:, None], k1[None, :])
    channels = img.shape[1]
    weight = k2.expand(channels, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    x = F.pad(img, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(x, weight, groups=channels)


def smooth_2d_loss(normals_image: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """``MSE(N, stopgrad(blur(N)))`` for a composited normal image [B, 3, H, W]."""
    return F.mse_loss(normals_image, gaussian_blur(normals_image, kernel_size).detach())


@dataclass
class LossWeights:
    """Published default weights (``nerf/options.py``)."""

    image: float = 5.0
    mask: float = 0.5
    prior: float = 1.0
    entropy: float = 1e-4
    orient: float = 1e-2
    smooth_2d: float = 0.5
    opacity: float = 0.0
    smooth: float = 0.0


def synthetic_view_losses(weights_sum: torch.Tensor, normals: Optional[torch.Tensor],
                          loss_orient: Optional[torch.Tensor], loss_smooth: Optional[torch.Tensor],
                          B: int, H: int, W: int, weights: LossWeights = LossWeights()) -> Dict[str, torch.Tensor]:
    """The weighted regularisers of a synthetic (SDS) view; zero-weight terms are left out."""
    pred_ws = weights_sum.reshape(B, 1, H, W)
    out = {}
    if weights.opacity > 0:
        out["opacity"] = weights.opacity * opacity_loss(pred_ws)
    if weights.entropy > 0:
        out["entropy"] = weights.entropy * entropy_loss(pred_ws)
    if weights.orient > 0 and loss_orient is not None:
        out["orient"] = weights.orient * loss_orient
    if weights.smooth > 0 and loss_smooth is not None:
        out["smooth"] = weights.smooth * loss_smooth
    if weights.smooth_2d > 0 and normals is not None:
        n = normals.reshape(B, H, W, 3).permute(0, 3, 1, 2).contiguous()
        out["smooth_2d"] = weights.smooth_2d * smooth_2d_loss(n)
    return out


def input_view_losses(pred_rgb: torch.Tensor, weights_sum: torch.Tensor, gt_rgba: torch.Tensor,
                      weights: LossWeights = LossWeights()) -> Dict[str, torch.Tensor]:
    """Input-view reconstruction: ``image * MSE(rgb * a, gt * a)`` and ``mask * MSE(ws, a)``.

    ``pred_rgb`` [B, N, 3] (composited on the background), ``weights_sum`` [B, N], ``gt_rgba`` [B, N, 4]
    not premultiplied.
    """
    gt_rgb, gt_alpha = gt_rgba[..., :3], gt_rgba[..., 3:]
    B, N = pred_rgb.shape[:2]
    out = {}
    if weights.image > 0:
        out["real_image"] = weights.image * F.mse_loss(pred_rgb * gt_alpha, gt_rgb * gt_alpha)
    if weights.mask > 0:
        out["real_mask"] = weights.mask * F.mse_loss(weights_sum.reshape(B, N, 1), gt_alpha)
    return out


# ------------------------------------------------------------------------------ schedules

def annealed_value(value: AnnealedValue, global_step: int, iters: int, published: bool = True) -> float:
    """``Trainer.val``: ``[v]`` constant; ``[a, b]`` linear over ``iters``; ``[a, b, end, 'linear'|'log']``.

    Published quirk (``published=True``): the 4-entry form ignores the step; its fraction is
    ``min(end / iters, 1)``, so the value is constant. ``published=False`` uses ``min(step / end, 1)``.
    """
    if isinstance(value, (int, float)):
        return float(value)
    value = list(value)
    if len(value) == 1:
        return float(value[0])
    if len(value) == 2:
        start, end = value
        fraction, fn = min(global_step / iters, 1), "linear"
    elif len(value) == 4:
        start, end, end_iters, fn = value
        fraction = min(end_iters / iters, 1) if published else min(global_step / end_iters, 1)
    else:
        raise ValueError(f"an annealed value has 1, 2 or 4 entries, got {value!r}")
    if fn == "linear":
        return fraction * end + (1 - fraction) * start
    if fn == "log":
        return end ** fraction * start ** (1 - fraction)
    raise ValueError(f"annealing function must be 'linear' or 'log', got {fn!r}")


class EMA:
    """``torch_ema.ExponentialMovingAverage`` with ``use_num_updates``: decay_i = min(d, (1 + i) / (10 + i))."""

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float = 0.95):
        self.parameters = [p for p in parameters]
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in self.parameters]
        self.backup: Optional[List[torch.Tensor]] = None

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, self.parameters):
            s.sub_((s - p) * (1.0 - decay))

    @torch.no_grad()
    def copy_to(self) -> None:
        self.backup = [p.detach().clone() for p in self.parameters]
        for s, p in zip(self.shadow, self.parameters):
            p.copy_(s)

    @torch.no_grad()
    def restore(self) -> None:
        if self.backup is None:
            raise ValueError("EMA.restore() without a previous copy_to()")
        for b, p in zip(self.backup, self.parameters):
            p.copy_(b)
        self.backup = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


# ------------------------------------------------------------------------------ SDS (closed form)

SDS_T_RANGE = (20, 980)  # t ~ randint(20, 981): int(1000 * 0.02) .. int(1000 * 0.98)
SD_LATENT_SCALE = 0.18215


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000,
                                 dtype=torch.float32) -> torch.Tensor:
    """SD-1.5's ``scaled_linear`` schedule: cumprod(1 - linspace(sqrt b0, sqrt b1, n)^2), float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=dtype) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor):
    a = alphas_cumprod.to(latents.device)[t].flatten()
    while a.ndim < latents.ndim:
        a = a.unsqueeze(-1)
    return a ** 0.5 * latents + (1 - a) ** 0.5 * noise


def sds_latent_gradient(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, noise: torch.Tensor,
                        alphas_cumprod: torch.Tensor, t: torch.Tensor, guidance_scale: float = 100.0,
                        lambda_grad: float = 1.0) -> torch.Tensor:
    """The SDS gradient injected at the latents (``latents.backward(gradient=grad)``)."""
    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    w = 1 - alphas_cumprod.to(eps.device)[t]
    return torch.nan_to_num(lambda_grad * w * (eps - noise))


# ------------------------------------------------------------------------------ per-step choices

def shading_for_step(global_step: int, random_u: Optional[float], albedo_iters: int = 1000):
    """(shading, ambient_ratio) of a synthetic step: albedo before ``albedo_iters``; then by one uniform
    draw u: u > 0.8 albedo (1.0), u > 0.4 textureless (0.1), else lambertian (0.1)."""
    if global_step < albedo_iters:
        return "albedo", 1.0
    if random_u > 0.8:
        return "albedo", 1.0
    if random_u > 0.4:
        return "textureless", 0.1
    return "lambertian", 0.1


def replaces_camera(global_step: int, every: int = 10) -> bool:
    """Published quirk: ``global_step % every`` is truthy on 9 steps of 10, when the synthetic view keeps
    its random rays (plus 0.02 noise) but uses the front-view prompt."""
    return bool(every > 0 and global_step % every)
