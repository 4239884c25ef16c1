"""The published NVS-Adapter sampler: 50-step Euler (sgm ``EulerEDMSampler``, s_churn 0) with in-model CFG.

Exactly as upstream (``LegacyDDPMDiscretization``, ``NVSAdapterDiscreteDenoiser`` + ``EpsScaling``,
``NVSAdapterCFG``; float32 unless stated):
- sigma table: beta = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (float64), abar = cumprod(1 - beta),
  sigma[t] = float32((1 - abar) / abar) ** 0.5 (square root taken in float32);
- steps: timesteps = int(linspace(999, 0, n, endpoint=False)) = 999, 979, ..., 19; sigmas = sigma[timesteps]
  followed by 0;
- x = noise * sqrt(1 + sigma_0^2);
- each step: the network batch is [x; x] with the first half unconditional (rays 0, image embedding 0,
  random reference at t 999) and the second conditional; sigma snaps to the nearest table entry (absolute
  distance), c_in = 1 / (sigma^2 + 1) ** 0.5, the network timestep is the table index, D = eps * (-sigma) + x,
  D_cfg = D_u + scale (D_c - D_u), x <- x + (sigma' - sigma) (x - D_cfg) / sigma.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..progress import ProgressFactory, resolve
from ..sd.interface import NoiseSchedule, SDBackend
from .model import NVSAdapter
from .network import NoiseSource, adapter_eps, build_batch, check_backend

NUM_TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.012
DEFAULT_STEPS = 50
DEFAULT_CFG = 3.0


def _alphas_cumprod() -> np.ndarray:
    # the SD schedule in float64 (equal bit for bit to the published numpy cumprod)
    return NoiseSchedule.scaled_linear(LINEAR_START, LINEAR_END, NUM_TIMESTEPS).alphas_cumprod.numpy()


def _sigmas_of(alphas_cumprod: np.ndarray) -> torch.Tensor:
    return torch.tensor((1 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32) ** 0.5


def denoiser_sigmas() -> torch.Tensor:
    """(1000,) float32 sigma per DDPM timestep (the denoiser's quantisation table)."""
    return _sigmas_of(_alphas_cumprod())


def sampling_schedule(steps: int = DEFAULT_STEPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (steps,) int64 in sampling order, sigmas (steps + 1,) float32 ending with 0)."""
    if not 1 <= steps < NUM_TIMESTEPS:
        raise ValueError(f"steps must be in 1..{NUM_TIMESTEPS - 1}, got {steps}")
    timesteps = np.linspace(NUM_TIMESTEPS - 1, 0, steps, endpoint=False).astype(int)
    sigmas = _sigmas_of(_alphas_cumprod()[timesteps[::-1]]).flip(0)
    return torch.from_numpy(timesteps.astype(np.int64)), torch.cat([sigmas, sigmas.new_zeros(1)])


def quantize(sigma: torch.Tensor, table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(table index, table sigma) nearest to each sigma (absolute distance, as upstream)."""
    index = (sigma - table[:, None]).abs().argmin(dim=0).view(sigma.shape)
    return index, table[index]


EpsFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def euler_cfg(eps_fn: EpsFunction, noise: torch.Tensor, cfg_scale: float = DEFAULT_CFG, steps: int = DEFAULT_STEPS,
              progress: Optional[ProgressFactory] = None, record: Optional[dict] = None) -> torch.Tensor:
    """The sampling loop around any network: ``eps_fn(net_input (2B, Q, 4, h, w), timestep index (2B,),
    uncond mask (2B,))`` -> eps of the same shape as net_input. ``record`` (a dict) collects per-step
    tensors (net_input, net_eps, net_timestep_idx, denoised_cfg, step_sigma, x_trajectory)."""
    objects = noise.shape[0]
    device = noise.device
    timesteps, sigmas = sampling_schedule(steps)
    sigmas, table = sigmas.to(device), denoiser_sigmas().to(device)
    x = noise.to(torch.float32) * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    uncond = torch.cat([torch.ones(objects), torch.zeros(objects)]).to(device=device, dtype=torch.bool)
    trace = {k: [] for k in ("net_input", "net_eps", "net_timestep_idx", "denoised_cfg", "step_sigma")}
    trace["x_trajectory"] = [x.clone()]
    s_in = x.new_ones([objects])
    expand = lambda v, ndim: v.reshape(-1, *([1] * (ndim - 1)))  # noqa: E731 (sgm append_dims)
    with resolve(progress, steps, "NVS-Adapter sampling") as bar:
        for i in range(steps):
            sigma, next_sigma = s_in * sigmas[i], s_in * sigmas[i + 1]
            sigma_hat = sigma  # s_churn 0: gamma 0, sigma_hat = sigma (1 + gamma)
            x_in = torch.cat([x, x])
            index, snapped = quantize(torch.cat([sigma_hat, sigma_hat]), table)
            snapped = expand(snapped, x_in.ndim)
            net_input = x_in * (1 / (snapped ** 2 + 1.0) ** 0.5)
            eps = eps_fn(net_input, index, uncond)
            denoised = eps * -snapped + x_in * torch.ones_like(snapped)
            d_u, d_c = denoised.chunk(2)
            denoised_cfg = d_u + cfg_scale * (d_c - d_u)
            d = (x - denoised_cfg) / expand(sigma_hat, x.ndim)
            x = x + expand(next_sigma - sigma_hat, x.ndim) * d
            if record is not None:
                for name, value in (("net_input", net_input), ("net_eps", eps), ("net_timestep_idx", index),
                                    ("denoised_cfg", denoised_cfg), ("step_sigma", sigma_hat),
                                    ("x_trajectory", x)):
                    trace[name].append(value.detach().clone())
            bar.update(1)
    if record is not None:
        record.update({k: torch.stack(v) for k, v in trace.items()})
        record["timesteps"], record["sigmas"] = timesteps, sigmas.cpu()
    return x


def sample(backend: SDBackend, adapter: NVSAdapter, noise: torch.Tensor, text_context: torch.Tensor,
           image_context: torch.Tensor, rays_context: torch.Tensor, reference_latents: torch.Tensor,
           cfg_scale: float = DEFAULT_CFG, steps: int = DEFAULT_STEPS, generator: Optional[torch.Generator] = None,
           reference_noise: Optional[NoiseSource] = None, progress: Optional[ProgressFactory] = None,
           record: Optional[dict] = None) -> torch.Tensor:
    """Target latents (B, Q, 4, h, w) from initial N(0, 1) ``noise`` (B, Q, 4, h, w), per object: text
    (B, T, D), image embedding (B, 1, D_img), rays (B, 1+Q, 144, h, w), clean reference latents (B, 1, 4, h, w).

    The unconditional objects' random reference latents are drawn each step from ``reference_noise(shape)``
    if given, else ``torch.randn(generator=generator)``. Progress is reported per step and the progress'
    interrupt check runs after each one. ``record``: see ``euler_cfg``.
    """
    check_backend(backend, adapter)
    conds = [torch.cat([c, c]) for c in (text_context, image_context, rays_context, reference_latents)]

    def eps_fn(net_input, index, uncond):
        batch = build_batch(net_input, index, *conds, uncond=uncond, noise=reference_noise, generator=generator)
        return adapter_eps(backend, adapter, batch)

    return euler_cfg(eps_fn, noise, cfg_scale, steps, progress, record)
