"""Preparing user images and cameras for GeNVS: alpha over white, centre crop, resize, matching cameras.

GeNVS works on square images (``image_size`` for the encoder, a square render grid) and was trained on
objects over a white background. Images of any size are centre-cropped to a square of side
min(H, W) (offsets rounded half to even, as torchvision's ``center_crop``, which VIVID's node uses
too) and resized; RGBA is composited over white first. Cameras get the same crop, so intrinsics stay
exact: :func:`nvs_core.imageio.crop_cameras` returns square cameras for the cropped region.

Images are ComfyUI IMAGE tensors [N, H, W, C] with values 0..1; the prepared batch is (N, 3, S, S).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..cameras import Cameras
from ..imageio import CropBox, centre_crop_box, composite_on_white
from .pipeline import fit_images

# A source image whose aspect ratio differs from its camera's by more than this is refused.
ASPECT_TOLERANCE = 0.02


def prepare_images(images: torch.Tensor, size: int) -> Tuple[torch.Tensor, CropBox]:
    """IMAGE [N,H,W,3|4] -> (N, 3, size, size) in 0..1 (over white, centre-cropped, resized) and the crop."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image batch [N, H, W, 3 or 4], got {tuple(images.shape)}")
    box = centre_crop_box(images.shape[1], images.shape[2])
    rgb = composite_on_white(images)[:, box.top:box.top + box.side, box.left:box.left + box.side]
    return fit_images(rgb.permute(0, 3, 1, 2).contiguous(), size), box


def check_aspect(cameras: Cameras, width: int, height: int, name: str, tolerance: float = ASPECT_TOLERANCE) -> None:
    """Refuse cameras made for an image of another aspect ratio (their intrinsics would not fit)."""
    image_aspect, camera_aspect = width / height, cameras.width / cameras.height
    if abs(image_aspect / camera_aspect - 1) > tolerance:
        raise ValueError(f"{name}: made for {cameras.width}x{cameras.height} images but the images are "
                         f"{width}x{height} (aspect {image_aspect:.3f} vs {camera_aspect:.3f}); set the cameras' "
                         "width and height to the images' size")


def intrinsics_groups(cameras: Cameras, rtol: float = 1e-6) -> List[List[int]]:
    """Runs of consecutive cameras sharing (normalised) intrinsics: GeNVS renders one K per call."""
    groups: List[List[int]] = []
    for i in range(len(cameras)):
        if groups and torch.allclose(cameras.intrinsics[i], cameras.intrinsics[groups[-1][0]], rtol=rtol, atol=1e-9):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def inside_cube(centres: torch.Tensor, bound: float = 1.0) -> List[int]:
    """Indices of camera centres (N, 3) inside the scene cube [-bound, bound]^3."""
    inside = (centres.abs() < bound).all(dim=-1)
    return [int(i) for i in torch.nonzero(inside).flatten()]


def describe_indices(indices: Sequence[int], limit: int = 6) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def first_view_transform(pose0: torch.Tensor) -> torch.Tensor:
    """The training-time normalisation (``normalize_first_view``) as a matrix: T (4, 4) float64 with
    T @ pose0 = identity rotation at (0, 0, |t0|); apply the same T to every other camera of the scene."""
    pose0 = torch.as_tensor(pose0, dtype=torch.float64)
    R0, t0 = pose0[:3, :3], pose0[:3, 3]
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R0.T
    T[:3, 3] = -R0.T @ t0 + torch.tensor([0.0, 0.0, float(t0.norm())], dtype=torch.float64)
    return T


def transform_poses(T: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """T (4, 4) @ poses (N, 4, 4), computed in float64, returned in the poses' dtype."""
    return (T.to(torch.float64) @ poses.to(torch.float64)).to(poses.dtype)
