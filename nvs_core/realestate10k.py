"""RealEstate10K camera files (one line per frame) into ``Cameras`` / ``MultiView``.

A file holds an optional first line with the video URL, then per frame:
``timestamp fx fy cx cy 0 0 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2``: intrinsics normalised
by the frame size and a world-to-camera matrix with OpenCV axes. Frames, when present, are images
named ``<timestamp>.png`` / ``.jpg`` in one folder (the common extracted layout).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .cameras import Cameras
from .multiview import MultiView

FRAME_SIZE = (640, 360)  # (W, H) the published models' data pipeline assumes


def read_pose_file(path: Union[str, Path], width: int = FRAME_SIZE[0],
                   height: int = FRAME_SIZE[1]) -> Tuple[List[str], Cameras]:
    """(timestamps, cameras) of a RealEstate10K pose file; ``width``/``height`` is the frame size."""
    path = Path(path)
    timestamps, w2c, intrinsics = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        items = line.split()
        if not items or (number == 1 and len(items) == 1):
            continue  # the URL line
        if len(items) != 19:
            raise ValueError(f"{path}, line {number}: expected 19 numbers (timestamp, fx fy cx cy, 0 0, 3x4 "
                             f"world-to-camera), got {len(items)}")
        try:
            values = [float(v) for v in items[1:]]
        except ValueError:
            raise ValueError(f"{path}, line {number}: not a list of numbers") from None
        timestamps.append(items[0])
        intrinsics.append(values[:4])
        w2c.append(values[6:18])
    if not timestamps:
        raise ValueError(f"{path}: no camera lines")
    w2c_t = torch.tensor(w2c, dtype=torch.float64).reshape(-1, 3, 4)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64).expand(len(w2c), 1, 4)
    c2w = torch.linalg.inv(torch.cat([w2c_t, bottom], dim=1))
    return timestamps, Cameras(c2w, torch.tensor(intrinsics, dtype=torch.float64), width, height)


def read_sequence(pose_file: Union[str, Path], frames_dir: Optional[Union[str, Path]] = None,
                  stride: int = 1) -> MultiView:
    """A sequence as a MultiView: frames from ``frames_dir`` (default: a folder named like the pose
    file next to it), every ``stride``-th frame."""
    pose_file = Path(pose_file)
    frames_dir = Path(frames_dir) if frames_dir is not None else pose_file.with_suffix("")
    timestamps, cameras = read_pose_file(pose_file)
    keep = list(range(0, len(timestamps), max(1, stride)))
    images = []
    for i in keep:
        found = [frames_dir / f"{timestamps[i]}{ext}" for ext in (".png", ".jpg", ".jpeg")]
        frame = next((f for f in found if f.is_file()), None)
        if frame is None:
            raise FileNotFoundError(f"{pose_file}: no frame {timestamps[i]}.png/.jpg in {frames_dir}")
        images.append(torch.from_numpy(np.asarray(Image.open(frame).convert("RGB"), dtype=np.float32) / 255.0))
    if any(im.shape != images[0].shape for im in images):
        raise ValueError(f"{frames_dir}: frames of different sizes")
    return MultiView(torch.stack(images), cameras[keep], names=[timestamps[i] for i in keep])
