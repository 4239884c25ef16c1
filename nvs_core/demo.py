"""``python -m nvs_core demo``: novel views of an unseen object from one input view, on a CPU.

Loads the committed 32-px VIVID demo model (``models/demo/vivid_procedural.safetensors``), takes
one view of a procedural object it never saw in training (a held-out seed), generates an orbit of
novel views with the faithful EDM Heun sampler and compares them with the exact renders.

Writes into the output folder: ``grid.png`` (rows: input, generated, ground truth), ``orbit.gif``
(generated | ground truth, sweeping round the object), ``metrics.json`` (PSNR/SSIM of the model
and of the copy-source baseline), ``cameras.png`` + ``cameras.json`` (the camera rig).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .cameras import Cameras
from .imageio import grid, save_gif, save_png
from .preview import draw_cameras
from .procedural import make_scene, render
from .progress import ProgressFactory, silent_progress
from .vivid.data import EVAL_SEEDS, PairBatch, eval_azimuth_offsets, from_model_space, to_model_space
from .vivid.demo_model import format_comparison, image_metrics, load_demo_model, sample_views
from .vivid.geometry import geometry_from_cameras

PathLike = Union[str, Path]
ELEVATION_DEG = 20.0
RADIUS = 2.6
FOV_DEG = 45.0


def held_out_seed(seed: int) -> int:
    """Scene seed for demo ``seed``: the seed itself if held out, else the seed-th held-out scene."""
    return seed if seed in EVAL_SEEDS else EVAL_SEEDS[seed % len(EVAL_SEEDS)]


def _enlarge(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of IMAGE [N, H, W, 3] so 32-px views are visible."""
    if factor <= 1:
        return images
    return F.interpolate(images.permute(0, 3, 1, 2), scale_factor=factor, mode="nearest").permute(0, 2, 3, 1)


def run(out_dir: PathLike, seed: int = 3, views: int = 8, num_steps: int = 32, model_path: Optional[PathLike] = None,
        azimuth_deg: float = 0.0, zoom: int = 4, threads: Optional[int] = 1,
        progress: Optional[ProgressFactory] = None) -> dict:
    """Generate ``views`` novel views of held-out object ``seed`` and write the demo files.

    ``num_steps`` is the sampler's step count (32 as published; fewer is faster and a bit worse).
    ``threads``: torch CPU threads while it runs (restored after); 32-px batches gain nothing from
    more and lose several-fold on a busy machine. None keeps the current setting.
    Returns the summary that is also written to ``metrics.json``.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), seed, views, num_steps, model_path, azimuth_deg, zoom, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: Path, seed: int, views: int, num_steps: int, model_path: Optional[PathLike], azimuth_deg: float,
         zoom: int, progress: Optional[ProgressFactory]) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    net, translation_scale = load_demo_model(model_path)
    size = net.img_resolution
    scene_seed = held_out_seed(seed)

    # Source at azimuth 0 (or azimuth_deg), targets at +-15..90 degrees round it, one elevation.
    offsets = eval_azimuth_offsets(views)
    azimuths = torch.tensor([azimuth_deg] + [azimuth_deg + o for o in offsets], dtype=torch.float64)
    rig = Cameras.from_spherical(math.radians(ELEVATION_DEG), torch.deg2rad(azimuths), RADIUS,
                                 math.radians(FOV_DEG), size, size)
    rendered = render(make_scene(scene_seed), rig, background=(1.0, 1.0, 1.0), samples_per_pixel=4)
    model_space = to_model_space(rendered.rgb, size)
    labels = geometry_from_cameras(rig[[0]], rig[list(range(1, len(rig)))], size, translation_scale)
    pairs = PairBatch(model_space[:1].expand(views, -1, -1, -1).contiguous(), model_space[1:], labels)

    generated = sample_views(net, pairs, seeds=list(range(views)), num_steps=num_steps,
                             progress=progress or silent_progress)
    source, truth = from_model_space(pairs.src[:1]), from_model_space(pairs.dst)
    metrics = {"model": image_metrics(generated, truth),
               "copy_source": image_metrics(source.expand_as(truth), truth)}

    order = sorted(range(views + 1), key=lambda i: float(azimuths[i]))  # sweep round the object
    frames_generated = torch.cat([source, generated])[order]
    frames_truth = torch.cat([source, truth])[order]
    gap = torch.ones(views + 1, size, 1, 3)
    files = {
        "grid": save_png(grid([_enlarge(source, zoom), _enlarge(generated, zoom), _enlarge(truth, zoom)]),
                         out / "grid.png"),
        "orbit": save_gif(_enlarge(torch.cat([frames_generated, gap, frames_truth], dim=2), zoom),
                          out / "orbit.gif", fps=3),
        "cameras": save_png(draw_cameras(rig, size=384)[0], out / "cameras.png"),
    }
    (out / "cameras.json").write_text(json.dumps(rig.to_dict(), indent=1))
    summary = {
        **metrics,
        "scene_seed": scene_seed, "views": views, "size": size, "num_steps": num_steps,
        "azimuth_offsets_deg": offsets, "elevation_deg": ELEVATION_DEG,
        "model_file": str(model_path or "models/demo/vivid_procedural.safetensors"),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    files["metrics"] = out / "metrics.json"
    print(f"VIVID demo: held-out procedural object {scene_seed}, {views} novel views at {size}x{size} "
          f"({num_steps} sampler steps) in {summary['seconds']} s")
    print(format_comparison(metrics))
    for name, path in files.items():
        print(f"  {name:9s} {path}")
    return summary
