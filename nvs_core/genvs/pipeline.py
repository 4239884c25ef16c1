"""Novel views from source images with a GeNVS model: render the feature image at each target camera,
then sample the denoiser conditioned on it. Images are tensors (N, 3, H, W) in [0, 1] at the model's
``image_size``; cameras are :class:`~nvs_core.genvs.cameras.GeNVSCameras` (see ``to_genvs``).

Random draws are made on the CPU, in the published order: per render an unused randn(3), the ray
jitter (and the importance u in train mode), then the sampler's initial and per-step noise.
``noise="batch"`` draws everything from one generator seeded ``seed`` (the original's draw order for
a batch of targets); ``noise="per_target"`` gives target i its own generator seeded ``seed + i`` so a
target's result does not depend on the other targets in the call.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..progress import ProgressFactory, resolve, shared
from .cameras import GeNVSCameras
from .model import GeNVS
from .nerf import DEFAULT_RENDER_MEMORY_MB, SourceViews
from .sampler import BatchNoise, PerTargetNoise, sample

NOISE_MODES = ("batch", "per_target")


def check_sources(images01: torch.Tensor, cameras: GeNVSCameras) -> None:
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"source images must be (N, 3, H, W), got {tuple(images01.shape)}")
    if images01.shape[0] == 0:
        raise ValueError("at least one source image is needed")
    if images01.shape[0] != len(cameras):
        raise ValueError(f"{images01.shape[0]} source images but {len(cameras)} source cameras: expected one camera "
                         "per source image")


def fit_images(images01: torch.Tensor, size: int) -> torch.Tensor:
    """Resize square images to ``size`` (bilinear, antialiased when shrinking)."""
    if images01.shape[-1] == size and images01.shape[-2] == size:
        return images01
    return F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=images01.shape[-1] > size).clamp(0, 1)


def source_views(model: GeNVS, images01: torch.Tensor, cameras: GeNVSCameras,
                 volumes: Optional[torch.Tensor] = None) -> SourceViews:
    """Encode (unless ``volumes`` are given) and package the sources for rendering (batch 1)."""
    check_sources(images01, cameras)
    device = next(model.parameters()).device
    if volumes is None:
        volumes = model.encode(fit_images(images01, model.config.image_size))
    return SourceViews(volumes[None], cameras.poses[None].to(device), cameras.camera_k)


def render_targets(model: GeNVS, src: SourceViews, targets: GeNVSCameras, intrinsics: torch.Tensor,
                   generator: Optional[torch.Generator] = None, random_importance: bool = False,
                   memory_mb: float = DEFAULT_RENDER_MEMORY_MB, check=None):
    """Feature render (Q, F, S, S), depth and opacity (Q, 1, S, S) for Q target poses."""
    poses = targets.poses[None].to(src.poses.device)
    f, d, o = model.render(src, poses, intrinsics, generator=generator, random_importance=random_importance,
                           memory_mb=memory_mb, check=check)
    return f[0], d[0], o[0]


@torch.no_grad()
def generate_views(model: GeNVS, images01: torch.Tensor, sources: GeNVSCameras, targets: GeNVSCameras,
                   steps: int = 250, stochastic: bool = True, cfg: float = 1.0, seed: int = 0, noise: str = "batch",
                   batch_size: Optional[int] = None, published_train_mode: bool = False,
                   volumes: Optional[torch.Tensor] = None, memory_mb: float = DEFAULT_RENDER_MEMORY_MB,
                   progress: Optional[ProgressFactory] = None) -> Dict[str, torch.Tensor]:
    """Sample one novel view per target camera.

    Returns ``images`` (Q, 3, S, S) in [0, 1], the ``features`` render (Q, F, S/2, S/2), ``depth`` and
    ``opacity`` (Q, 1, S/2, S/2). Eval mode unless ``published_train_mode`` (the original scripts'
    path: random importance samples and denoiser dropout).
    """
    if len(targets) == 0:
        raise ValueError("no target cameras: expected at least one")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    Q = len(targets)
    dcfg = model.config.denoiser
    with model.mode(published_train_mode), resolve(progress, steps, "GeNVS sampling") as bar:
        src = source_views(model, images01, sources, volumes)
        bar.check()
        if noise == "batch":
            source = BatchNoise(seed)
            f, d, o = render_targets(model, src, targets, targets.intrinsics, source.generator, published_train_mode,
                                     memory_mb, bar.check)
        else:
            source = PerTargetNoise([seed + i for i in range(Q)])
            parts = [render_targets(model, src, targets[i], targets.intrinsics, source.sources[i].generator,
                                    published_train_mode, memory_mb, bar.check) for i in range(Q)]
            f, d, o = [torch.cat(x) for x in zip(*parts)]
        images = sample(model.ddpm_pipeline, model.condition(f), steps, stochastic, dcfg.sigma_min, dcfg.sigma_max,
                        source, cfg=cfg, batch_size=batch_size, progress=shared(bar))
    return {"images": images.clamp(0, 1), "features": f, "depth": d, "opacity": o}
