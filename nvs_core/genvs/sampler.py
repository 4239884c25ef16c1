"""Karras sigmas and the Euler sampler with churn of the unofficial GeNVS (k-diffusion ``sample_euler``).

Exactly as published: the step noise is drawn at *every* step, even when churn is 0 (deterministic
mode), so a seed reproduces the original's samples; stochastic mode uses gamma = min(0.4, sqrt 2 - 1)
at every step with s_noise 1.003; the result is clipped to [-1, 1]. Images live in [0, 1].

Noise comes from :class:`NoiseSource` objects: ``BatchNoise`` draws like the original from one CPU
generator for the whole batch (``torch.manual_seed(s)`` then ``randn([B,3,H,W])`` then one
``randn_like`` per step), ``PerTargetNoise`` gives every target its own generator (seed + index), so a
target's sample does not depend on which other targets share its batch; ``ReplayNoise`` replays
recorded draws. Draws are made on the CPU in float32 and moved, so results do not depend on the device.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..progress import ProgressFactory, resolve


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(n + 1,) float32: the Karras et al. schedule followed by 0, computed in float32 as published."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class NoiseSource:
    def initial(self, shape) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not provide initial noise")

    def step(self, i: int, shape) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not provide step noise")

    def uniform(self, shape) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not provide uniform noise")


class BatchNoise(NoiseSource):
    """One CPU generator for the whole batch, in the original's draw order."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def initial(self, shape):
        return torch.randn(shape, generator=self.generator)

    def step(self, i, shape):
        return torch.randn(shape, generator=self.generator)

    def uniform(self, shape):
        return torch.rand(shape, generator=self.generator)


class PerTargetNoise(NoiseSource):
    """Target b draws from its own generator seeded ``seeds[b]``: batch-composition independent."""

    def __init__(self, seeds: Sequence[int]):
        self.sources = [BatchNoise(s) for s in seeds]

    def _each(self, fn, shape):
        if shape[0] != len(self.sources):
            raise ValueError(f"noise for {shape[0]} targets requested but {len(self.sources)} seeds given")
        return torch.cat([fn(src, (1, *shape[1:])) for src in self.sources])

    def initial(self, shape):
        return self._each(lambda s, sh: s.initial(sh), shape)

    def step(self, i, shape):
        return self._each(lambda s, sh: s.step(i, sh), shape)

    def uniform(self, shape):
        return self._each(lambda s, sh: s.uniform(sh), shape)


class ReplayNoise(NoiseSource):
    """Recorded draws: initial (B,...), steps (N,B,...), optional uniform."""

    def __init__(self, initial: torch.Tensor, steps: torch.Tensor, uniform: Optional[torch.Tensor] = None):
        self._initial, self._steps, self._uniform = initial, steps, uniform

    def initial(self, shape):
        return self._initial.reshape(shape)

    def step(self, i, shape):
        return self._steps[i].reshape(shape)

    def uniform(self, shape):
        if self._uniform is None:
            raise TypeError("no recorded uniform noise")
        return self._uniform.reshape(shape)


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource, churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 callback: Optional[Callable[[dict], None]] = None, progress: Optional[ProgressFactory] = None
                 ) -> torch.Tensor:
    """Algorithm 2 of Karras et al. (Euler with churn), drawing step noise at every step.

    ``denoise(x, sigma_hat_batch)`` returns D(x). ``callback`` gets x before churn, x_hat, sigma_hat
    and the denoised value of every step.
    """
    n = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    with resolve(progress, n, "GeNVS sampling") as bar:
        for i in range(n):
            sigma = sigmas[i]
            gamma = min(churn / n, 2 ** 0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
            eps = noise.step(i, x.shape).to(x) * s_noise
            sigma_hat = sigma * (gamma + 1)
            x_before = x
            if gamma > 0:
                x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5
            denoised = denoise(x, sigma_hat * s_in)
            d = (x - denoised) / sigma_hat
            if callback is not None:
                callback({"i": i, "x_before_churn": x_before, "x_hat": x, "sigma": sigma, "sigma_hat": sigma_hat,
                          "denoised": denoised})
            x = x + d * (sigmas[i + 1] - sigma_hat)
            bar.update(1)
    return x


def sample(denoiser, cond: torch.Tensor, steps: int = 250, stochastic: bool = True, sigma_min: float = 0.03,
           sigma_max: float = 50.0, noise: Optional[NoiseSource] = None, seed: int = 0, cfg: float = 1.0,
           unconditional: bool = False, batch_size: Optional[int] = None, churn_per_step: float = 0.4,
           s_noise: float = 1.003, callback=None, progress: Optional[ProgressFactory] = None,
           return_unclipped: bool = False) -> torch.Tensor:
    """Sample images in [0, 1] (clipped to [-1, 1] as published) for renders ``cond`` (B, F, S, S).

    ``denoiser`` is ``ddpm_pipeline`` (``D(x, sigma, unet_cond=...)``). ``cfg`` > 1 mixes in the
    unconditional prediction (the render replaced by U[0,1) noise, as in training):
    D = D_u + cfg (D_c - D_u); ``unconditional`` samples from the unconditional branch alone.
    ``batch_size`` bounds how many targets go through the network at once (steps stay in lockstep, so
    it never changes a result). Default noise: :class:`BatchNoise` (seed) like the original.
    """
    if cond.ndim != 4 or cond.shape[0] == 0:
        raise ValueError(f"cond must be a non-empty batch of renders (B, F, H, W), got {tuple(cond.shape)}")
    B, _, H, W = cond.shape
    noise = noise if noise is not None else BatchNoise(seed)
    c_in = 3
    use_uncond = unconditional or cfg != 1.0
    uncond = noise.uniform(cond.shape).to(cond) if use_uncond else None
    x = noise.initial((B, c_in, H, W)).to(cond) * sigma_max
    sigmas = karras_sigmas(steps, sigma_min, sigma_max).to(cond.device)
    churn = churn_per_step * steps if stochastic else 0.0
    step_noise = s_noise if stochastic else 1.0
    chunk = B if not batch_size or batch_size <= 0 else int(batch_size)

    def net(xb, sb, cb):
        return denoiser(xb, sb, unet_cond=cb)

    def denoise(x_, s_):
        outs = []
        for a in range(0, B, chunk):
            sl = slice(a, a + chunk)
            if unconditional:
                outs.append(net(x_[sl], s_[sl], uncond[sl]))
            elif use_uncond:
                both = net(torch.cat([x_[sl], x_[sl]]), torch.cat([s_[sl], s_[sl]]), torch.cat([cond[sl], uncond[sl]]))
                d_c, d_u = both.chunk(2)
                outs.append(d_u + cfg * (d_c - d_u))
            else:
                outs.append(net(x_[sl], s_[sl], cond[sl]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    x = sample_euler(denoise, x, sigmas, noise, churn, 0.0, float("inf"), step_noise, callback, progress)
    return x if return_unclipped else x.clip(-1.0, 1.0)
