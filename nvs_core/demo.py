"""``python -m nvs_core demo``: what the pack does, in one command, on a CPU.

Renders a procedural object at an orbit of cameras with exact ground truth and writes a picture of
the camera rig, so a fresh install can be checked without any model file.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import cameras as cam
from .imageio import grid, save_gif, save_png
from .preview import draw_cameras
from .procedural import render_multiview


def run(out_dir: str, seed: int = 3, views: int = 16, size: int = 96) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rig = cam.orbit(views, math.radians(20), 0.0, 2 * math.pi, 2.6, math.radians(45), size, size)
    scene = render_multiview(seed, rig, background=(1.0, 1.0, 1.0))
    files = {
        "views": save_png(grid([scene.images[: views // 2], scene.images[views // 2:]]), out / "views.png"),
        "orbit": save_gif(scene.images, out / "orbit.gif"),
        "cameras": save_png(draw_cameras(rig, size=384)[0], out / "cameras.png"),
    }
    (out / "cameras.json").write_text(json.dumps(rig.to_dict(), indent=1))
    summary = {"seed": seed, "views": views, "size": size, "seconds": round(time.perf_counter() - start, 2),
               "files": {k: str(v) for k, v in files.items()} | {"cameras_json": str(out / "cameras.json")}}
    print(f"procedural scene {seed}: {views} views at {size}x{size} in {summary['seconds']} s")
    for name, path in summary["files"].items():
        print(f"  {name:13s} {path}")
    return summary
