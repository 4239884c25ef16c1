"""RealFusion's reconstruction stage (``nerf/trainer.py``): fit a field to one photo with SDS, plus optional
multi-view supervision, in pure PyTorch.

Every step (published defaults, research Part C6/C7):

- **synthetic view** (when SDS is on): a random camera (``rand_poses``, radius U(1, 1.5), fovy U(40, 70),
  96 x 96), shading by the schedule (albedo before step 1000, then 20 % albedo / 40 % textureless /
  40 % lambertian), SDS with the direction prompt at CFG 100, and the regularisers entropy (1e-4),
  orientation (1e-2) and 2-D normal smoothness (0.5);
- **input view**: 4096 random pixels of the 128 x 128 RGBA input (camera radius 1.8, theta 75, fovy 55,
  annealed camera noise 0.001 (1 - step / iters)), ``5 MSE(rgb a, gt a) + 0.5 MSE(ws, a)``;
- **multi-view** (optional, not published): the same two losses on random pixels of an ``NVS_MULTIVIEW``
  at its own cameras, times ``multiview_weight``;
- Adam (betas 0.9/0.99, eps 1e-15), grid parameters at 10x the learning rate (1e-2 / 1e-3), constant lr;
- the last ``grid_levels_mask`` grid levels are zeroed up to step ``grid_levels_mask_iters`` (3000);
- the occupancy grid is refreshed every 16 steps (it starts empty, so steps 1-15 render background);
- EMA (decay 0.95 with ``use_num_updates``) updated once per 100-step "epoch"; as published the result
  (and ``df.pth``) holds the *live* weights, the EMA copy is kept in the run state (``final_weights='ema'``
  returns it instead).

Presets:

- ``published``: the quirks as coded. (1) camera "replacement": on 9 of 10 steps (``step % 10 != 0``) the
  synthetic view keeps its random rays plus N(0, 0.02^2) noise on origins and directions and uses the
  *front-view* prompt; (2) fp16 GradScaler weighting: SDS enters the gradient unscaled while the other
  losses are multiplied by the loss scale S (65536, doubled every 2000 finite steps), so after unscaling
  SDS is weighted 1/S (emulated on CPU, exact with the GradScaler on CUDA fp16); (3) a 4-entry annealed
  value ``[a, b, end, fn]`` is constant; (4) input-view rays use capped marching (``force_all_rays=False``).
- ``fixed``: the evident intent. Direction prompts on every step, no synthetic camera noise, SDS at its
  weight ``lambda_prior`` relative to the other losses, annealed values follow the step, all input rays
  marched.

SDS off (``guidance=None``): pure multi-view / input-view fitting (the CPU demo).

Non-finite SDS gradient entries are counted (``nan_to_num`` zeroes them, as published) and reported; a step
whose parameter gradients are not finite is skipped (what the GradScaler does under fp16) and counted.
Interrupts raised by the progress reporter end the loop; the run state is saved (when a run folder is
given) and the result says ``interrupted``. Mixed precision (``autocast``): "auto" is fp16 autocast with a
GradScaler on CUDA and float32 on CPU; "fp16" (with a GradScaler) and "bf16" run under autocast on any device
(on CPU slower than float32, but the very code path CUDA takes); "fp32" never autocasts.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ..checkpoints import atomic_path
from ..progress import ProgressFactory, resolve
from .cameras import (InputView, RandomSource, gather_pixels, jitter_rays, nvs_rays_to_realfusion, prepare_rgba,
                      real_camera_noise_scale, sample_training_view)
from .field import RealFusionField
from .losses import (EMA, AnnealedValue, LossWeights, annealed_value, input_view_losses, replaces_camera,
                     shading_for_step, synthetic_view_losses)
from .renderer import render_rays
from .sds import SDSGuidance

log = logging.getLogger(__name__)

PRESETS = ("published", "fixed")
AUTOCAST_CHOICES = ("auto", "fp16", "bf16", "fp32")
STATE_FILE = "train_state.pt"
FIELD_FILE = "field.safetensors"
GRADSCALER_INIT, GRADSCALER_GROWTH_INTERVAL = 65536.0, 2000


@dataclass
class TrainConfig:
    preset: str = "published"
    iters: int = 5000
    lr: float = 1e-3
    seed: int = 101
    synthetic_size: int = 96                 # HW_synthetic
    input_size: int = 128                    # the input photo is resized to this
    num_rays: int = 4096                     # input-view rays per step
    input_view: InputView = dc_field(default_factory=InputView)
    lambda_prior: AnnealedValue = 1.0        # SDS weight (lambda_grad)
    weights: LossWeights = dc_field(default_factory=LossWeights)
    albedo_iters: int = 1000
    grid_levels_mask: Optional[int] = None   # None: half the levels (8 of the published 16)
    grid_levels_mask_iters: int = 3000
    ema_decay: float = 0.95
    ema_every: int = 100
    final_weights: str = "live"              # "live" (published df.pth) or "ema"
    occupancy_every: int = 16
    use_occupancy: bool = True
    max_steps: int = 512
    real_camera_noise: float = 0.001
    replaced_camera_noise: float = 0.02
    multiview_weight: float = 1.0
    multiview_rays: int = 4096
    scene_scale: float = 1.0                 # NVS world -> field world scale for multi-view cameras
    preview_every: int = 100
    preview_size: int = 64
    checkpoint_every: int = 500
    autocast: str = "auto"
    # None: decided by the preset (see the module doc)
    replace_camera: Optional[bool] = None
    fp16_sds_weighting: Optional[bool] = None
    annealed_published: Optional[bool] = None
    capped_input_rays: Optional[bool] = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        if self.final_weights not in ("live", "ema"):
            raise ValueError(f"final_weights must be 'live' or 'ema', got {self.final_weights!r}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        published = self.preset == "published"
        for name in ("replace_camera", "fp16_sds_weighting", "annealed_published", "capped_input_rays"):
            if getattr(self, name) is None:
                setattr(self, name, published)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    field: RealFusionField
    global_step: int
    history: List[Dict[str, float]]
    sds_nonfinite: int = 0        # non-finite SDS gradient entries (zeroed by nan_to_num)
    sds_nonfinite_steps: int = 0  # steps that had any
    skipped_steps: int = 0        # steps skipped because the parameter gradients were not finite
    interrupted: bool = False
    interrupt: Optional[BaseException] = None
    ema: Optional[EMA] = None

    def summary(self) -> str:
        last = self.history[-1] if self.history else {}
        parts = [f"step {self.global_step}"]
        parts += [f"{k} {v:.4g}" for k, v in last.items() if k != "step"]
        parts.append(f"non-finite SDS gradient values {self.sds_nonfinite} (in {self.sds_nonfinite_steps} steps)")
        parts.append(f"skipped steps {self.skipped_steps}")
        if self.interrupted:
            parts.append("interrupted")
        return "; ".join(parts)


# ------------------------------------------------------------------------------ data preparation

@dataclass
class _Views:
    """Rays and targets of a set of supervised views (the input view, or a multi-view set)."""

    rays_o: torch.Tensor   # [R, 3] (RealFusion world)
    rays_d: torch.Tensor   # [R, 3]
    rgba: torch.Tensor     # [R, 4] not premultiplied; alpha 1 where no mask is known
    has_mask: bool


def input_rgba(image: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An RGBA photo [H, W, 4] from an image [H, W, 3|4] in 0..1 and an optional coverage mask [H, W].

    Refuses a missing alpha, an empty mask and an all-ones mask (the method needs the object's silhouette).
    """
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image [H, W, 3 or 4], got shape {tuple(image.shape)}")
    if mask is None:
        if image.shape[-1] != 4:
            raise ValueError("the input image has no alpha channel and no mask was given: RealFusion needs the "
                             "object's silhouette (connect a MASK, e.g. from a background-removal node)")
        alpha = image[..., 3]
    else:
        if tuple(mask.shape) != tuple(image.shape[:2]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the image {tuple(image.shape[:2])}")
        alpha = mask.to(image)
    covered = float(alpha.clamp(0, 1).mean())
    if float(alpha.max()) <= 0.01:
        raise ValueError("the object mask is empty (no pixel covered): expected the object's silhouette")
    if float(alpha.min()) >= 0.99:
        raise ValueError("the object mask covers the whole image (all ones): expected the object's silhouette on "
                         "a background; check that the mask is not inverted")
    if covered > 0.98:
        log.warning("the object covers %.1f%% of the image", 100 * covered)
    return torch.cat([image[..., :3], alpha[..., None].clamp(0, 1)], -1).float()


def _input_view_data(rgba: torch.Tensor, view: InputView, device) -> torch.Tensor:
    return prepare_rgba(rgba, view.size).to(device)  # [1, S, S, 4]


def _multiview_data(multiview, scale: float, device) -> _Views:
    images = multiview.images.float()
    n, h, w = images.shape[:3]
    o, d = multiview.cameras.rays(h, w, dtype=torch.float32, device="cpu")
    o, d = nvs_rays_to_realfusion(o.reshape(-1, 3) * scale, d.reshape(-1, 3))
    has_mask = multiview.masks is not None
    alpha = multiview.masks.float() if has_mask else torch.ones(n, h, w)
    rgba = torch.cat([images, alpha[..., None]], -1).reshape(-1, 4)
    return _Views(o.to(device), d.to(device), rgba.to(device), has_mask)


# ------------------------------------------------------------------------------ precision

def _autocast_dtype(choice: str, device: torch.device) -> Optional[torch.dtype]:
    if choice == "fp32" or (choice == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16 if choice == "bf16" else torch.float16


class _LossScale:
    """The loss scale of a GradScaler (real under CUDA fp16, emulated otherwise for the published weighting)."""

    def __init__(self, scaler: Optional["torch.amp.GradScaler"]):
        self.scaler = scaler
        self.emulated = GRADSCALER_INIT
        self.finite_steps = 0

    @property
    def value(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else self.emulated

    def finite_step(self) -> None:
        self.finite_steps += 1
        if self.finite_steps % GRADSCALER_GROWTH_INTERVAL == 0:
            self.emulated *= 2.0

    def overflow(self) -> None:
        self.finite_steps = 0
        self.emulated /= 2.0


# ------------------------------------------------------------------------------ checkpoints

def save_run(run_dir: Union[str, Path], field: RealFusionField, optimizer, ema: EMA, source: RandomSource,
             step: int, config: TrainConfig, scale: _LossScale, counters: Dict[str, int]) -> None:
    """Write the field (``field.safetensors`` + ``.json``) and the training state (``train_state.pt``)."""
    from .loading import save_field

    run_dir = Path(run_dir)
    save_field(run_dir / FIELD_FILE, field, meta={"global_step": step, "preset": config.preset})
    state = {"global_step": step, "preset": config.preset, "iters": config.iters,
             "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
             "torch_rng": source.generator.get_state(), "python_rng": source.py.getstate(),
             "loss_scale": scale.emulated, "finite_steps": scale.finite_steps,
             "grid_levels_mask": int(field.grid_levels_mask), "iter_density": int(field.iter_density),
             "local_step": int(field.local_step), "counters": dict(counters)}
    with atomic_path(run_dir / STATE_FILE) as tmp:
        torch.save(state, tmp)


def load_run(run_dir: Union[str, Path], field: RealFusionField, optimizer, ema: EMA, source: RandomSource,
             config: TrainConfig, scale: _LossScale) -> Tuple[int, Dict[str, int]]:
    """Restore a run written by :func:`save_run`; returns (global step, counters)."""
    from ..checkpoints import CheckpointError, load_torch_weights
    from .loading import load_field_weights, read_field_checkpoint

    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    state = load_torch_weights(state_path)
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(state_path, "expected a RealFusion training state (global_step, optimizer, ema, ...)")
    if state.get("preset") != config.preset:
        raise CheckpointError(state_path, f"this run used preset {state.get('preset')!r}, not {config.preset!r}; "
                                          "use another run folder or the same preset")
    ckpt = read_field_checkpoint(run_dir / FIELD_FILE)
    if ckpt.config.to_dict() != field.config.to_dict():
        raise CheckpointError(run_dir / FIELD_FILE, "the saved field has another configuration than this run")
    load_field_weights(field, {k: v.to(field.aabb_train.device) for k, v in ckpt.state_dict.items()},
                       run_dir / FIELD_FILE)
    field.mean_density, field.mean_count = ckpt.mean_density, ckpt.mean_count
    field.grid_levels_mask = int(state["grid_levels_mask"])
    field.iter_density, field.local_step = int(state["iter_density"]), int(state["local_step"])
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    source.generator.set_state(state["torch_rng"])
    source.py.setstate(_as_tuple(state["python_rng"]))
    scale.emulated, scale.finite_steps = float(state["loss_scale"]), int(state["finite_steps"])
    return int(state["global_step"]), dict(state.get("counters") or {})


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------ the loop

def default_levels_mask(field: RealFusionField, config: TrainConfig) -> int:
    return config.grid_levels_mask if config.grid_levels_mask is not None else field.config.grid_levels // 2


@torch.no_grad()
def preview_render(field: RealFusionField, view: InputView, size: int, device) -> torch.Tensor:
    """An evaluation render [size, size, 3] of the input view (albedo, white background)."""
    small = dataclasses.replace(view, size=size)
    rays = small.rays(device=device)
    out = render_rays(field, rays["rays_o"][0], rays["rays_d"][0], mode="eval", shading="albedo", bg_color=1.0,
                      normals=False)
    return out["image"].reshape(size, size, 3).clamp(0, 1).float().cpu()


def train(field: RealFusionField, *, rgba: Optional[torch.Tensor] = None, multiview=None,
          guidance: Optional[SDSGuidance] = None, config: Optional[TrainConfig] = None,
          device: Union[str, torch.device, None] = None, progress: Optional[ProgressFactory] = None,
          on_preview: Optional[Callable[[int, torch.Tensor], None]] = None,
          run_dir: Union[str, Path, None] = None, resume: bool = True) -> TrainResult:
    """Fit ``field`` in place (see the module doc) and return a :class:`TrainResult`.

    ``rgba`` [H, W, 4] (see :func:`input_rgba`) is the input photo at ``config.input_view``; ``multiview`` an
    ``NVS_MULTIVIEW`` whose cameras live in the NVS world scaled by ``config.scene_scale`` (the input view is
    the NVS camera ``config.input_view.camera()``: azimuth 0, elevation 15 degrees, radius 1.8).
    ``guidance`` None turns SDS (and the synthetic view) off. ``run_dir`` makes the run resumable: the field
    and training state are written there every ``checkpoint_every`` steps, at the end and on interrupt.
    """
    config = config or TrainConfig()
    if rgba is None and multiview is None:
        raise ValueError("nothing to fit: give an input image (rgba) and/or multi-view supervision")
    if guidance is not None and rgba is None and multiview is None:
        raise ValueError("SDS needs an input view or multi-view supervision to anchor the object")
    device = torch.device(device) if device is not None else field.aabb_train.device
    field.to(device)
    field.train(True)
    source = RandomSource(config.seed, device=device)
    generator = source.generator
    optimizer = torch.optim.Adam(field.param_groups(config.lr), betas=(0.9, 0.99), eps=1e-15)
    ema = EMA(field.parameters(), decay=config.ema_decay)
    amp_dtype = _autocast_dtype(config.autocast, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    scale = _LossScale(scaler)
    published_anneal = bool(config.annealed_published)
    levels_mask = default_levels_mask(field, config)
    field.grid_levels_mask = levels_mask

    target = _input_view_data(rgba, config.input_view, device) if rgba is not None else None
    mv = _multiview_data(multiview, config.scene_scale, device) if multiview is not None else None

    start, counters = 0, {"sds_nonfinite": 0, "sds_nonfinite_steps": 0, "skipped_steps": 0}
    if run_dir is not None and resume and (Path(run_dir) / STATE_FILE).is_file():
        start, saved = load_run(run_dir, field, optimizer, ema, source, config, scale)
        counters.update(saved)
        log.info("resuming RealFusion training from %s at step %d", run_dir, start)
    history: List[Dict[str, float]] = []
    result = TrainResult(field, start, history, ema=ema)
    if start >= config.iters:
        _finish(field, ema, config)
        result.__dict__.update(counters)
        return result

    bar = resolve(progress, config.iters, "RealFusion reconstruction")
    bar.done = start
    step = start
    try:
        for step in range(start + 1, config.iters + 1):
            if config.use_occupancy and step % config.occupancy_every == 0:
                field.update_occupancy(generator=generator)
            if levels_mask and step > config.grid_levels_mask_iters:
                field.grid_levels_mask = 0
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses, sds = _losses(field, step, config, source, guidance, target, mv, published_anneal)
            total = sum(losses.values()) if losses else torch.zeros((), device=device)
            objective = total.float()
            if sds is not None:
                weight = 1.0 / scale.value if config.fp16_sds_weighting else 1.0
                if scaler is not None:  # SDS bypasses the scaler: add it after scaling the rest
                    objective = scaler.scale(objective) + sds.surrogate * (weight * scale.value)
                else:
                    objective = objective + sds.surrogate * weight
                if sds.nonfinite:
                    counters["sds_nonfinite"] += sds.nonfinite
                    counters["sds_nonfinite_steps"] += 1
                    log.warning("step %d: %d non-finite SDS gradient values (zeroed)", step, sds.nonfinite)
            elif scaler is not None:
                objective = scaler.scale(objective)
            if objective.requires_grad:
                objective.backward()
            finite = all(torch.isfinite(p.grad).all() for p in field.parameters() if p.grad is not None)
            if scaler is not None:
                scaler.step(optimizer)  # skips the step itself when the gradients are not finite
                scaler.update()
            elif finite:
                optimizer.step()
            if finite:
                scale.finite_step()
            else:
                scale.overflow()
                counters["skipped_steps"] += 1
            if step % config.ema_every == 0:
                ema.update()
            record = {"step": step, "loss": float(total.detach())}
            record.update({k: float(v.detach()) for k, v in losses.items()})
            if sds is not None:
                record["sds"] = sds.loss
                record["t"] = sds.t
            history.append(record)
            result.global_step = step
            if on_preview is not None and config.preview_every > 0 and (step % config.preview_every == 0
                                                                        or step == config.iters):
                on_preview(step, preview_render(field, config.input_view, config.preview_size, device))
            if run_dir is not None and config.checkpoint_every > 0 and step % config.checkpoint_every == 0:
                save_run(run_dir, field, optimizer, ema, source, step, config, scale, counters)
            try:
                bar.update()
            except BaseException as e:  # the host's interrupt (ComfyUI's own exception or Interrupted)
                result.interrupted, result.interrupt = True, e
                break
    finally:
        bar.close()
    if run_dir is not None and result.global_step > start:
        save_run(run_dir, field, optimizer, ema, source, result.global_step, config, scale, counters)
    result.__dict__.update(counters)
    _finish(field, ema, config)
    return result


def _finish(field: RealFusionField, ema: EMA, config: TrainConfig) -> None:
    if config.final_weights == "ema" and ema.num_updates > 0:
        ema.copy_to()
    field.grid_levels_mask = 0
    field.train(False)


def _losses(field, step, config: TrainConfig, source: RandomSource, guidance: Optional[SDSGuidance],
            target: Optional[torch.Tensor], mv: Optional[_Views], published_anneal: bool):
    losses: Dict[str, torch.Tensor] = {}
    sds = None
    weights = config.weights
    device = field.aabb_train.device
    generator = source.generator
    if guidance is not None:
        H = W = config.synthetic_size
        u = source.random()
        shading, ratio = shading_for_step(step, u, config.albedo_iters)
        view = sample_training_view(source, H, W)
        o, d = view["rays_o"].to(device), view["rays_d"].to(device)
        label = int(view["dir"][0])
        if config.replace_camera and replaces_camera(step):
            o, d = jitter_rays(o, d, config.replaced_camera_noise, source)
            label = 0  # the front-view prompt, as coded
        out = render_rays(field, o[0], d[0], mode="train", shading=shading, ambient_ratio=ratio, perturb=True,
                          force_all_rays=True, max_steps=config.max_steps, generator=generator,
                          use_occupancy=config.use_occupancy, normals=True, smooth_loss=weights.smooth > 0)
        image = out["image"].reshape(1, H, W, 3).permute(0, 3, 1, 2).float()
        lam = annealed_value(config.lambda_prior, step, config.iters, published_anneal)
        sds = guidance.step(image, label, lambda_grad=lam, generator=generator)
        losses.update(synthetic_view_losses(out["weights_sum"].float(), _f(out.get("normals")),
                                            _f(out.get("loss_orient")), _f(out.get("loss_smooth")), 1, H, W, weights))
    if target is not None:
        view = config.input_view
        rays = view.rays(N=config.num_rays, source=source, device=device)
        noise = real_camera_noise_scale(step, config.iters, config.real_camera_noise)
        o, d = jitter_rays(rays["rays_o"], rays["rays_d"], noise, source)
        gt = gather_pixels(target, rays["inds"])
        out = render_rays(field, o[0], d[0], mode="train", shading="albedo", perturb=True,
                          force_all_rays=not config.capped_input_rays, max_steps=config.max_steps,
                          generator=generator, use_occupancy=config.use_occupancy, normals=False, smooth_loss=False)
        losses.update(input_view_losses(out["image"][None].float(), out["weights_sum"][None].float(), gt, weights))
    if mv is not None and config.multiview_weight > 0:
        inds = torch.randint(0, mv.rays_o.shape[0], (config.multiview_rays,), generator=generator).to(device)
        out = render_rays(field, mv.rays_o[inds], mv.rays_d[inds], mode="train", shading="albedo", perturb=True,
                          force_all_rays=True, max_steps=config.max_steps, generator=generator,
                          use_occupancy=config.use_occupancy, normals=False, smooth_loss=False)
        gt = mv.rgba[inds][None]
        if mv.has_mask:
            part = input_view_losses(out["image"][None].float(), out["weights_sum"][None].float(), gt, weights)
        else:  # no silhouettes: the composited colour only
            part = {"real_image": weights.image * torch.nn.functional.mse_loss(out["image"][None].float(),
                                                                               gt[..., :3])}
        for k, v in part.items():
            losses["multiview_" + k.split("_", 1)[1]] = config.multiview_weight * v
    return losses, sds


def _f(x):
    return x.float() if isinstance(x, torch.Tensor) else x
