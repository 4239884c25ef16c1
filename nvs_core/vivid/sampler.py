"""VIVID sampling: EDM Heun sampler with autoguidance, per-seed noise, and the 64 -> 256 SR stage.

Guided denoiser (autoguidance): D = D_gnet + g (D_net - D_gnet), where the guidance net gets no
camera label. Time steps (EDM Eq. 5), computed in float32 as the original does:
    t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,  i < N;  t_N = 0.
Each step: d = (x - D(x, t_i)) / t_i;  x' = x + (t_{i+1} - t_i) d;  for i < N-1 a Heun correction
x_{i+1} = x + (t_{i+1} - t_i) (d + d') / 2 with d' = (x' - D(x', t_{i+1})) / t_{i+1}.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..progress import ProgressFactory, resolve, shared

RandnLike = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Pixels <-> model space (upstream StandardRGBEncoder).

def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 pixels (N, 3, H, W) -> model space [-1, 1]: p / 127.5 - 1."""
    return pixels.to(torch.float32) / 127.5 - 1


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model space -> uint8 pixels: clip(x 127.5 + 128, 0, 255), truncated (the +128 is upstream's)."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Per-seed noise.

class SeededNoise:
    """One CPU generator per seed (seeded with seed mod 2^32); row i of every draw comes from seed i.

    Reproduces the original's per-seed noise bit for bit, independent of batch composition and of
    the device the result is moved to.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator("cpu").manual_seed(s % (1 << 32)) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """(len(seeds), *shape) standard normal samples, one sample per seed, stacked in seed order."""
        rows = [torch.randn(list(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch {x.shape[0]} does not match the {len(self.generators)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype, device=x.device)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Initial noise (len(seeds), *shape) for the given seeds; see :class:`SeededNoise`."""
    return SeededNoise(seeds).randn(shape, dtype=dtype, device=device)


def split_seed_batches(num_seeds: int, max_batch_size: int) -> List[range]:
    """Index ranges of the batches the original driver forms (near-equal sizes, larger ones first).

    The same seed gives the same bits only within the same batch composition.
    """
    num_batches = max((num_seeds - 1) // max_batch_size + 1, 1)
    base, larger = divmod(num_seeds, num_batches)
    batches, start = [], 0
    for b in range(num_batches):
        size = base + (1 if b < larger else 0)
        batches.append(range(start, start + size))
        start += size
    return batches


# --------------------------------------------------------------------------------------------
# SR conditioning image.

def resize_bilinear_antialias(x: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """Bilinear resize with antialias, align_corners False: what torchvision's ``resize`` does to
    float tensors. An int ``size`` sets the smaller edge and keeps the aspect ratio."""
    if isinstance(size, int):
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long / short)
        size = (new_short, new_long) if h <= w else (new_long, new_short)
    return F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)


# --------------------------------------------------------------------------------------------
# Sampler.

def edm_time_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   dtype: torch.dtype = torch.float32,
                   device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """EDM noise levels t_0 > ... > t_{N-1}, followed by t_N = 0 (N + 1 values, in ``dtype``)."""
    if num_steps < 2:
        raise ValueError("the EDM schedule needs num_steps >= 2")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t_steps = (max_inv_rho + i / (num_steps - 1) * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def edm_sampler(net, src: torch.Tensor, noise: torch.Tensor, labels: Optional[torch.Tensor] = None,
                gnet=None, conditioning_image: Optional[torch.Tensor] = None, *, num_steps: int = 32,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, guidance: float = 1.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                dtype: torch.dtype = torch.float32, randn_like: RandnLike = torch.randn_like,
                conditioning_randn_like: Optional[RandnLike] = None,
                progress: Optional[ProgressFactory] = None, desc: str = "VIVID sampling",
                callback: Optional[Callable[[Dict], None]] = None) -> torch.Tensor:
    """Sample target views: EDM Heun (Euler on the last step) from ``noise`` (N, C, H, W) * t_0.

    net(src, x, t, labels) is the conditional denoiser; with ``guidance != 1`` the guided estimate
    is gnet(src, x, t) + guidance (net - gnet), gnet called without labels (autoguidance).
    ``randn_like`` draws the churn noise (pass ``SeededNoise.randn_like`` for per-seed streams).
    SR nets get ``conditioning_image`` and fresh conditioning noise at every call, from
    ``conditioning_randn_like`` or, if None, from the global RNG as in the original.
    ``callback`` gets {i, t_cur, t_next, x, x_euler, x_next} after each step.
    """
    if guidance != 1 and gnet is None:
        raise ValueError("guidance != 1 needs a guidance net (gnet)")

    def call_net(model, x, t, geometry, **extra):
        if getattr(model, "super_res", False):
            extra["conditioning_image"] = conditioning_image
            if conditioning_randn_like is not None:
                extra["conditioning_noise"] = conditioning_randn_like(conditioning_image)
        return model(src, x, t, geometry, **extra)

    reuse = {}
    if getattr(net, "no_time_enc", False):
        # Encoder features do not depend on the noise level: compute them once.
        ones = torch.ones(src.shape[0], dtype=dtype, device=noise.device)
        reuse["features"] = call_net(net, torch.zeros_like(src), ones, labels, return_features=True)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        D_net = call_net(net, x, t, labels, **reuse).to(dtype)
        if guidance == 1:
            return D_net
        D_gnet = call_net(gnet, x, t, None).to(dtype)
        return D_gnet.lerp(D_net, guidance)  # D_gnet + guidance * (D_net - D_gnet)

    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x_next = noise.to(dtype) * t_steps[0]
    bar = resolve(progress, num_steps, desc)
    try:
        bar.check()
        for i in range(num_steps):
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            x_cur = x_next

            # Optional churn: raise the noise level to t_hat by adding fresh noise.
            if S_churn > 0 and S_min <= t_cur <= S_max:
                gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
                t_hat = t_cur + gamma * t_cur
                x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
            else:
                t_hat, x_hat = t_cur, x_cur

            d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            x_euler = x_next
            if i < num_steps - 1:  # Heun correction (the last step, to t_N = 0, stays Euler)
                d_prime = (x_next - denoise(x_next, t_next)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

            if callback is not None:
                callback(dict(i=i, t_cur=t_cur, t_next=t_next, x=x_cur, x_euler=x_euler, x_next=x_next))
            bar.update()
    finally:
        bar.close()
    return x_next


# --------------------------------------------------------------------------------------------
# End-to-end driver.

def generate_views(net, src_pixels: torch.Tensor, labels: torch.Tensor, seeds: Sequence[int], *, gnet=None,
                   guidance: float = 1.0, num_steps: int = 32, max_batch_size: int = 32,
                   sr_net=None, sr_src_pixels: Optional[torch.Tensor] = None,
                   sr_labels: Optional[torch.Tensor] = None, sr_num_steps: Optional[int] = None,
                   sr_conditioning_randn_like: Optional[RandnLike] = None,
                   progress: Optional[ProgressFactory] = None, **sampler_kwargs) -> Dict[str, torch.Tensor]:
    """Novel views for one source/label per seed, as the original ``generate_images`` produces them.

    src_pixels (N, 3, H, W) in 0..255 at the base resolution, labels (N, 20) from
    ``compose_geometry`` at that resolution, one entry per seed. With ``sr_net``, each sample is
    upsampled (bilinear, antialiased) into the SR conditioning image and refined at
    ``sr_src_pixels`` / ``sr_labels`` resolution without guidance, starting from fresh noise of the
    same seeds. Seeds are sampled in batches of at most ``max_batch_size`` as upstream splits them.
    Runs on the device of ``net``'s parameters. Returns ``images`` (uint8, final stage), ``latents``
    (base stage) and, with SR, ``sr_latents``.
    """
    if len(seeds) != src_pixels.shape[0] or len(seeds) != labels.shape[0]:
        raise ValueError("need one source image and one label per seed")
    if sr_net is not None and (sr_src_pixels is None or sr_labels is None):
        raise ValueError("the SR stage needs sr_src_pixels and sr_labels (the 256-px source and label)")
    device = next(net.parameters()).device
    sr_num_steps = num_steps if sr_num_steps is None else sr_num_steps
    batches = split_seed_batches(len(seeds), max_batch_size)
    steps_per_batch = num_steps + (sr_num_steps if sr_net is not None else 0)
    outputs: Dict[str, List[torch.Tensor]] = {"images": [], "latents": [], "sr_latents": []}

    with resolve(progress, steps_per_batch * len(batches), "VIVID novel views") as bar:
        one_bar = shared(bar)

        for batch in batches:
            batch_seeds = [seeds[i] for i in batch]
            idx = torch.tensor(list(batch), dtype=torch.long)
            src = encode_pixels(src_pixels[idx].to(device))
            rnd = SeededNoise(batch_seeds)
            noise = rnd.randn([net.img_channels, net.img_resolution, net.img_resolution], device=device)
            latents = edm_sampler(net, src, noise, labels[idx].to(device), gnet, guidance=guidance,
                                  num_steps=num_steps, randn_like=rnd.randn_like, progress=one_bar,
                                  **sampler_kwargs)
            outputs["latents"].append(latents)
            final = latents
            if sr_net is not None:
                sr_src = encode_pixels(sr_src_pixels[idx].to(device))
                rnd = SeededNoise(batch_seeds)
                sr_noise = rnd.randn([sr_net.img_channels, sr_net.img_resolution, sr_net.img_resolution],
                                     device=device)
                low_res = resize_bilinear_antialias(latents, sr_src.shape[-1])
                final = edm_sampler(sr_net, sr_src, sr_noise, sr_labels[idx].to(device), sr_net,
                                    conditioning_image=low_res, guidance=1.0, num_steps=sr_num_steps,
                                    randn_like=rnd.randn_like, conditioning_randn_like=sr_conditioning_randn_like,
                                    progress=one_bar, **sampler_kwargs)
                outputs["sr_latents"].append(final)
            outputs["images"].append(decode_pixels(final))
    return {name: torch.cat(parts) for name, parts in outputs.items() if parts}
