"""Writing IMAGE-layout tensors ([B,H,W,C] float 0..1) to PNG grids and animated GIFs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image


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
