"""VIVID's 20-d camera label and the RealEstate10K camera-line reader of its data pipeline.

Label layout: [tgt2src (3x4 row-major, 12), src fx fy cx cy, tgt fx fy cx cy], standardised as
(v - MEAN) / STD with the statistics published with the model. For the 8 intrinsics entries
MEAN scales with imsize/64 and STD with (imsize/64)^2 (the square is upstream's; kept). Entries
with STD = 0 (cx, cy) are set to 0, so principal points carry no information.

``tgt2src = E_src @ inv(E_tgt)`` (first 3 rows) for 4x4-expanded world-to-camera matrices E: it
maps target-camera coordinates into the source camera (OpenCV axes, RealEstate10K scale).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

# Published standardisation statistics at 64 px (float32, verbatim values).
MEAN = torch.tensor([
    9.6681e-01, -1.6038e-04, -3.7034e-05, -1.6904e-03, -8.7718e-05,
    9.9869e-01, 3.1288e-03, -1.0794e-03, 1.0653e-05, 3.0997e-03,
    9.6691e-01, 1.2561e-02, 5.7708e+01, 5.7704e+01, 3.2000e+01,
    3.2000e+01, 5.7708e+01, 5.7704e+01, 3.2000e+01, 3.2000e+01])
STD = torch.tensor([
    0.1104, 0.0346, 0.2279, 0.4930, 0.0347, 0.0091, 0.0367, 0.2208, 0.2279,
    0.0368, 0.1088, 1.0751, 6.6464, 6.6511, 0.0000, 0.0000, 6.6464, 6.6511,
    0.0000, 0.0000])

LABEL_DIM = 20
INTRINSICS = slice(12, 20)

# RealEstate10K frames as the original parser assumes them (W x H).
RE10K_FRAME_WIDTH = 640
RE10K_FRAME_HEIGHT = 360


def label_statistics(imsize: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the label at ``imsize`` px."""
    mean = MEAN.to(device=device, dtype=dtype).clone()
    std = STD.to(device=device, dtype=dtype).clone()
    mean[INTRINSICS] *= imsize / 64
    std[INTRINSICS] *= (imsize / 64) ** 2
    return mean, std


def fit_label_standardization(labels: torch.Tensor, imsize: int, min_std: float = 1e-6) -> Dict[str, list]:
    """Statistics of a data set's own labels, for ``NVPrecond(label_standardization=...)``.

    ``labels`` (N, 20) are standardised with the published statistics (what the data pipeline
    makes); returns the mean and std of the raw entries, 6 significant digits, std 0 where the
    entry is constant (below ``min_std``) or carries no information in the published layout.
    """
    mean_pub, std_pub = label_statistics(imsize, torch.float64)
    raw = labels.to(torch.float64).reshape(-1, LABEL_DIM) * std_pub + mean_pub
    mean, std = raw.mean(0), raw.std(0)
    std = torch.where((std < min_std) | (std_pub == 0), torch.zeros_like(std), std)
    rounded = lambda v: [float(f"{x:.6g}") for x in v.tolist()]  # noqa: E731
    return {"mean": rounded(mean), "std": rounded(std)}


def intrinsics_to_vector(K: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) pixel intrinsics -> (..., 4) [fx, fy, cx, cy]."""
    return torch.stack((K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]), dim=-1)


def vector_to_intrinsics(v: torch.Tensor) -> torch.Tensor:
    """(..., 4) [fx, fy, cx, cy] -> (..., 3, 3) pixel intrinsics."""
    K = torch.zeros(v.shape[:-1] + (3, 3), dtype=v.dtype, device=v.device)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2] = v.unbind(-1)
    K[..., 2, 2] = 1
    return K


def compose_geometry(tgt2src: torch.Tensor, src_K: torch.Tensor, tgt_K: torch.Tensor, imsize: int = 64) -> torch.Tensor:
    """Standardised label (..., 20) from tgt2src (..., 3, 4) and pixel intrinsics (..., 3, 3) at imsize px.

    Computed in the dtype of ``tgt2src``.
    """
    mean, std = label_statistics(imsize, tgt2src.dtype, tgt2src.device)
    raw = torch.cat((tgt2src.reshape(*tgt2src.shape[:-2], 12),
                     intrinsics_to_vector(src_K).to(tgt2src.dtype),
                     intrinsics_to_vector(tgt_K).to(tgt2src.dtype)), dim=-1)
    return torch.where(std > 0, (raw - mean) / std, torch.zeros_like(raw))


def decompose_geometry(geometry: torch.Tensor, imsize: int = 64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`compose_geometry`: (tgt2src, src_K, tgt_K). Lossy: cx, cy come back as MEAN."""
    mean, std = label_statistics(imsize, geometry.dtype, geometry.device)
    raw = geometry * std + mean
    tgt2src = raw[..., :12].reshape(*raw.shape[:-1], 3, 4)
    return tgt2src, vector_to_intrinsics(raw[..., 12:16]), vector_to_intrinsics(raw[..., 16:20])


def expand_extrinsics(extrinsics: torch.Tensor) -> torch.Tensor:
    """(..., 3, 4) -> (..., 4, 4) with bottom row [0, 0, 0, 1]."""
    bottom = torch.zeros(extrinsics.shape[:-2] + (1, 4), dtype=extrinsics.dtype, device=extrinsics.device)
    bottom[..., 0, 3] = 1
    return torch.cat([extrinsics, bottom], dim=-2)


def relative_pose(src_w2c: torch.Tensor, tgt_w2c: torch.Tensor) -> torch.Tensor:
    """tgt2src = (E_src @ inv(E_tgt))[:3] for (..., 3, 4) world-to-camera matrices."""
    return (expand_extrinsics(src_w2c) @ torch.linalg.inv(expand_extrinsics(tgt_w2c)))[..., :3, :]


def parse_camera_line(line: str, width: int = RE10K_FRAME_WIDTH,
                      height: int = RE10K_FRAME_HEIGHT) -> Tuple[str, torch.Tensor, torch.Tensor]:
    """One RealEstate10K pose line -> (timestamp, K (3, 3) px, w2c (3, 4)), float32 as upstream.

    Line: ``timestamp fx fy cx cy 0 0 r00 r01 r02 t0 r10 ... t2`` with fx..cy normalised by the
    frame size, which upstream hard-codes to 640 x 360.
    """
    items = line.split()
    fx, fy, cx, cy = map(float, items[1:5])
    K = torch.tensor([[width * fx, 0, width * cx],
                      [0, height * fy, height * cy],
                      [0, 0, 1]], dtype=torch.float32)
    w2c = torch.tensor([float(v) for v in items[7:19]], dtype=torch.float32).reshape(3, 4)
    return items[0], K, w2c


def crop_resize_intrinsics(K: torch.Tensor, new_size: int, frame_height: int, frame_width: int) -> torch.Tensor:
    """Pixel intrinsics after a centre crop to min(H, W) and a resize to new_size (a new tensor)."""
    crop = min(frame_height, frame_width)
    corner = torch.tensor([(frame_width - crop) // 2, (frame_height - crop) // 2], dtype=K.dtype, device=K.device)
    K = K.clone()
    K[..., :2, 2] = K[..., :2, 2] - corner
    K[..., :2, :] = new_size * K[..., :2, :] / crop
    return K


def dataset_geometry(src_line: str, tgt_line: str, imsize: int = 64, srsize: int = 256,
                     frame_size_hw: Sequence[int] = (RE10K_FRAME_HEIGHT, RE10K_FRAME_WIDTH),
                     aliased: bool = True) -> Dict[str, torch.Tensor]:
    """Labels of a source/target pair of RealEstate10K lines as the VIVID data pipeline builds them.

    ``aliased=True`` reproduces upstream exactly: its transform edits K in place, so K is first
    cropped+resized to ``srsize`` and that result is cropped+resized again to ``imsize``; both the
    64-px and the 256-px labels use this doubly transformed K (fx about 0.71x the true 64-px
    focal). It is unknown which variant the released weights saw. ``aliased=False`` gives the
    geometrically correct K at each size.

    Returns ``geometry`` (imsize label), ``sr_geometry`` (srsize label), ``src_K``/``tgt_K`` (the K
    the imsize label was built from) and ``tgt2src``.
    """
    frame_h, frame_w = frame_size_hw
    _, src_K, src_w2c = parse_camera_line(src_line)
    _, tgt_K, tgt_w2c = parse_camera_line(tgt_line)
    tgt2src = relative_pose(src_w2c, tgt_w2c)
    if aliased:
        src_K = crop_resize_intrinsics(crop_resize_intrinsics(src_K, srsize, frame_h, frame_w), imsize, frame_h, frame_w)
        tgt_K = crop_resize_intrinsics(crop_resize_intrinsics(tgt_K, srsize, frame_h, frame_w), imsize, frame_h, frame_w)
        sr_src_K, sr_tgt_K = src_K, tgt_K
    else:
        sr_src_K = crop_resize_intrinsics(src_K, srsize, frame_h, frame_w)
        sr_tgt_K = crop_resize_intrinsics(tgt_K, srsize, frame_h, frame_w)
        src_K = crop_resize_intrinsics(src_K, imsize, frame_h, frame_w)
        tgt_K = crop_resize_intrinsics(tgt_K, imsize, frame_h, frame_w)
    return {
        "geometry": compose_geometry(tgt2src, src_K, tgt_K, imsize),
        "sr_geometry": compose_geometry(tgt2src, sr_src_K, sr_tgt_K, srsize),
        "src_K": src_K,
        "tgt_K": tgt_K,
        "tgt2src": tgt2src,
    }


def geometry_from_cameras(source, targets, imsize: int, translation_scale: float = 1.0,
                          aliased_sizes: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Standardised labels (N, 20) for generating each target view from one source view.

    ``source`` (1 or N cameras) and ``targets`` (N cameras) are ``Cameras`` (OpenCV axes, as
    VIVID's RealEstate10K poses); their intrinsics are converted the way the images are: centre
    crop to a square, then resize to ``imsize``. ``translation_scale`` maps scene units to the
    training data's scale (RealEstate10K's SfM units for the published models).
    ``aliased_sizes`` = (sr_size, base_size) reproduces the published data pipeline's quirk (see
    :func:`dataset_geometry`): intrinsics cropped+resized to sr_size and then again to base_size,
    used for the labels at every resolution; None gives the correct intrinsics for ``imsize``.
    """
    if len(source) not in (1, len(targets)):
        raise ValueError(f"need one source camera or one per target, got {len(source)} for {len(targets)} targets")
    if len(targets) == 0:
        raise ValueError("no target cameras")
    src_w2c = source.w2c[:, :3].expand(len(targets), 3, 4)
    tgt2src = relative_pose(src_w2c, targets.w2c[:, :3]).clone()
    tgt2src[..., 3] *= translation_scale
    def resized_K(cameras):
        if aliased_sizes is None:
            return crop_resize_intrinsics(cameras.K(), imsize, cameras.height, cameras.width)
        once = crop_resize_intrinsics(cameras.K(), aliased_sizes[0], cameras.height, cameras.width)
        return crop_resize_intrinsics(once, aliased_sizes[1], cameras.height, cameras.width)

    src_K = resized_K(source).expand(len(targets), 3, 3)
    tgt_K = resized_K(targets)
    return compose_geometry(tgt2src, src_K, tgt_K, imsize).to(torch.float32)
