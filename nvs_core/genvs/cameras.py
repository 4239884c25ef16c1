"""GeNVS camera convention and the camera paths of the published sampling scripts.

GeNVS (unofficial) uses camera-to-world poses with **OpenGL** camera axes (x right, y up, looking along
-z) in a **+Z-up** world, the scene inside the cube [-1, 1]^3, one set of intrinsics (fx, fy, cx, cy)
in pixels of the 64-px render grid for every view, and ``camera_k`` = fx/cx (float64). ``NVS_CAMERA``
(:class:`nvs_core.cameras.Cameras`) uses OpenCV camera axes in a +Y-up world with normalised
intrinsics; :func:`to_genvs` / :func:`from_genvs` convert exactly (the axis changes are signed
permutations).

SRN data (``cars_train``): pose files hold OpenCV c2w in a +Z-up world; the published loader flips the
camera y and z axes (``pose[:3,:3] @ diag(1,-1,-1)``), reads only the first view's K, and divides it
by 8 for the 64-px render of 512-px intrinsics. :func:`srn_genvs_cameras` reproduces that from raw
pose/K arrays; :func:`nvs_core.multiview.load_srn` reads the folders into ``NVS_MULTIVIEW``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ..cameras import Cameras

_FLIP_YZ = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))


@dataclass
class GeNVSCameras:
    """Cameras in GeNVS's convention: poses (N,4,4) float32, intrinsics (4,) float32, camera_k float64."""

    poses: torch.Tensor
    intrinsics: torch.Tensor
    camera_k: torch.Tensor
    render_size: int = 64
    camera_d: Optional[torch.Tensor] = None   # |t| of the first pose (float64); the renderer does not use it

    def __len__(self) -> int:
        return self.poses.shape[0]

    def __getitem__(self, index) -> "GeNVSCameras":
        if isinstance(index, int):
            index = [index]
        return GeNVSCameras(self.poses[index], self.intrinsics, self.camera_k, self.render_size, self.camera_d)


def opencv_to_opengl(c2w: torch.Tensor) -> torch.Tensor:
    """Flip the camera y and z axes of c2w matrices (..., 4, 4), in float64 (the published conversion)."""
    out = torch.as_tensor(c2w, dtype=torch.float64).clone()
    out[..., :3, :3] = out[..., :3, :3] @ _FLIP_YZ
    return out


def normalize_first_view(poses: torch.Tensor) -> torch.Tensor:
    """Training-time normalisation (``normalize_first_view=True``): T @ P_v with
    T = [[R0^T, -R0^T t0 + (0, 0, |t0|)], [0, 0, 0, 1]], so view 0 becomes identity at (0, 0, |t0|)."""
    poses = torch.as_tensor(poses, dtype=torch.float64)
    R0, t0 = poses[0, :3, :3], poses[0, :3, 3]
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R0.T
    T[:3, 3] = -R0.T @ t0 + torch.tensor([0.0, 0.0, float(t0.norm())], dtype=torch.float64)
    return T @ poses


def srn_genvs_cameras(c2w_opencv: torch.Tensor, K: torch.Tensor, normalize: bool = False, k_downscale: float = 8.0):
    """The published SRN dataset's camera outputs from raw OpenCV poses (V,4,4) and the first view's K.

    Returns ``poses`` (float32, OpenGL), ``intrinsics`` (K/8, float32), ``camera_k`` = K00/K02 and
    ``camera_d`` = |t0| (both float64 scalars).
    """
    poses = opencv_to_opengl(c2w_opencv)
    camera_d = poses[0, :3, 3].norm()
    if normalize:
        poses = normalize_first_view(poses)
    K = torch.as_tensor(K, dtype=torch.float64)
    intrinsics = torch.stack([K[0, 0], K[1, 1], K[0, 2], K[1, 2]]) / k_downscale
    return {"poses": poses.float(), "intrinsics": intrinsics.float(), "camera_k": K[0, 0] / K[0, 2],
            "camera_d": camera_d}


def to_genvs(cameras: Cameras, render_size: int = 64, intrinsics_from: int = 0,
             scale: float = 1.0, normalize: bool = False) -> GeNVSCameras:
    """``NVS_CAMERA`` -> GeNVS poses and the intrinsics of camera ``intrinsics_from`` on the render grid.

    GeNVS uses one set of intrinsics for every view (the published loader reads the first view's
    only); ``scale`` multiplies camera positions (GeNVS scenes fill the cube [-1, 1]^3, SRN cameras sit
    at distance 1.3); ``normalize`` applies the training-time :func:`normalize_first_view`.
    """
    if len(cameras) == 0:
        raise ValueError("no cameras to convert")
    c2w = cameras.to_c2w("blender").clone()          # OpenGL camera axes in a Z-up world
    c2w[:, :3, 3] *= scale
    camera_d = c2w[0, :3, 3].norm()
    if normalize:
        c2w = normalize_first_view(c2w)
    intr = cameras.intrinsics[intrinsics_from] * render_size
    camera_k = intr[0] / intr[2]
    return GeNVSCameras(c2w.float(), intr.float(), camera_k.reshape(1), render_size, camera_d)


def from_genvs(poses: torch.Tensor, intrinsics: torch.Tensor, render_size: int = 64,
               image_size: Optional[int] = None, scale: float = 1.0) -> Cameras:
    """GeNVS poses (N,4,4) and grid intrinsics (4,) -> ``NVS_CAMERA`` (nominal size ``image_size``)."""
    poses = torch.as_tensor(poses, dtype=torch.float64).reshape(-1, 4, 4).clone()
    poses[:, :3, 3] /= scale
    fx, fy, cx, cy = torch.as_tensor(intrinsics, dtype=torch.float64).reshape(-1)[:4].tolist()
    K = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=torch.float64)
    cams = Cameras.from_c2w(poses, K.expand(len(poses), 3, 3), render_size, render_size, convention="blender")
    return cams.with_size(image_size, image_size) if image_size else cams


# ------------------------------------------------------------------------------------- paths

def _np32(rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def circle_path(ref_pose: Union[torch.Tensor, np.ndarray], n_poses: int = 200) -> torch.Tensor:
    """``generate_circle_poses`` of ``sample_ar.py``: pose q = Rz(2 pi q / n) @ ref_pose, float32.

    Pose 0 is the reference (source) pose itself; the autoregressive orbit generates poses 1..n-1.
    """
    ref = np.asarray(torch.as_tensor(ref_pose, dtype=torch.float32).cpu().numpy(), dtype=np.float32)
    out = []
    for th in np.linspace(0, 2 * np.pi, n_poses + 1)[:-1]:
        phi = np.sin(2 * th) * 0 / 180.0 * np.pi
        rot_phi = _np32([[1, 0, 0, 0], [0, np.cos(phi), -np.sin(phi), 0], [0, np.sin(phi), np.cos(phi), 0],
                         [0, 0, 0, 1]])
        rot_z = _np32([[np.cos(th), -np.sin(th), 0, 0], [np.sin(th), np.cos(th), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        out.append((rot_z @ rot_phi) @ ref)
    return torch.from_numpy(np.stack(out, 0))


def spherical_path(radius: float, n_poses: int = 40) -> torch.Tensor:
    """``generate_spherical_cam_to_world`` of ``sample_views.py``: two turns (theta 0..4 pi) while the
    elevation angle phi runs from 10 to -60 degrees, float32 OpenGL c2w poses at ``radius``."""
    radius = float(radius)
    flip = _np32([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    out = []
    for th, phi in zip(np.linspace(0, 4 * np.pi, n_poses + 1)[:-1], np.linspace(10, -60, n_poses + 1)[:-1]):
        p = phi / 180.0 * np.pi
        trans = _np32([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, radius], [0, 0, 0, 1]])
        rot_phi = _np32([[1, 0, 0, 0], [0, np.cos(p), -np.sin(p), 0], [0, np.sin(p), np.cos(p), 0], [0, 0, 0, 1]])
        rot_th = _np32([[np.cos(th), 0, -np.sin(th), 0], [0, 1, 0, 0], [np.sin(th), 0, np.cos(th), 0], [0, 0, 0, 1]])
        out.append(flip @ (rot_th @ (rot_phi @ trans)))
    return torch.from_numpy(np.stack(out, 0))
