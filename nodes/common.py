"""Small helpers shared by node modules: input declarations, type names and input checks."""
from __future__ import annotations

from typing import Optional

import torch

CAMERA = "NVS_CAMERA"
MULTIVIEW = "NVS_MULTIVIEW"


def float_input(default: float, min: float, max: float, step: float, tooltip: str, **extra) -> tuple:
    return ("FLOAT", {"default": default, "min": min, "max": max, "step": step, "tooltip": tooltip, **extra})


def int_input(default: int, min: int, max: int, tooltip: str, step: int = 1, **extra) -> tuple:
    return ("INT", {"default": default, "min": min, "max": max, "step": step, "tooltip": tooltip, **extra})


def seed_input(tooltip: str = "Random seed; the same seed gives the same result.") -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": tooltip, "control_after_generate": True})


def size_inputs(default: int = 256) -> dict:
    return {
        "width": int_input(default, 8, 4096, "Image width in pixels the cameras are made for.", step=8),
        "height": int_input(default, 8, 4096, "Image height in pixels the cameras are made for.", step=8),
    }


def check_image(image: torch.Tensor, name: str, channels: Optional[int] = 3) -> torch.Tensor:
    """A ComfyUI IMAGE [B,H,W,C]; RGBA inputs lose alpha only when ``channels`` is 3."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected an IMAGE tensor [batch, height, width, channels], got {shape}")
    if image.shape[0] == 0:
        raise ValueError(f"{name}: the image batch is empty")
    if channels is not None and image.shape[-1] not in (channels, 4):
        raise ValueError(f"{name}: expected {channels} colour channels, got {image.shape[-1]}")
    return image[..., :channels] if channels is not None else image


def check_mask(mask: Optional[torch.Tensor], name: str, batch: int, height: int, width: int) -> Optional[torch.Tensor]:
    """A ComfyUI MASK [B,H,W] (or [H,W]) matched to an image batch; a single mask is repeated."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or tuple(mask.shape[1:]) != (height, width):
        raise ValueError(f"{name}: expected a mask of {height}x{width} pixels, got shape {tuple(mask.shape)}")
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, -1, -1)
    if mask.shape[0] != batch:
        raise ValueError(f"{name}: {mask.shape[0]} masks for {batch} images")
    return mask


def parse_indices(text: str, count: int, name: str = "indices") -> list:
    """'0, 2, 5-7, -1' -> [0, 2, 5, 6, 7, count-1]; empty text selects everything."""
    text = text.strip()
    if not text:
        return list(range(count))
    indices = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                a, b = int(lo), int(hi)
                indices.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
            else:
                indices.append(int(part))
        except ValueError:
            raise ValueError(f"{name}: cannot read {part!r}; use numbers and ranges like '0, 2, 5-7'") from None
    for i in indices:
        if not -count <= i < count:
            raise ValueError(f"{name}: index {i} is out of range for {count} items")
    return [i % count for i in indices]
