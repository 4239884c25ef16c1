"""NVS-Adapter cameras: the published view matrices, rays on the latent grid and the 144-channel Plücker embedding.

Published chain (``sgm/geometry.py``, ``sgm/data/single_image.py``, ``RayPosConditionEmbedder``), reproduced with
its quirks (all float32 unless stated):
- intrinsics: focal = W / (2 tan(fov)) with the *full* field of view (not fov/2; 110.877 px at 256 px for the
  Objaverse renders' 49.1 degrees), computed in float64 and cast; principal point at the centre;
- view matrix: eye = r (cos el cos az, cos el sin az, sin el) in a Z-up world, ``lookat`` towards the origin
  with up = (0, 0, -1) and "unit" vectors v / (|v| + 1e-6); columns [right, up', -forward, eye], rotation
  negated inside ``lookat`` and negated again by the dataset: the net camera axes are OpenGL's (x right,
  y up, z backwards);
- poses relative to the reference view: inverse(S) @ C with a general 4x4 inverse (the reference becomes I);
- rays on the latent grid (image stride 8): K with fx, cx, fy, cy divided by the stride, pixel centres +0.5,
  direction R K^-1 (u, v, 1) (not normalised), origin = the camera centre;
- Plücker: d^ = d / max(|d|, 1e-12), m = o x d^; embedding per 3-vector v and bands [a, b):
  [v, sin(v_i 2^k) (i outer, k inner), sin(v_i 2^k + pi/2)] -- the second half is sin(x + pi/2) in float32,
  not cos(x); channels [PE(m; 0..14) (93), PE(d^; 0..7) (51)] = 144, reference view first.

``rays_context_for_cameras`` converts our ``NVS_CAMERA`` (OpenCV camera axes, +Y-up world, normalised
intrinsics) to that convention: the published camera axes are OpenCV's with y and z negated, and since only
poses relative to the reference enter the model, the world frame (Z-up there, Y-up here) drops out; our
spherical angles (elevation up, azimuth counter-clockwise seen from above) are the published ones. With
``focal="published"`` (default) each camera's true field of view goes through the published focal formula,
so a 49.1-degree camera gets exactly the embedding the released model was trained with; ``focal="camera"``
uses the camera's own intrinsics instead (not what the model saw).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import Cameras
from .config import DIRECTION_DEG, OFFSET_DEG

OBJAVERSE_FOV_DEG = 49.1
REFERENCE_ELEVATION_AZIMUTH_DISTANCE = (0.0, 0.0, 1.5)
IMAGE_RESOLUTION = 256
LATENT_STRIDE = 8
FOCAL_MODES = ("published", "camera")
# OpenCV camera axes -> the published (OpenGL-like) camera axes.
_OPENCV_TO_PUBLISHED = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------ published chain

def published_intrinsics(fov_rad: float, height: int, width: int) -> torch.Tensor:
    """4x4 pixel intrinsics with the published focal W / (2 tan(fov)) (float64 maths, float32 result)."""
    fx = width / (2 * np.tan(fov_rad))
    fy = height / (2 * np.tan(fov_rad))
    return torch.tensor([[fx, 0.0, width * 0.5, 0.0], [0.0, fy, height * 0.5, 0.0], [0.0, 0.0, 1.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0]], dtype=torch.float32)


def _normalize_eps(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return v / (v.norm(dim=-1) + eps)


def published_lookat_matrix(azimuth_rad: float, elevation_rad: float, distance: float) -> torch.Tensor:
    """The published ``make_view_matrix`` (one rotation flip, inside ``lookat``), float32 4x4."""
    eye = torch.tensor([distance * np.cos(elevation_rad) * np.cos(azimuth_rad),
                        distance * np.cos(elevation_rad) * np.sin(azimuth_rad),
                        distance * np.sin(elevation_rad)], dtype=torch.float32)
    up = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float32)
    forward = _normalize_eps(torch.zeros(3, dtype=torch.float32) - eye)
    right = _normalize_eps(torch.linalg.cross(up, forward))
    up = _normalize_eps(torch.linalg.cross(right, forward))
    matrix = torch.eye(4, dtype=torch.float32)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = right, up, -forward, eye
    matrix[:3, :3] *= -1
    return matrix


def published_c2w(elevation_deg, azimuth_deg, distance) -> torch.Tensor:
    """The dataset/demo camera-to-world (both flips), float32 (..., 4, 4), angles in degrees as upstream."""
    el, az, dist = np.broadcast_arrays(np.asarray(elevation_deg, dtype=np.float64),
                                       np.asarray(azimuth_deg, dtype=np.float64),
                                       np.asarray(distance, dtype=np.float64))
    flat = [published_lookat_matrix(float(a), float(e), float(d))
            for e, a, d in zip(np.deg2rad(el).ravel(), np.deg2rad(az).ravel(), dist.ravel())]
    out = torch.stack(flat) if flat else torch.zeros(0, 4, 4)
    out[:, :3, :3] *= -1
    return out.reshape(*el.shape, 4, 4)


def relative_to_reference(c2w: torch.Tensor) -> torch.Tensor:
    """(B, V, 4, 4) poses with view 0 the reference: inverse(reference) @ pose for every view."""
    return torch.inverse(c2w[:, :1]) @ c2w


def inverse_intrinsics(K: torch.Tensor) -> torch.Tensor:
    """The published closed-form inverse of a (..., 4, 4) pinhole K (3x3 block used)."""
    inv = torch.zeros_like(K)
    inv[..., [0, 1], [0, 1]] = 1.0 / K[..., [0, 1], [0, 1]]
    inv[..., [0, 1], [2]] = -K[..., [0, 1], [2]] * inv[..., [0, 1], [0, 1]]
    inv[..., [2, 3], [2, 3]] = 1.0
    return inv


def latent_intrinsics(K: torch.Tensor, stride: int) -> torch.Tensor:
    K = K.clone()
    K[..., [0, 0, 1, 1], [0, 2, 1, 2]] /= stride
    return K


def rays_on_grid(K: torch.Tensor, c2w: torch.Tensor, image_size: Tuple[int, int], stride: int = LATENT_STRIDE
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Published ``get_rays``: K, c2w (B, V, 4, 4) -> origins, directions (B, V, h, w, 3) on the stride grid."""
    batch = c2w.shape[0]
    inv = inverse_intrinsics(latent_intrinsics(K, stride))[..., :3, :3]
    h, w = int(image_size[0] // stride), int(image_size[1] // stride)
    grid = torch.stack(torch.meshgrid(torch.arange(w).type_as(K), torch.arange(h).type_as(K), indexing="xy"), -1)
    grid = (grid + 0.5).type_as(K).unsqueeze(0).repeat_interleave(batch, dim=0)
    pixels = torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1)
    dirs = torch.einsum("bnij, bhwj -> bnhwi", inv, pixels)
    origins = c2w[:, :, None, None, :3, 3].repeat((1, 1, h, w, 1))
    directions = torch.einsum("bnhwi, bnji -> bnhwj", dirs, c2w[..., :3, :3])
    return origins, directions


def plucker(origins: torch.Tensor, directions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(moment o x d^, unit direction d^)."""
    unit = F.normalize(directions, dim=-1)
    return torch.linalg.cross(origins, unit, dim=-1), unit


def sinusoidal_embedding(v: torch.Tensor, bands: Sequence[int]) -> torch.Tensor:
    """[v, sin(v_i 2^k), sin(v_i 2^k + pi/2)] for k in [bands[0], bands[1]), i-major."""
    scales = torch.tensor([2 ** i for i in range(bands[0], bands[1])], device=v.device)
    scaled = (v.unsqueeze(-1) * scales).flatten(-2, -1)
    return torch.cat([v, torch.sin(torch.cat([scaled, scaled + np.pi / 2], dim=-1))], dim=-1)


def ray_embedding(origins: torch.Tensor, directions: torch.Tensor, offset_deg: Sequence[int] = OFFSET_DEG,
                  direction_deg: Sequence[int] = DIRECTION_DEG) -> torch.Tensor:
    """(B, V, h, w, 3) rays -> (B, V, 144, h, w) Plücker embedding (channel-first)."""
    moment, unit = plucker(origins, directions)
    emb = torch.cat([sinusoidal_embedding(moment, offset_deg), sinusoidal_embedding(unit, direction_deg)], dim=-1)
    return emb.permute(0, 1, 4, 2, 3).contiguous()


def rays_context_spherical(elevation_deg, azimuth_deg, distance, reference=REFERENCE_ELEVATION_AZIMUTH_DISTANCE,
                           fov_deg: float = OBJAVERSE_FOV_DEG, resolution: int = IMAGE_RESOLUTION,
                           stride: int = LATENT_STRIDE) -> torch.Tensor:
    """The published demo/dataset chain: targets (B, Q) in degrees -> rays_context (B, 1+Q, 144, h, w)."""
    el = np.atleast_2d(np.asarray(elevation_deg, dtype=np.float64))
    az = np.atleast_2d(np.asarray(azimuth_deg, dtype=np.float64))
    dist = np.broadcast_to(np.asarray(distance, dtype=np.float64), el.shape)
    ref = published_c2w(*reference)
    c2w = torch.cat([ref.expand(el.shape[0], 1, 4, 4), published_c2w(el, az, dist)], dim=1)
    K = published_intrinsics(np.deg2rad(fov_deg), resolution, resolution).expand(*c2w.shape[:2], 4, 4)
    origins, directions = rays_on_grid(K, relative_to_reference(c2w), (resolution, resolution), stride)
    return ray_embedding(origins, directions)


# ------------------------------------------------------------------------------ NVS_CAMERA

def published_pose(cameras: Cameras) -> torch.Tensor:
    """Our OpenCV c2w (float64) with the published camera axes (y and z negated)."""
    return cameras.c2w @ _OPENCV_TO_PUBLISHED


def model_intrinsics(cameras: Cameras, resolution: int, focal: str = "published") -> torch.Tensor:
    """(N, 4, 4) float32 pixel intrinsics at ``resolution`` for the embedding (see module doc)."""
    if focal not in FOCAL_MODES:
        raise ValueError(f"focal must be one of {FOCAL_MODES}, got {focal!r}")
    n = cameras.intrinsics
    K = torch.zeros(len(cameras), 4, 4, dtype=torch.float64)
    if focal == "published":
        fov_x = 2 * torch.atan(0.5 / n[:, 0])
        fov_y = 2 * torch.atan(0.5 / n[:, 1])
        K[:, 0, 0] = resolution / (2 * torch.tan(fov_x))
        K[:, 1, 1] = resolution / (2 * torch.tan(fov_y))
    else:
        K[:, 0, 0], K[:, 1, 1] = n[:, 0] * resolution, n[:, 1] * resolution
    K[:, 0, 2], K[:, 1, 2] = n[:, 2] * resolution, n[:, 3] * resolution
    K[:, 2, 2] = K[:, 3, 3] = 1.0
    return K.to(torch.float32)


def rays_context_for_cameras(reference: Cameras, targets: Cameras, resolution: int = IMAGE_RESOLUTION,
                             stride: int = LATENT_STRIDE, focal: str = "published",
                             device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """rays_context (1, 1+Q, 144, h, w) for one reference camera and Q target cameras (``NVS_CAMERA``).

    ``resolution``: the square image size the model works at (256 for the released model; the latent grid
    is ``resolution / stride``). Relative poses are formed in float64, then the published float32 chain runs.
    """
    if len(reference) != 1:
        raise ValueError(f"reference camera: expected exactly one camera, got {len(reference)}")
    if len(targets) == 0:
        raise ValueError("target cameras: expected at least one camera, got an empty batch")
    if resolution % stride:
        raise ValueError(f"resolution {resolution} is not a multiple of the latent stride {stride}")
    ref = published_pose(reference)
    poses = torch.cat([ref, published_pose(targets)])
    relative = (torch.linalg.inv(ref) @ poses).to(torch.float32)
    relative[0] = torch.eye(4)
    K = torch.cat([model_intrinsics(reference, resolution, focal), model_intrinsics(targets, resolution, focal)])
    origins, directions = rays_on_grid(K[None], relative[None], (resolution, resolution), stride)
    out = ray_embedding(origins, directions)
    return out.to(device=device or out.device, dtype=dtype or out.dtype)

