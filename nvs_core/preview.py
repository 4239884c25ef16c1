"""Draw a camera batch (frustums, path, world axes) from an outside viewpoint, so users see what they built."""
from __future__ import annotations

import colorsys
import math
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .cameras import Cameras

Segment = Tuple[np.ndarray, np.ndarray, Tuple[int, int, int], int]


def _camera_colour(i: int, n: int) -> Tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(0.66 * i / max(n - 1, 1), 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _frustum_segments(cameras: Cameras, size: float) -> List[Segment]:
    """Frustum edges at depth ``size`` plus a small 'up' triangle over each image's top edge."""
    segments: List[Segment] = []
    K = cameras.K()
    w, h = cameras.width, cameras.height
    pixels = torch.tensor([[0, 0], [w, 0], [w, h], [0, h]], dtype=torch.float64)
    for i in range(len(cameras)):
        colour, width = _camera_colour(i, len(cameras)), 3 if i == 0 else 1
        fx, fy, cx, cy = K[i, 0, 0], K[i, 1, 1], K[i, 0, 2], K[i, 1, 2]
        cam_pts = torch.stack([(pixels[:, 0] - cx) / fx, (pixels[:, 1] - cy) / fy, torch.ones(4, dtype=torch.float64)], 1)
        # The up triangle sits just above the top edge (camera -y is image up).
        top_mid = (cam_pts[0] + cam_pts[1]) / 2
        half_w = (cam_pts[1, 0] - cam_pts[0, 0]) / 2
        apex_up = top_mid + torch.tensor([0.0, -0.6 * half_w, 0.0], dtype=torch.float64)
        pts = torch.cat([cam_pts, apex_up[None]]) * size
        world = (cameras.c2w[i, :3, :3] @ pts.T).T + cameras.c2w[i, :3, 3]
        centre = cameras.c2w[i, :3, 3].numpy()
        corners = world.numpy()
        for k in range(4):
            segments.append((centre, corners[k], colour, width))
            segments.append((corners[k], corners[(k + 1) % 4], colour, width))
        segments.append((corners[0], corners[4], colour, width))
        segments.append((corners[1], corners[4], colour, width))
    return segments


def draw_cameras(cameras: Cameras, viewer_elevation: float = math.radians(30), viewer_azimuth: float = math.radians(30),
                 size: int = 512, frustum_scale: float = 0.15, show_path: bool = True,
                 background: Tuple[int, int, int] = (24, 24, 28)) -> torch.Tensor:
    """Render a preview [1,size,size,3] float 0..1 of the cameras seen from a viewer on a sphere.

    The viewer looks at the centre of the cameras' bounding sphere (origin included) from far enough
    to see them all; ``frustum_scale`` is the frustum depth relative to that sphere's radius.
    """
    if len(cameras) == 0:
        raise ValueError("no cameras to preview")
    points = torch.cat([cameras.centers, torch.zeros(1, 3, dtype=torch.float64)])
    centre = (points.max(0).values + points.min(0).values) / 2
    extent = float((points - centre).norm(dim=1).max().clamp(min=1e-3))
    fov = math.radians(40)
    distance = extent * 1.3 / math.sin(fov / 2) + extent * frustum_scale
    viewer = Cameras.from_spherical(viewer_elevation, viewer_azimuth, distance, fov, size, size, target=centre)

    segments = _frustum_segments(cameras, frustum_scale * extent)
    axis_len = 0.5 * extent
    origin = np.zeros(3)
    for axis, colour in zip(np.eye(3), [(230, 60, 60), (60, 210, 60), (70, 110, 240)]):
        segments.append((origin, axis * axis_len, colour, 2))
    if show_path and len(cameras) > 1:
        c = cameras.centers.numpy()
        for a, b in zip(c[:-1], c[1:]):
            segments.append((a, b, (150, 150, 150), 1))

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    w2c, K = viewer.w2c[0].numpy(), viewer.K()[0].numpy()
    near = 1e-3 * distance
    for a, b, colour, width in segments:
        projected = _project_segment(a, b, w2c, K, near)
        if projected is not None:
            draw.line(projected, fill=colour, width=width)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def _project_segment(a: np.ndarray, b: np.ndarray, w2c: np.ndarray, K: np.ndarray, near: float):
    pa, pb = w2c[:3, :3] @ a + w2c[:3, 3], w2c[:3, :3] @ b + w2c[:3, 3]
    if pa[2] < near and pb[2] < near:
        return None
    # Clip to the near plane so segments behind the viewer do not wrap around.
    if pa[2] < near:
        pa = pa + (pb - pa) * (near - pa[2]) / (pb[2] - pa[2])
    elif pb[2] < near:
        pb = pb + (pa - pb) * (near - pb[2]) / (pa[2] - pb[2])
    ua, ub = K @ (pa / pa[2]), K @ (pb / pb[2])
    return [(float(ua[0]), float(ua[1])), (float(ub[0]), float(ub[1]))]
