"""Training GeNVS networks on multi-view data, resumable, with progress, loss and interrupt.

Objective (``genvs_model.py NerfDiffDLV3.forward`` and ``k_pipeline.py train_step`` of the unofficial
GeNVS), per step on a batch of samples, each ``max_sources`` + 1 views of one scene with the target last:

- ``nv`` = 1 or 2 source views for the whole batch (uniform, published ``random.randint(1, 2)``);
- the sources are encoded (ImageNet normalisation, vertical flip) after input noise: with probability
  ``input_noise_prob`` (0.5) per image, ``u * N(0, 1)`` with u ~ U[0, 1) is added to the normalised image;
- the NeRF renders the first source view and the target (random importance samples: training mode);
  ``rgb`` = lambda_rgb_first * MSE(render_0[:3], view_0) + lambda_rgb_other * MSE(render_t[:3], target),
  ``opacity`` = lambda_opacity * mean(opacity), ``depth`` = lambda_depth * mean(o (d / (o + 1e-6) - camera_d)^2)
  (pushes the expected depth to the first source camera's distance); all on the render grid (the
  published code computes them after the nearest x2 upsampling, which leaves every mean unchanged);
- ours, off by default (``lambda_mask`` 0): ``mask`` = lambda_mask * MSE(opacity, object mask) on both
  rendered views (masks area-averaged to the render grid; the data must carry masks). Against the white
  background the field can explain a pixel's brightness with transparency instead of colour (bright
  object pixels at opacity 0.1-0.3, a grey render); the mask term removes that ambiguity;
- ours, off by default (``source_reconstruction_steps`` 0): the first N steps train the encoder and the
  field on the source-view reconstruction alone (``rgb`` with lambda_rgb_first 1 and lambda_rgb_other 0;
  no diffusion, no depth term; the denoiser gets no gradient). It stands in for the published encoder's
  ImageNet initialisation, which an offline pack cannot fetch: trained from scratch on the full objective
  the encoder stays colour-blind (within any depth plane of the volume, the one a 3D point reads, the
  sources' chroma is not even linearly decodable), while a few hundred reconstruction steps teach it colour;
- diffusion: with probability ``no_cond_prob`` (0.1, per batch) the condition (the target render
  upsampled x2) is replaced by U[0, 1) noise; with probability 1 - ``diff_augmentation_prob`` (0.8;
  published ``random() > p``) target and condition get the same random affine augmentation (k-diffusion's
  ``KarrasDiffAugmentationPipeline``, each component with probability ``aug_prob``; kornia
  ``warp_affine``, bilinear, reflection padding) and its 9-d vector is the augment wrapper's
  conditioning (zeros otherwise); sigma ~ the config's log-normal density; the loss is
  ``DenoiserWithVariance.loss`` (learned variance) on the target in [0, 1];
- AdamW (betas 0.9/0.99, eps 1e-8, weight decay 0.01) with per-module learning rates (published
  1e-4 encoder, 2e-4 NeRF, 1e-5 denoiser: ``lr`` times ``lr_ratios``), gradient norm clipped to 1,
  cosine annealing with warm restarts every ``restart_steps`` steps (eta_min 1e-8), optional linear warm-up.

Differences from the published script, all deliberate: the augmentation flips are drawn per sample
(the original builds the flip matrices of the first sample only, by zipping with a one-element list,
while the conditioning vector is per sample); the first-view RGB term compares each render with its own
sample (the original broadcasts (B,3,H,W) against (B,1,3,H,W), i.e. every render against every sample's
view); the depth/opacity consistency terms (off in the published runs) are not implemented; the
scheduler counts steps (the original steps it per epoch). Added: an exponential moving average of the
weights (the exported network), a NaN guard (non-finite losses skip the step, non-finite gradient
entries become 0), and per-step generators seeded by (seed, step), so a resumed run continues exactly.

Outputs in ``out_dir``: ``network-ema.safetensors`` + ``.json`` (the GeNVS loader reads it) and
``training-state.safetensors`` + ``.json`` (raw net, EMA, AdamW state, step, config), each atomic.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..cameras import Cameras
from ..checkpoints import CheckpointError, load_with_config, save_with_config
from ..imageio import centre_crop_box, crop_cameras
from ..multiview import MultiView
from ..progress import ProgressFactory, resolve
from ..training_common import (LossProgress, add_out_argument, add_run_arguments, apply_threads, cli_argv, cli_main,
                               force_finite_, pack_optimizer, print_summary, randint, register_cli,
                               state_step, step_generator, step_loop, tensors_under, uniform, unpack_optimizer)
from ..vivid.data import TRAIN_SEEDS
from .cameras import to_genvs
from .config import GeNVSConfig, NOISE_CONFIGS, SAMPLE_DENSITIES, tiny_config
from .encoder import preprocess
from .loading import METHOD, NETWORK_CLASS
from .model import GeNVS, build_genvs
from .nerf import RenderDraws, SourceViews
from .pipeline import fit_images

PathLike = Union[str, Path]

EMA_FILE = "network-ema.safetensors"
STATE_FILE = "training-state.safetensors"
STATE_METHOD = "genvs-training-state"
MODULES = ("input_unet", "nerf", "ddpm_pipeline")
PUBLISHED_LR = 1e-4
PUBLISHED_LR_RATIOS = {"input_unet": 1.0, "nerf": 2.0, "ddpm_pipeline": 0.1}


def demo_network() -> GeNVSConfig:
    """The demo network: the GeNVS layout at 32 px (source images and diffusion at 32 px, 16-px
    render), a resnet18-depth encoder, a 128-channel volume (8 features x 16 depth planes), a 8 -> 32
    -> 17 field MLP with 24 + 24 samples per ray, a three-level ``image_v1`` denoiser and the published
    "low" noise config; about 7M parameters, sized so that it trains in an hour on one CPU thread."""
    cfg = tiny_config(image_size=32, render_size=16, decoder_channels=128, color_feat_dim=16,
                      encoder_layers=(1, 1, 1, 1), mapping_out=128, channels=(32, 64, 96),
                      self_attn=(False, False, True), dropout_rate=0.0)
    cfg.nerf.sigma_color_rank = 8
    cfg.nerf.hidden_dim = 32
    cfg.nerf.num_steps = 24
    cfg.nerf.upsample_steps = 24
    d = cfg.denoiser
    d.sigma_min, d.sigma_max = NOISE_CONFIGS["low"]["sigma_min"], NOISE_CONFIGS["low"]["sigma_max"]
    d.sigma_sample_density = {"type": "lognormal", **SAMPLE_DENSITIES["low"]}
    cfg.validate()
    return cfg


DEMO_NETWORK: Dict[str, Any] = demo_network().to_dict()

# Procedural samples matched to the demo evaluation (``vivid.data.procedural_eval_set``: targets at
# the source's elevation, azimuth offsets +-15..90 degrees), the same orbit as VIVID's demo data.
DEMO_DATA: Dict[str, Any] = {"kind": "procedural", "elevation_deg": [5.0, 35.0], "elevation_change_deg": [-5.0, 5.0],
                             "azimuth_offset_deg": [-100.0, 100.0], "radius": 2.6, "fov_deg": 45.0,
                             "samples_per_pixel": 4}

# The committed demo model's recipe (settings not listed are TrainConfig defaults). Two choices are ours,
# not published: 400 source-reconstruction steps first (the encoder learns colour; see the module doc) and
# source-view RGB weight 1 (at the published 0.01 the full objective washes those colours out again).
DEMO_RECIPE: Dict[str, Any] = dict(total_steps=3100, batch_size=6, lr=1e-3,
                                   lr_ratios={"input_unet": 1.0, "nerf": 2.0, "ddpm_pipeline": 1.0},
                                   restart_steps=900, warmup_steps=50, ema_decay=0.995, seed=0,
                                   source_reconstruction_steps=400, lambda_rgb_first=1.0)


@dataclass
class TrainConfig:
    """Everything a run depends on (stored with its checkpoints).

    ``network``: a :class:`GeNVSConfig` dict (default: the demo network). ``data``:
    ``{"kind": "procedural", ...}`` (see :data:`DEMO_DATA`), ``{"kind": "folders", "paths": [...]}`` or
    ``{"kind": "srn", "paths": [...]}`` (``cars_train`` instances); ignored when ``train`` gets data.
    """

    network: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEMO_NETWORK))
    data: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEMO_DATA))
    max_sources: int = 2
    normalize_first_view: bool = True
    total_steps: int = 1000
    batch_size: int = 8
    lr: float = PUBLISHED_LR
    lr_ratios: Dict[str, float] = field(default_factory=lambda: dict(PUBLISHED_LR_RATIOS))
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    restart_steps: int = 400
    eta_min: float = 1e-8
    warmup_steps: int = 0
    lambda_rgb_first: float = 0.01
    lambda_rgb_other: float = 1.0
    lambda_opacity: float = 0.001
    lambda_depth: float = 1.0
    lambda_diffusion: float = 1.0
    lambda_mask: float = 0.0          # ours (see the module doc); needs masks in the data
    source_reconstruction_steps: int = 0   # ours (see the module doc): encoder warm-up steps, counted in total_steps
    no_cond_prob: float = 0.1
    diff_augmentation_prob: float = 0.2
    aug_prob: float = 0.1
    input_noise_prob: float = 0.5
    ema_decay: float = 0.999
    force_finite: bool = True
    seed: int = 0
    out_dir: Optional[str] = None
    checkpoint_every: int = 250
    resume: bool = True
    device: str = "cpu"
    reproduce: str = ""

    def __post_init__(self):
        GeNVSConfig.from_dict(self.network)  # validates
        if self.total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {self.total_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_sources < 1:
            raise ValueError(f"max_sources must be >= 1, got {self.max_sources}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        unknown = set(self.lr_ratios) - set(MODULES)
        if unknown or set(self.lr_ratios) != set(MODULES):
            raise ValueError(f"lr_ratios needs exactly the modules {list(MODULES)}, got {sorted(self.lr_ratios)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.restart_steps < 1:
            raise ValueError(f"restart_steps must be >= 1, got {self.restart_steps}")
        if not (math.isfinite(self.lambda_mask) and self.lambda_mask >= 0):
            raise ValueError(f"lambda_mask must be a finite number >= 0, got {self.lambda_mask}")
        if self.source_reconstruction_steps < 0:
            raise ValueError(f"source_reconstruction_steps must be >= 0, got {self.source_reconstruction_steps}")

    @property
    def genvs_config(self) -> GeNVSConfig:
        return GeNVSConfig.from_dict(self.network)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: copy.deepcopy(v) for k, v in values.items() if k in known})

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# Fields a resumed run must share with the saved one.
RECIPE_FIELDS = ("network", "data", "max_sources", "normalize_first_view", "batch_size", "lr", "lr_ratios",
                 "weight_decay", "grad_clip", "restart_steps", "eta_min", "warmup_steps", "lambda_rgb_first",
                 "lambda_rgb_other", "lambda_opacity", "lambda_depth", "lambda_diffusion", "lambda_mask",
                 "source_reconstruction_steps",
                 "no_cond_prob", "diff_augmentation_prob", "aug_prob", "input_noise_prob", "ema_decay", "force_finite",
                 "seed")


# --------------------------------------------------------------------------------------------
# Samples.

@dataclass
class ViewBatch:
    """``images`` (B, V, 3, S, S) in [0, 1] (sources first, target last), GeNVS ``poses`` (B, V, 4, 4),
    render-grid ``intrinsics`` (B, 4), ``camera_k`` (B,) float64, ``camera_d`` (B,) = |t| of view 0."""

    images: torch.Tensor
    poses: torch.Tensor
    intrinsics: torch.Tensor
    camera_k: torch.Tensor
    camera_d: torch.Tensor
    masks: Optional[torch.Tensor] = None   # (B, V, 1, S, S) object coverage 0..1, when the data has it

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ViewBatch":
        return ViewBatch(self.images.to(device), self.poses.to(device), self.intrinsics.to(device),
                         self.camera_k.to(device), self.camera_d.to(device),
                         None if self.masks is None else self.masks.to(device))

    @staticmethod
    def stack(items: Sequence["ViewBatch"]) -> "ViewBatch":
        fields = [torch.cat([getattr(b, f) for b in items]) for f in
                  ("images", "poses", "intrinsics", "camera_k", "camera_d")]
        masks = None if any(b.masks is None for b in items) else torch.cat([b.masks for b in items])
        return ViewBatch(*fields, masks)


def views_to_sample(images01: torch.Tensor, cameras: Cameras, size: int, render_size: int,
                    normalize: bool = True, masks: Optional[torch.Tensor] = None) -> ViewBatch:
    """One sample from views of one scene: IMAGE [V, H, W, 3] (0..1) + their cameras (+ masks [V, H, W])
    -> a ViewBatch of 1.

    Images (and masks) are centre-cropped to a square and resized to ``size``; the GeNVS intrinsics are
    the first view's (the published loader's quirk), on the render grid."""
    if images01.ndim != 4 or images01.shape[-1] != 3:
        raise ValueError(f"views must be IMAGE [V, H, W, 3], got {list(images01.shape)}")
    if len(cameras) != images01.shape[0]:
        raise ValueError(f"{images01.shape[0]} views but {len(cameras)} cameras: expected one camera per view")
    box = centre_crop_box(*images01.shape[1:3])
    planes = images01 if masks is None else torch.cat([images01, masks[..., None].to(images01)], -1)
    x = planes[:, box.top:box.top + box.side, box.left:box.left + box.side]
    x = x.permute(0, 3, 1, 2).to(torch.float32)
    x = fit_images(x.clamp(0, 1), size)
    x, m = (x, None) if masks is None else (x[:, :3], x[:, 3:][None])
    cams, _ = crop_cameras(cameras.with_size(images01.shape[2], images01.shape[1]))
    g = to_genvs(cams, render_size, normalize=normalize)
    return ViewBatch(x[None], g.poses[None], g.intrinsics[None], g.camera_k.reshape(1).to(torch.float64),
                     g.camera_d.reshape(1).to(torch.float64), m)


class ProceduralViews:
    """Random procedural scenes (``make_scene(seed)``, seeds from ``seeds``) seen from ``views`` random
    orbit cameras: the first at a random azimuth and an elevation in ``elevation``, the others at
    azimuth offsets in ``azimuth_offset`` and elevation changes in ``elevation_change`` (radians)."""

    def __init__(self, imsize: int, render_size: int, views: int = 3, seeds: Sequence[int] = TRAIN_SEEDS,
                 elevation=(math.radians(5.0), math.radians(35.0)), elevation_change=(math.radians(-5.0), math.radians(5.0)),
                 azimuth_offset=(math.radians(-100.0), math.radians(100.0)), radius: float = 2.6,
                 fov: float = math.radians(45.0), samples_per_pixel: int = 4, normalize: bool = True):
        if len(seeds) == 0:
            raise ValueError("ProceduralViews needs at least one scene seed")
        if views < 2:
            raise ValueError(f"views must be >= 2 (sources + target), got {views}")
        self.imsize, self.render_size, self.views = int(imsize), int(render_size), int(views)
        self.seeds = seeds
        self.elevation, self.elevation_change, self.azimuth_offset = elevation, elevation_change, azimuth_offset
        self.radius, self.fov, self.samples_per_pixel, self.normalize = radius, fov, samples_per_pixel, normalize

    def sample(self, count: int, generator: torch.Generator) -> ViewBatch:
        from ..procedural import make_scene, render

        items = []
        for _ in range(count):
            seed = int(self.seeds[randint(generator, len(self.seeds))])
            azimuth = uniform(generator, 0.0, 2 * math.pi)
            elevation = uniform(generator, *self.elevation)
            offsets = torch.cat([torch.zeros(1, dtype=torch.float64),
                                 uniform(generator, *self.azimuth_offset, self.views - 1)])
            elevations = torch.cat([elevation, elevation + uniform(generator, *self.elevation_change,
                                                                    self.views - 1)])
            cams = Cameras.from_spherical(elevations, azimuth + offsets, self.radius, self.fov, self.imsize,
                                          self.imsize)
            out = render(make_scene(seed), cams, self.imsize, self.imsize, background=(1.0, 1.0, 1.0),
                         samples_per_pixel=self.samples_per_pixel)
            items.append(views_to_sample(out.rgb, cams, self.imsize, self.render_size, self.normalize, out.mask))
        return ViewBatch.stack(items)


class MultiViewViews:
    """Samples of ``views`` distinct views (fewer when a scene has fewer) drawn from NVS_MULTIVIEWs."""

    def __init__(self, multiviews: Union[MultiView, Sequence[MultiView]], imsize: int, render_size: int,
                 views: int = 3, normalize: bool = True):
        multiviews = [multiviews] if isinstance(multiviews, MultiView) else list(multiviews)
        self.scenes = [mv for mv in multiviews if len(mv) >= 2]
        if not self.scenes:
            raise ValueError("multiview data needs at least one NVS_MULTIVIEW with 2 or more views")
        self.imsize, self.render_size, self.views, self.normalize = int(imsize), int(render_size), int(views), normalize
        # Every sample of a batch needs the same number of views: the smallest scene decides.
        self.views = min(self.views, min(len(mv) for mv in self.scenes))

    def sample(self, count: int, generator: torch.Generator) -> ViewBatch:
        items = []
        for _ in range(count):
            mv = self.scenes[randint(generator, len(self.scenes))]
            pick = torch.randperm(len(mv), generator=generator)[:self.views].tolist()
            masks = None if mv.masks is None else mv.masks[pick].cpu()
            items.append(views_to_sample(mv.images[pick].cpu(), mv.cameras[pick], self.imsize, self.render_size,
                                         self.normalize, masks))
        return ViewBatch.stack(items)


def views_from_config(config: TrainConfig):
    """The sample source a config's ``data`` describes."""
    cfg = config.genvs_config
    spec = dict(config.data)
    kind = spec.get("kind", "procedural")
    views = config.max_sources + 1
    if kind == "procedural":
        change = spec.get("elevation_change_deg", (-5.0, 5.0))
        return ProceduralViews(
            cfg.diffusion_size, cfg.render_size, views,
            elevation=tuple(math.radians(v) for v in spec.get("elevation_deg", (5.0, 35.0))),
            elevation_change=tuple(math.radians(v) for v in change),
            azimuth_offset=tuple(math.radians(v) for v in spec.get("azimuth_offset_deg", (-100.0, 100.0))),
            radius=float(spec.get("radius", 2.6)), fov=math.radians(float(spec.get("fov_deg", 45.0))),
            samples_per_pixel=int(spec.get("samples_per_pixel", 4)), normalize=config.normalize_first_view)
    if kind == "folders":
        from ..multiview import load_folder

        mvs = [load_folder(p) for p in spec.get("paths", [])]
    elif kind == "srn":
        from ..multiview import load_srn

        mvs = [load_srn(p) for p in spec.get("paths", [])]
    else:
        raise ValueError(f"unknown data kind {kind!r}: expected 'procedural', 'folders' or 'srn'")
    if not mvs:
        raise ValueError(f"data kind {kind!r} lists no paths")
    return MultiViewViews(mvs, cfg.diffusion_size, cfg.render_size, views, config.normalize_first_view)


def view_source(data, config: TrainConfig):
    """A sample source from ``data`` (MultiView, list of them, or an object with ``sample``), else the config's."""
    if data is None:
        return views_from_config(config)
    if hasattr(data, "sample"):
        return data
    cfg = config.genvs_config
    return MultiViewViews(data, cfg.diffusion_size, cfg.render_size, config.max_sources + 1,
                          config.normalize_first_view)


# --------------------------------------------------------------------------------------------
# Augmentation (k-diffusion's KarrasDiffAugmentationPipeline, per sample, kornia warp).

def _mat(rows, batch: int) -> torch.Tensor:
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32).expand(batch) for v in row], -1)
                        for row in rows], -2)


def augmentation(batch: int, height: int, width: int, generator: torch.Generator, a_prob: float = 0.1,
                 a_scale: float = 2 ** 0.2, a_aniso: float = 2 ** 0.2, a_trans: float = 1 / 8):
    """Random affine matrices (B, 3, 3) and their 9-d conditioning vectors (B, 9), in the published
    draw order (x-flip always possible; y-flip, scale, rotation, anisotropy, translation each with
    probability ``a_prob``)."""
    b = batch
    one, zero = torch.ones(b), torch.zeros(b)

    def translate(tx, ty):
        return _mat([[one, zero, tx], [zero, one, ty], [zero, zero, one]], b)

    def scale(sx, sy):
        return _mat([[sx, zero, zero], [zero, sy, zero], [zero, zero, one]], b)

    def rotate(theta):
        return _mat([[theta.cos(), -theta.sin(), zero], [theta.sin(), theta.cos(), zero], [zero, zero, one]], b)

    def draw_do():
        return (torch.rand(b, generator=generator) < a_prob).float()

    mats = [translate(one * (width / 2 - 0.5), one * (height / 2 - 0.5))]
    a0 = torch.randint(2, (b,), generator=generator).float()
    mats.append(scale(1 - 2 * a0, one))
    do = draw_do()
    a1 = torch.randint(2, (b,), generator=generator).float() * do
    mats.append(scale(one, 1 - 2 * a1))
    do = draw_do()
    a2 = torch.randn(b, generator=generator) * do
    mats.append(scale(a_scale ** a2, a_scale ** a2))
    do = draw_do()
    a3 = (torch.rand(b, generator=generator) * 2 * math.pi - math.pi) * do
    mats.append(rotate(-a3))
    do = draw_do()
    a4 = (torch.rand(b, generator=generator) * 2 * math.pi - math.pi) * do
    a5 = torch.randn(b, generator=generator) * do
    mats += [rotate(a4), scale(a_aniso ** a5, a_aniso ** -a5), rotate(-a4)]
    do = draw_do()
    a6 = torch.randn(b, generator=generator) * do
    a7 = torch.randn(b, generator=generator) * do
    mats.append(translate(a_trans * width * a6, a_trans * height * a7))
    mats.append(translate(one * (-width / 2 + 0.5), one * (-height / 2 + 0.5)))
    mat = reduce(torch.matmul, mats)
    cond = torch.stack([a0, a1, a2, a3.cos() - 1, a3.sin(), a5 * a4.cos(), a5 * a4.sin(), a6, a7], dim=1)
    return mat, cond


def apply_augmentation(images: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Warp (B, C, H, W) by affine (B, 3, 3): kornia ``warp_affine``, bilinear, reflection padding."""
    from kornia.geometry.transform import warp_affine

    h, w = images.shape[-2:]
    return warp_affine(images, mat[:, :2, :].to(images), dsize=(h, w), mode="bilinear", padding_mode="reflection")


# --------------------------------------------------------------------------------------------
# Loss.

@dataclass
class StepDraws:
    """Every random draw of one training step (made on the CPU from the step generator)."""

    nv: int
    input_noise: torch.Tensor          # (B*nv, 3, S, S) already scaled (0 where not applied)
    render: RenderDraws
    uncond: bool
    uncond_noise: Optional[torch.Tensor]
    augment: bool
    aug_mat: torch.Tensor
    aug_cond: torch.Tensor
    sigma: torch.Tensor
    noise: torch.Tensor
    dropout_seed: int


def sample_density(cfg: GeNVSConfig, count: int, generator: torch.Generator) -> torch.Tensor:
    density = dict(cfg.denoiser.sigma_sample_density)
    if density.get("type", "lognormal") != "lognormal":
        raise ValueError(f"only the log-normal sigma density is supported, got {density}")
    return (torch.randn(count, generator=generator) * float(density["std"]) + float(density["mean"])).exp()


def draw_step(config: TrainConfig, cfg: GeNVSConfig, batch: ViewBatch, generator: torch.Generator) -> StepDraws:
    B = len(batch)
    max_nv = min(config.max_sources, batch.images.shape[1] - 1)
    nv = 1 + randint(generator, max_nv)
    S = cfg.image_size
    apply = (torch.rand(B * nv, generator=generator) < config.input_noise_prob).float()
    scale = apply * torch.rand(B * nv, generator=generator)
    input_noise = scale[:, None, None, None] * torch.randn(B * nv, 3, S, S, generator=generator)
    n = cfg.nerf
    R = cfg.render_size
    render = RenderDraws.draw(B, 2, R * R, n.num_steps, n.upsample_steps, True, generator)
    uncond = float(torch.rand(1, generator=generator)) < config.no_cond_prob
    D = cfg.diffusion_size
    uncond_noise = torch.rand(B, cfg.nerf.color_feat_dim, D, D, generator=generator) if uncond else None
    augment = bool(config.diff_augmentation_prob < 1.0 and
                   float(torch.rand(1, generator=generator)) > config.diff_augmentation_prob)
    mat, aug_cond = augmentation(B, D, D, generator, config.aug_prob)
    if not augment:
        aug_cond = torch.zeros_like(aug_cond)
    sigma = sample_density(cfg, B, generator)
    noise = torch.randn(B, 3, D, D, generator=generator)
    dropout_seed = int(torch.randint(1 << 62, (1,), generator=generator))
    return StepDraws(nv, input_noise, render, uncond, uncond_noise, augment, mat, aug_cond, sigma, noise,
                     dropout_seed)


def genvs_loss(model: GeNVS, batch: ViewBatch, draws: StepDraws, config: TrainConfig) -> Dict[str, torch.Tensor]:
    """The published objective on one batch; returns the weighted terms and their sum ``loss``."""
    cfg = model.config
    B, V = batch.images.shape[:2]
    nv = draws.nv
    device = batch.images.device
    sources = batch.images[:, :nv].reshape(B * nv, *batch.images.shape[2:])
    x = preprocess(fit_images(sources, cfg.image_size)) + draws.input_noise.to(device)
    volumes = model.input_unet(x).reshape(B, nv, -1, cfg.image_size, cfg.image_size)
    src = SourceViews(volumes, batch.poses[:, :nv], batch.camera_k)
    render_poses = torch.stack([batch.poses[:, 0], batch.poses[:, -1]], dim=1)
    intr = batch.intrinsics
    if bool((intr == intr[:1]).all()):
        feats, depth, opacity = model.render(src, render_poses, intr[0], draws=draws.render, random_importance=True)
    else:  # samples with other intrinsics: one render each
        parts = []
        for b in range(B):
            sv = SourceViews(volumes[b:b + 1], batch.poses[b:b + 1, :nv], batch.camera_k[b:b + 1])
            sub = RenderDraws(draws.render.jitter[b:b + 1],
                              None if draws.render.pdf_u is None else
                              draws.render.pdf_u.reshape(B, -1, draws.render.pdf_u.shape[-1])[b])
            parts.append(model.render(sv, render_poses[b:b + 1], intr[b], draws=sub, random_importance=True))
        feats, depth, opacity = [torch.cat(p) for p in zip(*parts)]
    cond = model.condition(feats).reshape(B, 2, *feats.shape[2:3], cfg.diffusion_size, cfg.diffusion_size)
    targets = fit_images(batch.images.reshape(B * V, *batch.images.shape[2:]), cfg.diffusion_size)
    targets = targets.reshape(B, V, 3, cfg.diffusion_size, cfg.diffusion_size)
    rgb = cond[:, :, :3]
    loss_rgb = (config.lambda_rgb_first * ((rgb[:, 0] - targets[:, 0]) ** 2).mean()
                + config.lambda_rgb_other * ((rgb[:, 1] - targets[:, -1]) ** 2).mean())
    loss_opacity = config.lambda_opacity * opacity.mean()
    camera_d = batch.camera_d.to(device=device, dtype=depth.dtype).reshape(B, 1, 1, 1, 1)
    loss_depth = config.lambda_depth * (opacity * (depth / (opacity + 1e-6) - camera_d) ** 2).mean()
    zero = feats.new_zeros(())
    loss_mask = zero
    if config.lambda_mask:
        if batch.masks is None:
            raise ValueError("lambda_mask needs object masks in the training data (procedural scenes have them; "
                             "give NVS_MULTIVIEWs with masks)")
        masks = torch.stack([batch.masks[:, 0], batch.masks[:, -1]], dim=1).to(opacity)
        masks = F.adaptive_avg_pool2d(masks.flatten(0, 1), opacity.shape[-2:]).reshape(opacity.shape)
        loss_mask = config.lambda_mask * ((opacity - masks) ** 2).mean()
    loss_diffusion = zero
    if config.lambda_diffusion:
        target, image = targets[:, -1], cond[:, 1]
        aug_cond = draws.aug_cond.to(device)
        if draws.augment:
            mat = draws.aug_mat.to(device)
            target, image = apply_augmentation(target, mat), apply_augmentation(image, mat)
        if draws.uncond:
            image = draws.uncond_noise.to(image)
        losses = model.ddpm_pipeline.loss(target, draws.noise.to(target), draws.sigma.to(target), unet_cond=image,
                                          aug_cond=aug_cond)
        loss_diffusion = config.lambda_diffusion * losses.mean()
    total = loss_diffusion + loss_rgb + loss_opacity + loss_depth + loss_mask
    terms = {"loss": total, "diffusion": loss_diffusion, "rgb": loss_rgb, "opacity": loss_opacity, "depth": loss_depth}
    if config.lambda_mask:
        terms["mask"] = loss_mask
    return terms


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, EMA.

def learning_rate_factor(step: int, restart_steps: int, warmup_steps: int = 0, base: float = 1.0,
                         eta_min: float = 1e-8) -> float:
    """Cosine annealing with warm restarts (period ``restart_steps``) times a linear warm-up; the
    learning rate for the step that follows ``step`` finished steps, for a group with base lr ``base``."""
    t = step % restart_steps
    lr = eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / restart_steps)) / 2
    if warmup_steps > 0:
        lr *= min((step + 1) / warmup_steps, 1.0)
    return lr


def make_optimizer(model: GeNVS, config: TrainConfig) -> torch.optim.AdamW:
    groups = [{"params": list(getattr(model, name).parameters()), "lr": config.lr * config.lr_ratios[name],
               "name": name} for name in MODULES]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=config.weight_decay)


def set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> List[float]:
    lrs = []
    for group in optimizer.param_groups:
        base = config.lr * config.lr_ratios[group["name"]]
        group["lr"] = learning_rate_factor(step, config.restart_steps, config.warmup_steps, base, config.eta_min)
        lrs.append(group["lr"])
    return lrs


class EMA:
    """Exponential moving average of every parameter (buffers copied), decay warmed up as
    min(decay, (1 + t) / (10 + t)) so short runs are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, float(decay)
        self.ema = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int) -> None:
        beta = min(self.decay, (1 + step) / (10 + step))
        for p, e in zip(self.model.parameters(), self.ema.parameters()):
            e.lerp_(p.detach(), 1 - beta)

    @torch.no_grad()
    def get(self) -> torch.nn.Module:
        for b, e in zip(self.model.buffers(), self.ema.buffers()):
            e.copy_(b)
        return self.ema


def build_network(network: Dict[str, Any], seed: int, device="cpu") -> GeNVS:
    """A freshly initialised GeNVS (weights and the Fourier buffer fixed by ``seed``), trainable."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        model = build_genvs(GeNVSConfig.from_dict(network))
    return model.to(device).train(True).requires_grad_(True)


# --------------------------------------------------------------------------------------------
# Checkpoints.

def ema_config(config: TrainConfig, step: int) -> Dict[str, Any]:
    return {"method": METHOD, "class": NETWORK_CLASS, "constructor": copy.deepcopy(config.network),
            "meta": {"source": "nvs_core.genvs.training", "step": step, "ema_decay": config.ema_decay,
                     "scene_scale": 1.0,
                     "samples_seen": step * config.batch_size, "training": config.to_dict(),
                     "reproduce": config.reproduce}}


def save_ema(path: PathLike, model: torch.nn.Module, config: TrainConfig, step: int) -> Path:
    """The inference network in our converted format (``loading.load_genvs`` reads it)."""
    path = Path(path)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    save_with_config(path, state, ema_config(config, step))
    return path


def save_training_state(path: PathLike, model: GeNVS, optimizer: torch.optim.Optimizer, ema: EMA,
                        config: TrainConfig, step: int, losses: Sequence[float], skipped: int) -> Path:
    path = Path(path)
    tensors: Dict[str, torch.Tensor] = {f"net.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.ema.state_dict().items()})
    groups = pack_optimizer(optimizer, tensors)
    tensors["meta.step"] = torch.tensor(step, dtype=torch.int64)
    meta = {"step": step, "training": config.to_dict(), "param_groups": groups, "skipped_steps": skipped,
            "rng": {"scheme": "vivid.training.step_generator(seed, step)", "seed": config.seed},
            "losses": [float(x) for x in losses], "torch": torch.__version__}
    save_with_config(path, tensors, {"method": STATE_METHOD, "class": NETWORK_CLASS,
                                     "constructor": copy.deepcopy(config.network), "meta": meta})
    return path


def load_training_state(path: PathLike, model: GeNVS, optimizer: torch.optim.Optimizer, ema: EMA,
                        config: TrainConfig) -> tuple:
    """Restore what :func:`save_training_state` wrote; returns (step, losses, skipped)."""
    tensors, cfg = load_with_config(path)
    if cfg.get("method") != STATE_METHOD:
        raise CheckpointError(path, f"expected a GeNVS training state (method {STATE_METHOD!r}), "
                                    f"got {cfg.get('method')!r}")
    meta = cfg.get("meta", {})
    saved = meta.get("training", {})
    mine = config.to_dict()
    changed = [k for k in RECIPE_FIELDS if k in saved and saved[k] != mine[k]]
    if changed:
        raise CheckpointError(path, f"resuming with a different recipe ({', '.join(changed)}); "
                                    "start a new run (another output) or turn resume off")
    step = state_step(path, tensors, meta)
    model.load_state_dict(tensors_under(tensors, "net."), strict=True)
    ema.ema.load_state_dict(tensors_under(tensors, "ema."), strict=True)
    unpack_optimizer(optimizer, tensors, meta["param_groups"])
    return step, [float(x) for x in meta.get("losses", [])], int(meta.get("skipped_steps", 0))


# --------------------------------------------------------------------------------------------
# The loop.

@dataclass
class TrainResult:
    """``ema``: the exported inference net (eval mode, no grad); ``net``: the raw trained net."""

    ema: GeNVS
    net: GeNVS
    step: int
    losses: List[float]
    seconds: float
    skipped: int = 0
    ema_path: Optional[Path] = None
    state_path: Optional[Path] = None


def train_step(model: GeNVS, optimizer: torch.optim.Optimizer, batch: ViewBatch, draws: StepDraws,
               config: TrainConfig) -> Dict[str, float]:
    """One optimiser step; a non-finite loss skips the update (``skipped`` = 1 in the result)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(draws.dropout_seed)   # CPU dropout (the demo network has none)
        terms = genvs_loss(model, batch, draws, config)
    loss = terms["loss"]
    out = {k: float(v.detach()) for k, v in terms.items()}
    if not math.isfinite(out["loss"]):
        out["skipped"] = 1.0
        return out
    loss.backward()
    if config.force_finite:
        force_finite_(model.parameters())
    if config.grad_clip and config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    out["skipped"] = 0.0
    return out


def source_reconstruction_objective(config: TrainConfig) -> TrainConfig:
    """The objective of the first ``source_reconstruction_steps``: the first source view's RGB render
    against that view, plus the configured opacity (and mask) terms; no diffusion, depth or novel-view term."""
    return replace(config, lambda_rgb_first=1.0, lambda_rgb_other=0.0, lambda_depth=0.0, lambda_diffusion=0.0)


def train(config: Union[TrainConfig, Dict[str, Any]], progress: Optional[ProgressFactory] = None,
          callback: Optional[Callable[[Dict[str, Any]], None]] = None, data=None) -> TrainResult:
    """Train (or resume) a GeNVS network; see the module docstring for the objective.

    ``data``: a MultiView, a list of them, or a sample source with ``sample(count, generator)``;
    default: from ``config.data``. ``callback`` gets {step, loss, terms, lr, seconds} after every
    step. ``progress`` counts steps and checks for interruption after each; on interruption the
    training state is saved (when ``out_dir`` is set) before the exception propagates. Inside ComfyUI
    call it under ``torch.inference_mode(False)``.
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    if torch.is_inference_mode_enabled():
        raise RuntimeError("GeNVS training needs autograd: call train() under torch.inference_mode(False)")
    device = torch.device(config.device)
    source = view_source(data, config)
    model = build_network(config.network, config.seed, device)
    optimizer = make_optimizer(model, config)
    ema = EMA(model, config.ema_decay)
    out_dir = Path(config.out_dir) if config.out_dir else None
    state_path = out_dir / STATE_FILE if out_dir else None
    ema_path = out_dir / EMA_FILE if out_dir else None
    step, losses, skipped = 0, [], 0
    if config.resume and state_path is not None and state_path.is_file():
        step, losses, skipped = load_training_state(state_path, model, optimizer, ema, config)

    def checkpoint(step: int) -> None:
        save_training_state(state_path, model, optimizer, ema, config, step, losses, skipped)
        save_ema(ema_path, ema.get(), config, step)

    desc = "GeNVS training"
    start = time.perf_counter()
    cfg = model.config
    reconstruction = source_reconstruction_objective(config)

    def one_step(step: int) -> float:
        nonlocal skipped
        generator = step_generator(config.seed, step)
        batch = source.sample(config.batch_size, generator)
        draws = draw_step(config, cfg, batch, generator)
        lrs = set_learning_rates(optimizer, config, step)
        objective = reconstruction if step < config.source_reconstruction_steps else config
        terms = train_step(model, optimizer, batch.to(device), draws, objective)
        skipped += int(terms["skipped"])
        step += 1
        ema.update(step)
        losses.append(terms["loss"])
        if callback is not None:
            callback({"step": step, "loss": terms["loss"], "terms": terms, "lr": lrs,
                      "seconds": time.perf_counter() - start})
        return terms["loss"]

    step = step_loop(resolve(progress, config.total_steps, desc), desc, step, config.total_steps, one_step,
                     checkpoint if out_dir is not None else None, config.checkpoint_every)
    if out_dir is not None:
        checkpoint(step)
    exported = copy.deepcopy(ema.get()).to(torch.float32).train(False).requires_grad_(False)
    return TrainResult(exported, model, step, losses, time.perf_counter() - start, skipped,
                       ema_path if out_dir else None, state_path if out_dir else None)


# --------------------------------------------------------------------------------------------
# Command line.

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``genvs-train`` on an argparse subparsers object (``python -m nvs_core``)."""
    return register_cli(subparsers, "genvs-train", configure_parser, run_cli,
                        help="train a GeNVS network on multi-view data",
                        description="Train or resume a GeNVS network (published objective). Writes "
                                    "network-ema.safetensors (+ .json, loadable as a GeNVS model) and a "
                                    "resumable training-state into --out.")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    add_out_argument(parser)
    parser.add_argument("--preset", choices=["demo", "demo-recipe", "full"], default="demo",
                        help="network: demo (32 px), demo-recipe (the demo network with the committed demo "
                             "model's optimiser settings as defaults), full (the published 128-px network)")
    parser.add_argument("--network", default=None, help="JSON object merged over the preset's GeNVSConfig dict")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    parser.add_argument("--batch", type=int, default=None, help="samples per step")
    parser.add_argument("--lr", type=float, default=None, help=f"base learning rate (published {PUBLISHED_LR:g})")
    parser.add_argument("--lr-ratios", default=None,
                        help=f"JSON per-module lr multipliers (published {json.dumps(PUBLISHED_LR_RATIOS)})")
    parser.add_argument("--restart-steps", type=int, default=None, help="cosine warm-restart period in steps")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear lr warm-up")
    parser.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay (default {d.ema_decay})")
    parser.add_argument("--lambda-mask", type=float, default=None,
                        help="weight of the opacity-vs-object-mask term (ours, not published; default 0 = off)")
    parser.add_argument("--lambda-rgb-first", type=float, default=None,
                        help=f"weight of the first source view's RGB-render MSE (published {d.lambda_rgb_first:g})")
    parser.add_argument("--source-reconstruction-steps", type=int, default=None,
                        help="first N steps train encoder + field on the source-view reconstruction only, a stand-in "
                             "for the published ImageNet-initialised encoder (ours, not published; default 0 = off)")
    parser.add_argument("--folder", action="append", default=[], help="multi-view image folder (repeatable)")
    parser.add_argument("--srn", action="append", default=[], help="SRN cars_train instance folder (repeatable)")
    parser.add_argument("--procedural", default=None, help="JSON object of procedural data options merged over "
                        f"{json.dumps({k: v for k, v in DEMO_DATA.items() if k != 'kind'})}")
    parser.add_argument("--seed", type=int, default=None)
    add_run_arguments(parser, checkpoint_every=d.checkpoint_every, log_every=50)


def config_from_args(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> TrainConfig:
    from .config import full_config

    values: Dict[str, Any] = {}
    if args.preset == "full":
        network = full_config().to_dict()
    else:
        network = copy.deepcopy(DEMO_NETWORK)
        if args.preset == "demo-recipe":
            values.update(copy.deepcopy(DEMO_RECIPE))
    if args.network:
        extra = json.loads(args.network)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(network.get(key), dict):
                network[key].update(value)
            else:
                network[key] = value
    if args.folder:
        data: Dict[str, Any] = {"kind": "folders", "paths": list(args.folder)}
    elif args.srn:
        data = {"kind": "srn", "paths": list(args.srn)}
    else:
        data = copy.deepcopy(DEMO_DATA)
        if args.procedural:
            data.update(json.loads(args.procedural))
            data["kind"] = "procedural"
    for key, name in (("total_steps", "steps"), ("batch_size", "batch"), ("lr", "lr"),
                      ("restart_steps", "restart_steps"), ("warmup_steps", "warmup_steps"),
                      ("ema_decay", "ema_decay"), ("seed", "seed"), ("lambda_mask", "lambda_mask"), ("lambda_rgb_first", "lambda_rgb_first"),
                      ("source_reconstruction_steps", "source_reconstruction_steps")):
        value = getattr(args, name)
        if value is not None:
            values[key] = value
    if args.lr_ratios:
        values["lr_ratios"] = json.loads(args.lr_ratios)
    reproduce = shlex.join(["python", "-m", "nvs_core", "genvs-train", *argv]) if argv is not None else ""
    return TrainConfig(network=network, data=data, out_dir=args.out, checkpoint_every=args.checkpoint_every,
                       resume=not args.no_resume, device=args.device, reproduce=reproduce, **values)


def run_cli(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = config_from_args(args, cli_argv(args, "genvs-train"))
    result = train(config, progress=lambda total, desc: LossProgress(total, desc, args.log_every))
    print_summary(result, skipped=result.skipped)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main("python -m nvs_core.genvs.training", __doc__.splitlines()[0], configure_parser, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
