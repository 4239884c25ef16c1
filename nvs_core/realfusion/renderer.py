"""Rendering a RealFusion field: the published ``run_cuda`` in pure PyTorch, plus NVS_CAMERA renders.

Two paths, as published:
- **training** (``mode="train"``): every ray is marched at once into a compact sample list (padded to
  a multiple of 128 rows), the field runs on the whole list, compositing is differentiable; the
  normals image, ``loss_orient`` and (optionally) ``loss_smooth`` come with it; the background network
  colours what the object leaves uncovered; depth is the published (twice-offset) training depth;
- **evaluation** (``mode="eval"``): rays are marched in compaction rounds of ``n_step =
  max(min(N // n_alive, 8), 1)`` samples, finished rays drop out, background is a colour (white).

Both paths skip empty space with the field's occupancy bitfield; ``use_occupancy=False`` marches
every lattice step instead (the number of samples evaluated is reported in ``results["samples"]``).

Memory: evaluation runs in batches of ``ray_batch`` rays (default 16384). A compaction round marches
``n_alive * n_step <= ray_batch`` sample slots (plus at most 128 padding rows), so each round queries
the field on at most ``ray_batch + 128`` points (7 queries each when normals are composited): the peak
does not grow with the image size or the scene. Measured on CPU, float32, full-size field: a 512 x 512
render with normals peaks at about +90 MB over the loaded model with ``ray_batch=16384`` (a few MB with
4096) and takes about 110 s of one CPU core. The training path marches all its rays at once (96 x 96
in the published setup), so its memory grows with the number of samples.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch

from ..cameras import Cameras
from .cameras import nvs_rays_to_realfusion
from .field import RealFusionField, safe_normalize
from .raymarch import (composite_rays_eval, composite_rays_train, march_rays_eval, march_rays_train,
                       near_far_from_aabb)

DEFAULT_RAY_BATCH = 16384


def default_light(rays_o: torch.Tensor, draw: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The published random light: normalize(rays_o[0] + N(0, 1) draw), facing the camera."""
    o = rays_o.reshape(-1, 3)[0]
    if draw is None:
        draw = torch.randn(3, generator=generator, device=generator.device if generator is not None else "cpu")
    return safe_normalize(o + draw.to(o))


def render_rays(field: RealFusionField, rays_o: torch.Tensor, rays_d: torch.Tensor, *, mode: Optional[str] = None,
                shading: str = "albedo", ambient_ratio: float = 1.0, light_d: Optional[torch.Tensor] = None,
                bg_color: Union[None, float, torch.Tensor] = None, perturb: bool = False, force_all_rays: bool = True,
                max_steps: int = 512, T_thresh: float = 1e-4, min_near: float = 0.2, use_occupancy: bool = True,
                normals: bool = True, smooth_loss: bool = True, generator: Optional[torch.Generator] = None,
                march_noise: Optional[torch.Tensor] = None, smooth_noise: Optional[torch.Tensor] = None,
                ray_batch: int = DEFAULT_RAY_BATCH, return_samples: bool = False,
                interrupt: Optional[Callable[[], None]] = None) -> Dict[str, torch.Tensor]:
    """Render rays [..., 3] (RealFusion world). Returns image [..., 3], depth, weights_sum, mask, normals.

    ``mode`` defaults to ``"train"`` when the field is in training mode, else ``"eval"``.
    ``march_noise`` / ``smooth_noise`` replace the random draws of ``perturb`` and the smoothness loss.
    ``normals=False`` skips normals in albedo shading (faster previews; no normals image).
    ``interrupt`` is called before each evaluation batch of ``ray_batch`` rays (it raises to stop).
    """
    mode = mode or ("train" if field.training else "eval")
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    prefix = rays_o.shape[:-1]
    o = rays_o.reshape(-1, 3).float()
    d = rays_d.reshape(-1, 3).float()
    aabb = field.aabb_train if mode == "train" else field.aabb_infer
    nears, fars = near_far_from_aabb(o, d, aabb, min_near)
    if light_d is None:
        light_d = default_light(o, generator=generator)
    bitfield = field.density_bitfield if use_occupancy else None
    if mode == "train":
        results = _run_train(field, o, d, nears, fars, bitfield, shading, ambient_ratio, light_d, perturb,
                             force_all_rays, max_steps, T_thresh, normals, smooth_loss, generator, march_noise,
                             smooth_noise, return_samples)
    else:
        results = {}
        for start in range(0, o.shape[0], ray_batch):
            if interrupt is not None:
                interrupt()
            sl = slice(start, start + ray_batch)
            part = _run_eval(field, o[sl], d[sl], nears[sl], fars[sl], bitfield, shading, ambient_ratio, light_d,
                             perturb, max_steps, T_thresh, normals, generator, return_samples)
            for k, v in part.items():
                results.setdefault(k, []).append(v)
        merged = {}
        for k, v in results.items():
            if k in ("samples", "visits"):
                merged[k] = sum(v)
            elif k == "trace":
                merged[k] = [step for part in v for step in part]
            elif k == "trace_first_march":
                merged[k] = v[0]
            else:
                merged[k] = None if v[0] is None else torch.cat(v)
        results = merged
    ws = results["weights_sum"]
    if field.has_background and mode == "train":
        bg = field.background(d)
    elif bg_color is None:
        bg = 1
    else:
        bg = bg_color.to(ws) if isinstance(bg_color, torch.Tensor) else bg_color
    results["bg"] = bg
    image = results["image"] + (1 - ws).unsqueeze(-1) * bg
    results["image"] = image.reshape(*prefix, 3)
    results["depth"] = (torch.clamp(results["depth"] - nears, min=0) / (fars - nears)).reshape(*prefix)
    results["weights_sum"] = ws.reshape(*prefix)
    results["mask"] = (nears < fars).reshape(*prefix)
    results["nears"], results["fars"] = nears, fars
    results["light_d"] = light_d
    if results.get("normals") is not None:
        results["normals"] = results["normals"].reshape(*prefix, 3)
    return results


def _run_train(field, o, d, nears, fars, bitfield, shading, ratio, light_d, perturb, force_all_rays, max_steps,
               T_thresh, with_normals, smooth_loss, generator, march_noise, smooth_noise, return_samples):
    n = o.shape[0]
    counter = field.step_counter[field.local_step % 16]
    field.local_step += 1
    if perturb and march_noise is None:
        march_noise = torch.rand(n, generator=generator, device=generator.device if generator is not None else "cpu")
    samples = march_rays_train(o, d, field.bound, bitfield, field.grid_size, nears, fars,
                               march_noise.to(o.device) if perturb else None, max_steps, 128, field.mean_count,
                               force_all_rays)
    with torch.no_grad():
        counter.copy_(torch.tensor([samples.total, n], dtype=torch.int32))
    xyzs, dirs, deltas = samples.xyzs, samples.dirs, samples.deltas
    sigmas, rgbs, normals = field(xyzs, dirs, light_d, ratio=ratio, shading=shading,
                                  albedo_only=not with_normals)
    values = [rgbs] if normals is None else [rgbs, normals]
    weights_sum, depth, comp = composite_rays_train(sigmas, values, deltas, samples.rays, T_thresh)
    results = {"weights_sum": weights_sum, "depth": depth, "image": comp[0],
               "normals": comp[1] if normals is not None else None,
               "samples": int(xyzs.shape[0]), "samples_marched": samples.total, "visits": samples.visits}
    if normals is not None:
        weights = 1 - torch.exp(-sigmas)
        results["loss_orient"] = (weights.detach() * (normals * dirs).sum(-1).clamp(min=0) ** 2).mean()
        if smooth_loss:
            if smooth_noise is None:
                smooth_noise = torch.randn(xyzs.shape, generator=generator,
                                           device=generator.device if generator is not None else "cpu")
            perturbed = field.normal(xyzs + smooth_noise.to(xyzs) * 1e-2)
            results["loss_smooth"] = (normals - perturbed).abs().mean()
    if return_samples:
        results.update(xyzs=xyzs, dirs=dirs, deltas=deltas, rays=samples.rays, sigmas=sigmas, rgbs=rgbs,
                       sample_normals=normals, composite_image=comp[0], composite_depth=depth)
    return results


def _run_eval(field, o, d, nears, fars, bitfield, shading, ratio, light_d, perturb, max_steps, T_thresh,
              with_normals, generator, return_samples):
    n = o.shape[0]
    device = o.device
    weights_sum = torch.zeros(n, device=device)
    depth = torch.zeros(n, device=device)
    image = torch.zeros(n, 3, device=device)
    want_normals = with_normals or shading != "albedo"
    image_normals = torch.zeros(n, 3, device=device) if want_normals else None
    rays_alive = torch.arange(n, dtype=torch.int32, device=device)
    rays_t = nears.clone()
    step, evaluated, visits, trace, first = 0, 0, 0, [], None
    with torch.no_grad():
        while step < max_steps:
            n_alive = rays_alive.numel()
            if n_alive <= 0:
                break
            n_step = max(min(n // n_alive, 8), 1)
            noise = None
            if perturb and step == 0:
                noise = torch.rand(n_alive, generator=generator,
                                   device=generator.device if generator is not None else "cpu").to(device)
            xyzs, dirs, deltas, v = march_rays_eval(n_step, rays_alive, rays_t, o, d, field.bound, bitfield,
                                                    field.grid_size, fars, noise, max_steps)
            if first is None:
                first = (xyzs, deltas)
            sigmas, rgbs, normals = field(xyzs, dirs, light_d, ratio=ratio, shading=shading,
                                          albedo_only=not want_normals)
            values = [rgbs] if normals is None else [rgbs, normals]
            images = [image] if normals is None else [image, image_normals]
            composite_rays_eval(n_step, rays_alive, rays_t, sigmas, values, deltas, weights_sum, depth, images,
                                T_thresh)
            trace.append((n_alive, n_step))
            evaluated += xyzs.shape[0]
            visits += v
            rays_alive = rays_alive[rays_alive >= 0]
            step += n_step
    out = {"weights_sum": weights_sum, "depth": depth, "image": image, "normals": image_normals,
           "samples": evaluated, "visits": visits}
    if return_samples:
        out["trace"] = trace
        out["trace_first_march"] = first
    return out


# ------------------------------------------------------------------------------ NVS_CAMERA renders

def render_cameras(field: RealFusionField, cameras: Cameras, height: Optional[int] = None,
                   width: Optional[int] = None, *, shading: str = "albedo", ambient_ratio: float = 1.0,
                   light_d: Optional[torch.Tensor] = None, bg_color: Union[float, torch.Tensor] = 1.0,
                   normals: bool = True, use_occupancy: bool = True, ray_batch: int = DEFAULT_RAY_BATCH,
                   progress=None, interrupt=None) -> Dict[str, torch.Tensor]:
    """Evaluation renders of ``NVS_CAMERA`` views: image [B, H, W, 3], depth [B, H, W] (normalised
    per ray to [0, 1] between the box's near and far), alpha [B, H, W], normals [B, H, W, 3] in [0, 1]
    (composited world normals mapped to (n + alpha) / 2, NVS world; 0 on the background) or None.

    Rays are converted to RealFusion's x-mirrored world, so a fitted field renders its input photo
    upright from the NVS camera of the input view. ``light_d`` (NVS world) defaults to the camera.
    """
    height, width = height or cameras.height, width or cameras.width
    device = field.aabb_infer.device
    out = {"image": [], "depth": [], "alpha": [], "normals": []}
    for i in range(len(cameras)):
        if interrupt is not None:
            interrupt()
        o, d = cameras[i].rays(height, width, dtype=torch.float32, device=device)
        o, d = nvs_rays_to_realfusion(o.reshape(-1, 3), d.reshape(-1, 3))
        light = safe_normalize(o[0]) if light_d is None else nvs_rays_to_realfusion(
            light_d.reshape(1, 3).to(o), light_d.reshape(1, 3).to(o))[0][0]
        res = render_rays(field, o, d, mode="eval", shading=shading, ambient_ratio=ambient_ratio, light_d=light,
                          bg_color=bg_color, normals=normals, use_occupancy=use_occupancy, ray_batch=ray_batch,
                          interrupt=interrupt)
        out["image"].append(res["image"].reshape(height, width, 3))
        out["depth"].append(torch.nan_to_num(res["depth"], nan=1.0).reshape(height, width))
        out["alpha"].append(res["weights_sum"].reshape(height, width))
        if res.get("normals") is not None:
            n = res["normals"].reshape(height, width, 3)
            n = n * torch.tensor([-1.0, 1.0, 1.0], device=n.device)  # back to the NVS world
            out["normals"].append((n + res["weights_sum"].reshape(height, width, 1)) / 2)  # premultiplied
        if progress is not None:
            progress(i + 1, len(cameras))
    return {k: (torch.stack(v) if v else None) for k, v in out.items()}
