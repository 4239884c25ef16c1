"""Writing IMAGE-layout tensors ([B,H,W,C] float 0..1) to PNG grids and animated GIFs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .cameras import Cameras


def to_pil(image: torch.Tensor) -> Image.Image:
    """One [H,W,C] float image in 0..1 -> PIL (RGB or RGBA)."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def grid(rows: Sequence[torch.Tensor], pad: int = 2, background: float = 1.0) -> torch.Tensor:
    """Stack image batches as rows of one picture [H,W,3]; rows may have different lengths."""
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    out = torch.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), background)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = image[..., :3].float().cpu()
    return out


def save_png(image: torch.Tensor, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)
    return path


def save_gif(frames: torch.Tensor, path: Union[str, Path], fps: float = 8.0) -> Path:
    """Looping animation of a [N,H,W,C] batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [to_pil(f[..., :3]) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


# ------------------------------------------------------------------ preparing user images for square nets
@dataclass(frozen=True)
class CropBox:
    """The centre square taken from an image of ``width`` x ``height``."""

    top: int
    left: int
    side: int
    width: int
    height: int

    def describe(self) -> str:
        if self.side == self.width == self.height:
            return f"{self.width}x{self.height} (square: no crop)"
        return f"{self.width}x{self.height}: centre crop {self.side}x{self.side} at x={self.left}, y={self.top}"


def centre_crop_box(height: int, width: int) -> CropBox:
    """The centre square of side min(H, W); offsets as torchvision's ``center_crop`` (round half to even)."""
    side = min(int(height), int(width))
    return CropBox(int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side, int(width), int(height))


def composite_on_white(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [N,H,W,3|4] -> [N,H,W,3] float32 in 0..1, RGBA composited over white."""
    images = images.to(torch.float32)
    if images.shape[-1] == 4:
        rgb, alpha = images[..., :3], images[..., 3:].clamp(0, 1)
        images = rgb * alpha + (1.0 - alpha)
    return images[..., :3].clamp(0, 1)


def crop_cameras(cameras: Cameras) -> Tuple[Cameras, CropBox]:
    """The cameras of the centre square of their nominal image (square cameras of side min(W, H))."""
    box = centre_crop_box(cameras.height, cameras.width)
    if box.side == cameras.width == cameras.height:
        return cameras, box
    K = cameras.K().clone()                     # pixels of the nominal size
    K[:, 0, 2] -= box.left
    K[:, 1, 2] -= box.top
    side = box.side
    intr = torch.stack([K[:, 0, 0] / side, K[:, 1, 1] / side, K[:, 0, 2] / side, K[:, 1, 2] / side], dim=-1)
    return Cameras(cameras.c2w, intr, side, side), box
