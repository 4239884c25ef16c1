"""Small helpers shared by node modules: input declarations, type names and input checks."""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional, Sequence

import torch

from ..nvs_core.checkpoints import atomic_path
from ..nvs_core.multiview import MultiView

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


# --------------------------------------------------------------------------------------------- training nodes
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def train_output_name(name, method: str) -> str:
    """A training node's output_name as a plain file stem (a trailing .safetensors is dropped)."""
    name = name.strip() if isinstance(name, str) else ""
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _RUN_NAME.match(name):
        raise ValueError(f"output_name: {name!r} is not a plain file name; use letters, digits, '_', '-' and '.' "
                         f"(it becomes models/nvs/{method}/<output_name>.safetensors)")
    return name


def train_run_inputs(default_name: str, method: str) -> dict:
    """The output_name and resume inputs of a training node."""
    return {
        "output_name": ("STRING", {"default": default_name, "tooltip": "Name of the run and of the saved "
                        f"network models/nvs/{method}/<output_name>.safetensors."}),
        "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from the run's last checkpoint when there "
                   "is one (same recipe needed); off starts over and overwrites it."}),
    }


def checkpoint_every_input() -> tuple:
    return int_input(100, 0, 1_000_000, "Save a resumable checkpoint every N steps (0: only at the end and on "
                     "interruption).")


def clone_views(views: MultiView) -> MultiView:
    """A copy with normal tensors: ComfyUI's inputs are inference tensors that autograd cannot use."""
    def clone(t):
        return None if t is None else t.detach().clone()

    return MultiView(clone(views.images), views.cameras, masks=clone(views.masks), depth=clone(views.depth),
                     names=list(views.names) if views.names else None)


def training_views(multiview, why: str):
    """(cloned views, data spec) for data_source 'multiview'; ``why`` says what the 2 views are for."""
    if not isinstance(multiview, MultiView):
        raise ValueError("multiview: data_source 'multiview' needs an NVS_MULTIVIEW connected (e.g. NVS Load "
                         "Multiview Folder or NVS Procedural Scene)")
    if len(multiview) < 2:
        raise ValueError(f"multiview: needs at least 2 views {why}, got {len(multiview)}")
    spec = {"kind": "multiview", "views": len(multiview), "size": list(multiview.images.shape[1:3])}
    return clone_views(multiview), spec


def copy_atomic(source: str, target: str) -> None:
    """Copy through a temporary file in the target's folder, so a reader never sees half a file."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def export_trained(ema_path, folder: str, name: str) -> str:
    """Copy a run's EMA network (+ .json) to ``folder/<name>.safetensors``; returns that path."""
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{name}.safetensors")
    copy_atomic(str(ema_path), target)
    copy_atomic(str(ema_path.with_suffix(".json")), os.path.join(folder, f"{name}.json"))
    return target


def mean_loss_text(losses: Sequence[float], last: int = 50) -> str:
    recent = list(losses)[-min(len(losses), last):] if losses else []
    return f"{sum(recent) / len(recent):.4f} (mean of the last {len(recent)} steps)" if recent else "n/a"
