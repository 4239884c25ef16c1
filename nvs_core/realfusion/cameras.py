"""RealFusion's cameras: random training orbits, the input view, direction labels, rays.

Conventions of the published code (``nerf/provider_synthetic.py``, ``nerf/utils.py:get_rays``):
world y is up; a pose is a camera-to-world 4x4 whose rotation columns are
``(right, up, forward)`` built by cross products with ``(0, -1, 0)``. Those rotations have
determinant -1: for a camera on +z looking at the origin image column 0 looks toward world +x, i.e.
the image is mirrored relative to a right-handed pinhole camera, and the "up" column points
image-down. The mirror is consistent between the input view and the training views, so it cancels
inside the method.

Conversion to ``NVS_CAMERA`` (OpenCV axes, right-handed +Y-up world): RealFusion's world is the
NVS world mirrored in x. A RealFusion pose ``P`` is the NVS camera ``diag(-1, 1, 1, 1) @ P`` (a proper
rotation), and NVS rays map to RealFusion rays by negating their x components
(:func:`nvs_rays_to_realfusion`). A field fitted by RealFusion then renders the input photo upright
and un-mirrored from the NVS camera of the input view (azimuth 0, elevation 90 - theta).

Random draws go through a :class:`RandomSource` in the published call order, so a run can be seeded
and the fixtures' draws replayed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import Cameras
from .field import safe_normalize

DIRECTIONS = ("front", "side", "back", "side", "overhead", "bottom")
_MIRROR_X = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))


class RandomSource:
    """The three kinds of draws the published code makes: ``torch.rand``, ``torch.randint``,
    ``random.random()``. Seeded from one integer (a torch generator and a Python RNG)."""

    def __init__(self, seed: Optional[int] = None, device="cpu"):
        self.generator = torch.Generator(device="cpu")
        if seed is not None:
            self.generator.manual_seed(seed)
        self.py = random.Random(seed)
        self.device = device

    def rand(self, *size) -> torch.Tensor:
        return torch.rand(*size, generator=self.generator).to(self.device)

    def randn(self, *size) -> torch.Tensor:
        return torch.randn(*size, generator=self.generator).to(self.device)

    def randint(self, high: int, size) -> torch.Tensor:
        return torch.randint(0, high, size, generator=self.generator).to(self.device)

    def random(self) -> float:
        return self.py.random()


# ----------------------------------------------------------------------------- labels and prompts

def view_direction(thetas: torch.Tensor, phis: torch.Tensor, overhead: float, front: float) -> torch.Tensor:
    """Direction labels (0 front, 1 side, 2 back, 3 side, 4 overhead, 5 bottom), radians.

    Comparisons run in the angles' dtype against thresholds rounded to it (published behaviour: theta
    exactly at the overhead angle is overhead, phi exactly at ``front`` is side).
    """
    res = torch.zeros(thetas.shape[0], dtype=torch.long, device=thetas.device)
    res[(phis >= front) & (phis < np.pi)] = 1
    res[(phis >= np.pi) & (phis < (np.pi + front))] = 2
    res[phis >= (np.pi + front)] = 3
    res[thetas <= overhead] = 4
    res[thetas >= (np.pi - overhead)] = 5
    return res


def direction_prompts(text: str) -> Tuple[str, ...]:
    """The six direction-suffixed prompts, indexed by label: ``"{text}, front view"`` ..."""
    return tuple(f"{text}, {d} view" for d in DIRECTIONS)


# ----------------------------------------------------------------------------- poses

def _look_at_origin(centers: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    up = torch.tensor([0.0, -1.0, 0.0], device=centers.device).expand_as(forward)
    right = safe_normalize(torch.cross(forward, up, dim=-1))
    up = safe_normalize(torch.cross(right, forward, dim=-1))
    poses = torch.eye(4, dtype=torch.float32, device=centers.device).repeat(centers.shape[0], 1, 1)
    poses[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    poses[:, :3, 3] = centers
    return poses


def rand_poses(size: int, source: RandomSource, radius_range: Sequence[float] = (1.0, 1.5),
               theta_range: Sequence[float] = (0, 120), phi_range: Sequence[float] = (0, 360),
               angle_overhead: float = 30, angle_front: float = 60, uniform_sphere_rate: float = 0.5,
               jitter: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random training poses [size, 4, 4] (float32) and direction labels; angles in degrees.

    Draw order: radius ``rand(size)``; branch ``random() < uniform_sphere_rate``; sphere branch
    ``rand(size)`` x3 (upper hemisphere, not area-uniform); theta/phi branch ``rand(size)`` x2.
    """
    theta_range, phi_range = np.deg2rad(theta_range), np.deg2rad(phi_range)
    overhead, front = np.deg2rad(angle_overhead), np.deg2rad(angle_front)
    radius = source.rand(size) * (radius_range[1] - radius_range[0]) + radius_range[0]
    if source.random() < uniform_sphere_rate:
        unit = F.normalize(torch.stack([(source.rand(size) - 0.5) * 2.0, source.rand(size),
                                        (source.rand(size) - 0.5) * 2.0], dim=-1), p=2, dim=1)
        thetas = torch.acos(unit[:, 1])
        phis = torch.atan2(unit[:, 0], unit[:, 2])
        phis[phis < 0] += 2 * np.pi
        centers = unit * radius.unsqueeze(-1)
    else:
        thetas = source.rand(size) * (theta_range[1] - theta_range[0]) + theta_range[0]
        phis = source.rand(size) * (phi_range[1] - phi_range[0]) + phi_range[0]
        centers = torch.stack([radius * torch.sin(thetas) * torch.sin(phis), radius * torch.cos(thetas),
                               radius * torch.sin(thetas) * torch.cos(phis)], dim=-1)
    targets = 0
    if jitter:
        centers = centers + (source.rand(*centers.shape) * 0.2 - 0.1)
        targets = targets + source.randn(*centers.shape) * 0.2
    poses = _look_at_origin(centers, safe_normalize(targets - centers))
    if jitter:
        poses[:, :3, 1] = safe_normalize(poses[:, :3, 1] + source.randn(size, 3) * 0.02)
    return poses, view_direction(thetas, phis, overhead, front)


def circle_poses(radius: float = 1.25, theta: float = 60, phi: float = 0, angle_overhead: float = 30,
                 angle_front: float = 60, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """One orbit pose [1, 4, 4] at polar angle ``theta`` (from +y) and azimuth ``phi``, degrees."""
    theta, phi = np.deg2rad(theta), np.deg2rad(phi)
    thetas = torch.tensor([theta], dtype=torch.float32, device=device)
    phis = torch.tensor([phi], dtype=torch.float32, device=device)
    centers = torch.stack([radius * torch.sin(thetas) * torch.sin(phis), radius * torch.cos(thetas),
                           radius * torch.sin(thetas) * torch.cos(phis)], dim=-1)
    poses = _look_at_origin(centers, -safe_normalize(centers))
    return poses, view_direction(thetas, phis, np.deg2rad(angle_overhead), np.deg2rad(angle_front))


def orbit_poses(frames: int = 100, radius: float = 1.8, theta: float = 75, **kwargs):
    """The test video's orbit: frame i at phi = 360 i / frames."""
    out = [circle_poses(radius, theta, i / frames * 360, **kwargs) for i in range(frames)]
    return torch.cat([p for p, _ in out]), torch.cat([d for _, d in out])


def focal_from_fovy(size: int, fovy_deg: float) -> float:
    return size / (2 * np.tan(np.deg2rad(fovy_deg) / 2))


def intrinsics_for(H: int, W: int, fovy_deg: float) -> np.ndarray:
    """(fx, fy, cx, cy) as the providers build them: f from H, cx = H / 2, cy = W / 2 (float64)."""
    focal = focal_from_fovy(H, fovy_deg)
    return np.array([focal, focal, H / 2, W / 2])


# ----------------------------------------------------------------------------- rays

def get_rays(poses: torch.Tensor, intrinsics, H: int, W: int, N: int = -1,
             source: Optional[RandomSource] = None, inds: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Rays [B, H*W or N, 3] through pixel centres; ``N > 0`` samples pixels with replacement."""
    device, B = poses.device, poses.shape[0]
    fx, fy, cx, cy = intrinsics
    i, j = torch.meshgrid(torch.linspace(0, W - 1, W, device=device), torch.linspace(0, H - 1, H, device=device),
                          indexing="ij")
    i = i.t().reshape([1, H * W]).expand([B, H * W]) + 0.5
    j = j.t().reshape([1, H * W]).expand([B, H * W]) + 0.5
    results = {}
    if N > 0:
        N = min(N, H * W)
        if inds is None:
            if source is None:
                raise ValueError("sampling rays needs a RandomSource or explicit pixel indices")
            inds = source.randint(H * W, [N])
        inds = inds.to(device).expand([B, N])
        i, j = torch.gather(i, -1, inds), torch.gather(j, -1, inds)
        results["inds"] = inds
    else:
        results["inds"] = torch.arange(H * W, device=device).expand([B, H * W])
    zs = torch.ones_like(i)
    directions = safe_normalize(torch.stack(((i - cx) / fx * zs, (j - cy) / fy * zs, zs), dim=-1))
    rays_d = directions @ poses[:, :3, :3].transpose(-1, -2)
    results["rays_o"] = poses[..., :3, 3][..., None, :].expand_as(rays_d)
    results["rays_d"] = rays_d
    return results


def jitter_rays(rays_o: torch.Tensor, rays_d: torch.Tensor, scale: float, source: Optional[RandomSource] = None,
                noise_o: Optional[torch.Tensor] = None, noise_d: Optional[torch.Tensor] = None):
    """Camera noise as published: one N(0, 1) 3-vector per batch for the origins and one for the
    directions, times ``scale``, added without renormalising. Draw order: origins, then directions."""
    B = rays_o.shape[0]
    if noise_o is None:
        noise_o = source.randn(B, 1, 3)
    if noise_d is None:
        noise_d = source.randn(B, 1, 3)
    return rays_o + noise_o.to(rays_o) * scale, rays_d + noise_d.to(rays_d) * scale


def real_camera_noise_scale(global_step: int, iters: int, noise: float = 0.001, annealing: bool = True) -> float:
    """The input view's camera noise: ``noise * (1 - step / iters)`` (annealed, published default)."""
    return noise * ((1 - global_step / iters) if annealing else 1)


# ----------------------------------------------------------------------------- views

@dataclass
class InputView:
    """The fixed camera of the input photo (published: radius 1.8, theta 75, phi 0, fovy 55)."""

    size: int = 128
    radius: float = 1.8
    theta: float = 75
    phi: float = 0
    fovy: float = 55

    def pose(self, device="cpu") -> torch.Tensor:
        return circle_poses(self.radius, self.theta, self.phi, device=device)[0]

    def direction(self) -> torch.Tensor:
        return circle_poses(self.radius, self.theta, self.phi)[1]

    def intrinsics(self) -> np.ndarray:
        return intrinsics_for(self.size, self.size, self.fovy)

    def rays(self, N: int = -1, source: Optional[RandomSource] = None, inds=None, device="cpu"):
        return get_rays(self.pose(device), self.intrinsics(), self.size, self.size, N, source, inds)

    def camera(self) -> Cameras:
        return realfusion_to_cameras(self.pose(), self.intrinsics(), self.size, self.size)


def sample_training_view(source: RandomSource, H: int = 96, W: int = 96, radius_range=(1.0, 1.5),
                         fovy_range=(40, 70), angle_overhead: float = 30, angle_front: float = 60,
                         uniform_sphere_rate: float = 0.5, jitter: bool = False) -> Dict[str, torch.Tensor]:
    """The synthetic provider's training batch (``collate``): a random pose, then fovy ~ U(range)."""
    poses, dirs = rand_poses(1, source, radius_range, angle_overhead=angle_overhead, angle_front=angle_front,
                             jitter=jitter, uniform_sphere_rate=uniform_sphere_rate)
    fov = source.random() * (fovy_range[1] - fovy_range[0]) + fovy_range[0]
    focal = H / (2 * np.tan(np.deg2rad(fov) / 2))
    rays = get_rays(poses, np.array([focal, focal, H / 2, W / 2]), H, W, -1)
    return {"H": H, "W": W, "rays_o": rays["rays_o"], "rays_d": rays["rays_d"], "dir": dirs, "poses": poses,
            "fovy": fov}


def prepare_rgba(rgba: torch.Tensor, size: int) -> torch.Tensor:
    """An RGBA image (uint8 [H, W, 4] or float [H, W, 4] in 0..1) resized as the image provider does:
    bilinear, align_corners False, no antialias, not premultiplied. Returns [1, size, size, 4]."""
    if rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"expected an RGBA image [H, W, 4], got shape {tuple(rgba.shape)}")
    x = rgba.float() / 255 if rgba.dtype == torch.uint8 else rgba.float()
    x = F.interpolate(x.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous()


def gather_pixels(image: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
    """Pixels [B, N, C] of an image [B, H, W, C] at flat indices [B, N]."""
    B, C = image.shape[0], image.shape[-1]
    return torch.gather(image.reshape(B, -1, C), 1, torch.stack(C * [inds], -1))


# ----------------------------------------------------------------------------- NVS_CAMERA conversion

def realfusion_to_cameras(poses: torch.Tensor, intrinsics, H: int, W: int) -> Cameras:
    """RealFusion poses [B, 4, 4] + (fx, fy, cx, cy) in pixels -> ``NVS_CAMERA`` (OpenCV, +Y up).

    The NVS camera sees the un-mirrored image: a RealFusion render equals the NVS render of the
    x-mirrored field, i.e. rays convert with :func:`nvs_rays_to_realfusion`.
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    c2w = _MIRROR_X @ poses.detach().double().cpu()  # a proper rotation again
    norm = torch.tensor([fx / W, fy / H, cx / W, cy / H], dtype=torch.float64)
    return Cameras(c2w, norm, W, H)


def cameras_to_realfusion(cameras: Cameras) -> torch.Tensor:
    """``NVS_CAMERA`` -> RealFusion poses [B, 4, 4] (float32, determinant -1) for its own ray builder."""
    return (_MIRROR_X @ cameras.c2w).float()


def nvs_rays_to_realfusion(rays_o: torch.Tensor, rays_d: torch.Tensor):
    """NVS world rays -> RealFusion world rays (x mirrored)."""
    flip = torch.tensor([-1.0, 1.0, 1.0], dtype=rays_o.dtype, device=rays_o.device)
    return rays_o * flip, rays_d * flip
