"""``python -m nvs_core demo --method field``: fit a RealFusion field (no SDS) to 24 views of a procedural object
on a CPU, then render held-out views, an orbit and a mesh.

The object is a procedural scene (:mod:`nvs_core.procedural`) scaled by ``SCENE_SCALE`` into RealFusion's box.
Training views: 24 cameras on four elevation rings (-20, 10, 40, 70 degrees) x 6 azimuths; held-out views: 8
cameras at elevation 25 degrees between the training azimuths. The field is fitted with
:func:`nvs_core.realfusion.training.train` in its SDS-off mode (multi-view reconstruction losses only), with a
reduced field for CPU speed (``DEMO_FIELD``: 8 grid levels, 2^14 rows per level, finest resolution 96,
hidden width 32; the published field has 16 levels, 2^16 rows, finest 1537, width 64) and ``max_steps`` 256.

Writes ``orbit.gif`` (render | ground truth), ``mesh.glb`` (vertex colours, NVS/glTF frame, via
:mod:`.mesh`), ``field.safetensors`` (+ ``.json``) and ``metrics.json``:
``{"model": {"psnr", "ssim"}, "copy_source": {"psnr", "ssim"}, "chamfer": ...}`` where PSNR/SSIM are over the
8 held-out views (full images on white), ``copy_source`` predicts each held-out view by the nearest training
view's image, and ``chamfer`` is the symmetric mean nearest-neighbour distance between points sampled on the
mesh and points on the true surface (ray hits on the analytic primitives), as a fraction of the true bounding
box diagonal.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..cameras import Cameras
from ..imageio import save_gif
from ..metrics import masked_psnr, masked_ssim
from ..procedural import intersect, make_scene, render_multiview
from ..progress import ProgressFactory
from .field import FieldConfig, RealFusionField
from .loading import save_field
from .cameras import nvs_rays_to_realfusion
from .renderer import render_rays
from .training import TrainConfig, train

PathLike = Union[str, Path]
SCENE_SCALE = 0.55          # NVS world units -> field units (the scene fits a radius-1 ball; the box is +-0.75)
RADIUS = 2.6                # camera distance (NVS units)
FOV_DEG = 45.0
TRAIN_ELEVATIONS = (-20.0, 10.0, 40.0, 70.0)
TRAIN_AZIMUTHS = 6
HELD_OUT = 8
DEMO_FIELD = dict(grid_levels=8, log2_hashmap_size=14, desired_resolution=96, hidden_dim=32, hidden_dim_bg=32,
                  grid_size=64, grid_levels_mask=0)


def demo_cameras(size: int):
    """(training cameras [24], held-out cameras [8]) around the origin, NVS world."""
    elev, azim = [], []
    for ring, e in enumerate(TRAIN_ELEVATIONS):
        for k in range(TRAIN_AZIMUTHS):
            elev.append(e)
            azim.append(360.0 * k / TRAIN_AZIMUTHS + 30.0 * (ring % 2))
    train_cams = Cameras.from_spherical(torch.deg2rad(torch.tensor(elev, dtype=torch.float64)),
                                        torch.deg2rad(torch.tensor(azim, dtype=torch.float64)), RADIUS,
                                        math.radians(FOV_DEG), size, size)
    held = torch.tensor([360.0 * k / HELD_OUT + 15.0 for k in range(HELD_OUT)], dtype=torch.float64)
    test_cams = Cameras.from_spherical(math.radians(25.0), torch.deg2rad(held), RADIUS, math.radians(FOV_DEG),
                                       size, size)
    return train_cams, test_cams


def scaled(cameras: Cameras, scale: float) -> Cameras:
    """The same cameras in a world scaled by ``scale`` (positions scaled, intrinsics kept)."""
    c2w = cameras.c2w.clone()
    c2w[:, :3, 3] *= scale
    return Cameras(c2w, cameras.intrinsics, cameras.width, cameras.height)


def surface_points(scene, count: int = 20000, seed: int = 0) -> torch.Tensor:
    """Points on the scene's true surface: hits of random rays cast at the objects (float64, NVS world)."""
    g = torch.Generator().manual_seed(seed)
    pts = []
    total = 0
    while total < count:
        n = 4 * count
        origins = torch.randn(n, 3, generator=g, dtype=torch.float64)
        origins = 3.0 * origins / origins.norm(dim=-1, keepdim=True)
        targets = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * 1.1
        d = targets - origins
        d = d / d.norm(dim=-1, keepdim=True)
        hits = intersect(scene, origins, d)
        ok = hits.object_id >= 0
        p = origins[ok] + hits.t[ok, None] * d[ok]
        pts.append(p)
        total += len(p)
    return torch.cat(pts)[:count]


def chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """Symmetric mean nearest-neighbour distance between point sets [N, 3] and [M, 3] (k-d trees)."""
    from scipy.spatial import cKDTree

    x, y = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    return float((cKDTree(y).query(x)[0].mean() + cKDTree(x).query(y)[0].mean()) / 2)


@torch.no_grad()
def render_views(field: RealFusionField, cameras: Cameras) -> torch.Tensor:
    """Evaluation renders [N, H, W, 3] (white background) of all cameras in one batch of rays: the compaction
    rounds of the evaluation marcher are shared by every view (much faster on a CPU than view by view)."""
    h, w = cameras.height, cameras.width
    o, d = cameras.rays(h, w, dtype=torch.float32)
    o, d = nvs_rays_to_realfusion(o.reshape(-1, 3), d.reshape(-1, 3))
    out = render_rays(field, o, d, mode="eval", shading="albedo", bg_color=1.0, normals=False,
                      ray_batch=o.shape[0])
    return out["image"].reshape(len(cameras), h, w, 3).clamp(0, 1)


def _nearest_training_view(train_cams: Cameras, test_cams: Cameras) -> torch.Tensor:
    a = train_cams.centers / train_cams.centers.norm(dim=-1, keepdim=True)
    b = test_cams.centers / test_cams.centers.norm(dim=-1, keepdim=True)
    return (b @ a.T).argmax(dim=1)


def _metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict:
    return {"psnr": round(float(masked_psnr(pred, truth).mean()), 3),
            "ssim": round(float(masked_ssim(pred, truth).mean()), 4)}


def run(out_dir: PathLike, seed: int = 3, iters: int = 120, size: int = 48, rays: int = 1024, lr: float = 1e-2,
        mesh_resolution: int = 96, orbit_frames: int = 16, max_steps: int = 256, threads: Optional[int] = 1,
        progress: Optional[ProgressFactory] = None) -> dict:
    """Fit, render, mesh and measure (see the module doc); returns what is written to ``metrics.json``."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), seed, iters, size, rays, lr, mesh_resolution, orbit_frames, max_steps, progress)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, seed, iters, size, rays, lr, mesh_resolution, orbit_frames, max_steps, progress) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    scene = make_scene(seed)
    train_cams, test_cams = demo_cameras(size)
    views = render_multiview(scene, train_cams, background=(1.0, 1.0, 1.0), samples_per_pixel=4)
    truth = render_multiview(scene, test_cams, background=(1.0, 1.0, 1.0), samples_per_pixel=4).images

    torch.manual_seed(seed)
    field = RealFusionField(FieldConfig(**DEMO_FIELD))
    config = TrainConfig(preset="fixed", iters=iters, lr=lr, seed=seed, multiview_rays=rays, scene_scale=SCENE_SCALE,
                         max_steps=max_steps, occupancy_every=16, preview_every=0, checkpoint_every=0, grid_levels_mask=0)
    t0 = time.perf_counter()
    result = train(field, multiview=views, config=config, progress=progress or _quiet)
    fit_seconds = time.perf_counter() - t0

    with torch.no_grad():
        pred = render_views(field, scaled(test_cams, SCENE_SCALE))
        copy = views.images[_nearest_training_view(train_cams, test_cams)]
        metrics = {"model": _metrics(pred, truth), "copy_source": _metrics(copy, truth)}
        azim = torch.linspace(0, 2 * math.pi, orbit_frames + 1, dtype=torch.float64)[:-1]
        orbit = Cameras.from_spherical(math.radians(25.0), azim, RADIUS, math.radians(FOV_DEG), size, size)
        frames = render_views(field, scaled(orbit, SCENE_SCALE))
        orbit_truth = render_multiview(scene, orbit, background=(1.0, 1.0, 1.0), samples_per_pixel=4).images
    files = {"orbit": save_gif(torch.cat([frames, torch.ones(orbit_frames, size, 2, 3), orbit_truth], dim=2),
                               out / "orbit.gif", fps=8)}
    save_field(out / "field.safetensors", field, meta={"demo": "procedural", "scene_seed": seed,
                                                       "scene_scale": SCENE_SCALE})
    files["field"] = out / "field.safetensors"

    t1 = time.perf_counter()
    from .mesh import extract_mesh, write_glb

    mesh = extract_mesh(field, mesh_resolution, extent=0.75, frame="nvs")
    write_glb(mesh, out / "mesh.glb")
    files["mesh"] = out / "mesh.glb"
    mesh_points = torch.from_numpy(_sample_mesh(mesh, 20000, seed)).double() / SCENE_SCALE
    true_points = surface_points(scene)
    lo, hi = true_points.min(0).values, true_points.max(0).values
    diagonal = float((hi - lo).norm())
    metrics["chamfer"] = round(chamfer(mesh_points, true_points) / diagonal, 5)
    mesh_seconds = time.perf_counter() - t1

    summary = {**metrics, "scene_seed": seed, "train_views": len(train_cams), "held_out_views": len(test_cams),
               "size": size, "iters": iters, "rays_per_step": rays, "max_steps": max_steps, "field": DEMO_FIELD,
               "field_parameters": sum(p.numel() for p in field.parameters()), "scene_scale": SCENE_SCALE,
               "mesh": {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
                        "resolution": mesh_resolution, "threshold": round(float(mesh.stats["threshold"]), 4)},
               "bbox_diagonal": round(diagonal, 4), "final_loss": round(result.history[-1]["loss"], 6),
               "seconds": {"fit": round(fit_seconds, 1), "mesh_and_chamfer": round(mesh_seconds, 1),
                           "total": round(time.perf_counter() - start, 1)}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    files["metrics"] = out / "metrics.json"
    gain = metrics["model"]["psnr"] - metrics["copy_source"]["psnr"]
    print(f"RealFusion field demo: procedural object {seed}, fitted to {len(train_cams)} views at {size}x{size} "
          f"({iters} steps, no SDS) in {summary['seconds']['total']} s")
    print(f"  held-out PSNR {metrics['model']['psnr']:.2f} dB (copy-source {metrics['copy_source']['psnr']:.2f} dB, "
          f"{gain:+.2f} dB), SSIM {metrics['model']['ssim']:.3f}; chamfer {metrics['chamfer']:.4f} of the bbox "
          "diagonal")
    for name, path in files.items():
        print(f"  {name:8s} {path}")
    return summary


def _sample_mesh(mesh, count: int, seed: int) -> np.ndarray:
    import trimesh

    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    points, _ = trimesh.sample.sample_surface(tm, count, seed=seed)
    return np.asarray(points)


def _quiet(total, desc=""):
    from ..progress import Progress

    return Progress(total, desc)
