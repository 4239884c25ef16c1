"""DTU (Rectified images + SampleSet calibration) for ViewNeTI: view splits, a scan reader, and the
published evaluation protocol.

Layout read by :func:`load_dtu_scan` (the one ViewNeTI and RegNeRF use)::

    <root>/Rectified/scan{ID}/rect_{k+1:03d}_{light}_r5000.png     (also scan{ID}_train, or <root> = Rectified)
    <root>/Calibration/cal18/pos_{k+1:03d}.txt                     (DTU SampleSet, 3x4 projection, 1600x1200)
    <masks>/scan{ID}/mask/{k:03d}.png  or  <masks>/scan{ID}/{k:03d}.png   (RegNeRF submission_data/idrmasks)

Camera ids ``k`` are 0-based everywhere in this module (and in ViewNeTI's view tokens); image and
calibration file names are 1-based, mask file names 0-based.

View ids of a loaded :class:`~nvs_core.multiview.MultiView` live in its ``names``:
``"scan{ID}_cam{k:02d}"`` (e.g. ``scan114_cam25``). :func:`dtu_camera_ids` reads them back, so ViewNeTI
training can form DTU view tokens (camera key ``k``) after any indexing or concatenation of the views.

Splits (``jmhb0/view_neti:constants.py``, ``training/dataset.py:dtu_get_train_idxs``, from RegNeRF/PixelNeRF):
train ids ``[25, 22, 28, 40, 44, 48, 0, 8, 13]`` (subsets 1/3/6/9 are its prefixes), excluded ids, the
25 test ids (the rest of 0..48), 34 evaluated views (train + test), and the 15 test scans.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .multiview import MultiView
from .viewneti.camera_tokens import (DTU_IMAGE_HEIGHT, DTU_IMAGE_WIDTH, cameras_from_dtu_projections,
                                     read_dtu_projection)

log = logging.getLogger(__name__)
PathLike = Union[str, Path]

# ----------------------------------------------------------------------------------------- splits
DTU_VIEW_COUNT = 49                      # views 0..48 in every Rectified scan
DTU_TRAIN_IDS = (25, 22, 28, 40, 44, 48, 0, 8, 13)   # RegNeRF order: subsets 1/3/6/9 are prefixes
DTU_EXCLUDED_IDS = (3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 36, 37, 38, 39)
DTU_TEST_IDS = tuple(i for i in range(DTU_VIEW_COUNT) if i not in DTU_TRAIN_IDS + DTU_EXCLUDED_IDS)
DTU_EVAL_IDS = tuple(sorted(DTU_TRAIN_IDS + DTU_TEST_IDS))   # the 34 views ViewNeTI predicts, sorted
DTU_SUBSETS: Dict[int, Tuple[int, ...]] = {
    1: DTU_TRAIN_IDS[:1], 3: DTU_TRAIN_IDS[:3], 6: DTU_TRAIN_IDS[:6], 9: DTU_TRAIN_IDS,
    0: DTU_TRAIN_IDS + DTU_TEST_IDS,
    -1: tuple(range(12, 36)), -2: tuple(range(12, 36, 2)), -3: tuple(range(12, 36, 3)),
}
DTU_TEST_SCANS = (8, 21, 30, 31, 34, 38, 40, 41, 45, 55, 63, 82, 103, 110, 114)
DTU_TRAIN_EXCLUDED_SCANS = (1, 2, 7, 25, 26, 27, 29, 39, 51, 54, 56, 57, 58, 73, 83, 111, 112, 113, 115, 116, 117)
# The 88 scans of ViewNeTI's mode-3 view-mapper pretraining (input_configs/train_m3_88scenes.yaml).
DTU_PRETRAIN_SCANS = (3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 28, 32, 33, 35, 36,
                      37, 42, 43, 44, 46, 47, 48, 49, 50, 52, 53, 59, 60, 61, 62, 64, 65, 66, 67, 68, 69, 70, 71,
                      72, 74, 75, 76, 77, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100,
                      101, 102, 104, 105, 106, 107, 108, 109, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128)

DTU_TRAIN_SIZE = (512, 384)      # (W, H): ViewNeTI's training resize (dtu_preprocess_key 1, PIL bicubic)
DTU_LIGHT = 3
CALIBRATION_COUNT = 64

IMAGE_PATTERN = "rect_{file:03d}_{light}_r5000.png"      # file = k + 1
CALIBRATION_PATTERN = "pos_{file:03d}.txt"               # file = k + 1
MASK_PATTERN = "{k:03d}.png"
VIEW_NAME = "scan{scan}_cam{k:02d}"
_VIEW_NAME_RE = re.compile(r"^scan(\d+)_cam(\d+)$")

Views = Union[str, int, Sequence[int]]


def dtu_subset_ids(subset: int) -> List[int]:
    """Camera ids of ViewNeTI's ``dtu_subset`` in upstream's order (1/3/6/9: prefixes of the train ids;
    0: train + test; -1/-2/-3: range(12, 36) with step 1/2/3)."""
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or int(subset) not in DTU_SUBSETS:
        raise ValueError(f"DTU subset must be one of {sorted(DTU_SUBSETS)}, got {subset!r}")
    return list(DTU_SUBSETS[int(subset)])


def resolve_dtu_views(views: Views) -> List[int]:
    """The 0-based camera ids a ``views`` argument selects, in loading order.

    ``"train"`` (9), ``"test"`` (25), ``"all"`` (the 34 evaluated views) and an int subset give sorted ids,
    the order ViewNeTI's dataset loads them in; an explicit sequence of ids keeps its order.
    """
    if isinstance(views, str):
        named = {"train": DTU_TRAIN_IDS, "test": DTU_TEST_IDS, "all": DTU_EVAL_IDS}
        key = views.strip().lower()
        if key not in named:
            raise ValueError(f"views must be 'train', 'test', 'all', a subset number {sorted(DTU_SUBSETS)} or a "
                             f"list of camera ids, got {views!r}")
        return sorted(named[key])
    if isinstance(views, (int, np.integer)) and not isinstance(views, bool):
        return sorted(dtu_subset_ids(int(views)))
    try:
        ids = [int(v) for v in views]
    except (TypeError, ValueError):
        raise ValueError(f"views must be 'train', 'test', 'all', a subset number or a list of camera ids, "
                         f"got {views!r}") from None
    if not ids:
        raise ValueError("views: the list of camera ids is empty")
    bad = [i for i in ids if not 0 <= i < CALIBRATION_COUNT]
    if bad:
        raise ValueError(f"views: camera ids must be 0..{CALIBRATION_COUNT - 1} (0-based; file numbers are id + 1), "
                         f"got {bad}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"views: camera ids repeat in {ids}")
    return ids


def dtu_view_name(scan: int, k: int) -> str:
    return VIEW_NAME.format(scan=int(scan), k=int(k))


def parse_dtu_view_name(name: str) -> Tuple[int, int]:
    """(scan, camera id) of a view name ``scan{ID}_cam{k}``."""
    match = _VIEW_NAME_RE.match(str(name))
    if match is None:
        raise ValueError(f"view name {name!r} is not a DTU view name; expected 'scan{{ID}}_cam{{k}}' as written by "
                         "load_dtu_scan")
    return int(match.group(1)), int(match.group(2))


def dtu_camera_ids(multiview: MultiView) -> List[int]:
    """0-based DTU camera id of every view of a multi-view made by :func:`load_dtu_scan` (from its names)."""
    if multiview.names is None:
        raise ValueError("this multi-view has no view names, so its DTU camera ids are unknown; load it with "
                         "load_dtu_scan (names 'scan{ID}_cam{k}')")
    return [parse_dtu_view_name(n)[1] for n in multiview.names]


def dtu_scan_ids(multiview: MultiView) -> List[int]:
    """DTU scan id of every view of a multi-view made by :func:`load_dtu_scan` (from its names)."""
    if multiview.names is None:
        raise ValueError("this multi-view has no view names, so its DTU scan is unknown")
    return [parse_dtu_view_name(n)[0] for n in multiview.names]


# ------------------------------------------------------------------------------------------ paths
def find_scan_folder(root: PathLike, scan: int) -> Path:
    """``<root>/Rectified/scan{ID}``, ``<root>/scan{ID}`` (also with ``_train``), or ``root`` itself when it
    is that scan's folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DTU root folder not found: {root} (expected a folder holding "
                                f"Rectified/scan{scan}/ and Calibration/cal18/)")
    names = (f"scan{scan}", f"scan{scan}_train")
    if root.name in names:
        return root
    tried = [root / sub / name for sub in ("Rectified", ".") for name in names]
    for path in tried:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"DTU scan {scan} not found under {root}: tried "
                            + ", ".join(str(p) for p in tried))


def default_calibration_folder(root: PathLike, scan_folder: Optional[Path] = None) -> Path:
    """``<root>/Calibration/cal18`` (also looked for above the Rectified folder)."""
    root = Path(root)
    candidates = [root / "Calibration" / "cal18"]
    if scan_folder is not None:
        candidates += [p / "Calibration" / "cal18" for p in list(Path(scan_folder).parents)[:3]]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"DTU calibration folder not found: tried {', '.join(str(p) for p in candidates)}; "
                            "give the DTU SampleSet 'Calibration/cal18' folder (pos_001.txt ... pos_064.txt)")


def image_path(scan_folder: PathLike, k: int, light: Union[int, str] = DTU_LIGHT) -> Path:
    return Path(scan_folder) / IMAGE_PATTERN.format(file=int(k) + 1, light=light)


def mask_path(masks_root: PathLike, scan: int, k: int) -> Optional[Path]:
    """Upstream's lookup: ``scan{ID}/mask/{k:03d}.png`` when that ``mask`` folder exists, else
    ``scan{ID}/{k:03d}.png``; None when the file does not exist (the protocol then uses an all-ones mask)."""
    folder = Path(masks_root) / f"scan{scan}"
    path = (folder / "mask" if (folder / "mask").is_dir() else folder) / MASK_PATTERN.format(k=int(k))
    return path if path.is_file() else None


def _missing_image(path: Path, k: int, light) -> FileNotFoundError:
    lights = sorted({m.group(1) for p in path.parent.glob(f"rect_{k + 1:03d}_*_r5000.png")
                     for m in [re.match(rf"rect_{k + 1:03d}_(.+)_r5000\.png$", p.name)] if m})
    hint = f" (this view exists with light {', '.join(lights)})" if lights else ""
    return FileNotFoundError(f"DTU image not found: {path}; expected "
                             f"{IMAGE_PATTERN.replace('{file:03d}', '{k+1:03d}')} with 1-based file numbers "
                             f"(camera id {k}, light {light}){hint}")


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert(mode) if im.mode != mode else im.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def read_calibration(folder: PathLike, ids: Sequence[int]) -> torch.Tensor:
    """float32 (N, 3, 4) projection matrices ``pos_{k+1:03d}.txt`` of the given camera ids."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DTU calibration folder not found: {folder} (expected the DTU SampleSet "
                                "'Calibration/cal18' folder with pos_001.txt ... pos_064.txt)")
    mats = []
    for k in ids:
        path = folder / CALIBRATION_PATTERN.format(file=int(k) + 1)
        if not path.is_file():
            raise FileNotFoundError(f"DTU calibration file not found: {path}; expected pos_{{k+1:03d}}.txt with "
                                    f"1-based file numbers (camera id {k}) in {folder}")
        mats.append(read_dtu_projection(path))
    return torch.stack(mats)


# ----------------------------------------------------------------------------------------- reader
def load_dtu_scan(root: PathLike, scan: int, views: Views = "train", light: Union[int, str] = DTU_LIGHT,
                  size: Optional[Tuple[int, int]] = DTU_TRAIN_SIZE, calibration: Optional[PathLike] = None,
                  masks: Optional[PathLike] = None) -> MultiView:
    """Read DTU Rectified views of one scan into a :class:`MultiView` with cameras.

    Args:
        root: DTU folder holding ``Rectified/scan{ID}/`` (or the Rectified folder, or the scan folder).
        scan: scan number, e.g. 114.
        views: ``"train"`` / ``"test"`` / ``"all"`` (34) / a ViewNeTI ``dtu_subset`` int (1, 3, 6, 9, 0, -1,
            -2, -3) / explicit 0-based camera ids (see :func:`resolve_dtu_views`).
        light: lighting index of the file names (ViewNeTI uses 3).
        size: (W, H) after a PIL bicubic resize, default (512, 384) as ViewNeTI's training; None keeps
            the native 1600x1200.
        calibration: folder of ``pos_NNN.txt`` files; default ``<root>/Calibration/cal18``.
        masks: optional RegNeRF ``idrmasks`` folder; views without a mask file get an all-ones mask.
            Masks are resized like the images (bicubic on the RGB mask) and keep the first channel / 255.

    Returns:
        MultiView with images [N,H,W,3] float32 0..1, cameras from the calibration projections
        (``cameras_from_dtu_projections``: our +Y-up world, millimetres), masks when ``masks`` is given,
        and names ``scan{ID}_cam{k:02d}`` (read back with :func:`dtu_camera_ids`).
    """
    ids = resolve_dtu_views(views)
    folder = find_scan_folder(root, scan)
    calib = Path(calibration) if calibration is not None else default_calibration_folder(root, folder)
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"size must be a positive (width, height), got {size}")
    projections = read_calibration(calib, ids)
    masks_root = None
    if masks is not None:
        masks_root = Path(masks)
        if not masks_root.is_dir():
            raise FileNotFoundError(f"DTU masks folder not found: {masks_root} (expected RegNeRF's idrmasks "
                                    f"folder with scan{scan}/mask/000.png ...)")
    images, mask_list, found = [], [], 0
    for k in ids:
        path = image_path(folder, k, light)
        if not path.is_file():
            raise _missing_image(path, k, light)
        im = _open(path, "RGB")
        if size is not None and im.size != size:
            im = im.resize(size, resample=Image.BICUBIC)
        if images and im.size != (images[0].shape[1], images[0].shape[0]):
            raise ValueError(f"{path} is {im.size[0]}x{im.size[1]} but the first view is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; give size=(W, H) to resize all views")
        images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
        if masks_root is not None:
            mpath = mask_path(masks_root, scan, k)
            if mpath is None:
                mask_list.append(torch.ones(im.size[1], im.size[0]))
                continue
            found += 1
            m = _open(mpath, "RGB")
            if m.size != im.size:
                m = m.resize(im.size, resample=Image.BICUBIC)
            mask_list.append(torch.from_numpy(np.asarray(m, dtype=np.float32)[..., 0] / 255.0))
    if masks_root is not None and found == 0:
        log.warning("no mask files for scan %s in %s: every view gets an all-ones mask", scan, masks_root)
    h, w = images[0].shape[:2]
    cameras = cameras_from_dtu_projections(projections, DTU_IMAGE_WIDTH, DTU_IMAGE_HEIGHT).with_size(w, h)
    return MultiView(torch.stack(images), cameras, masks=torch.stack(mask_list) if mask_list else None,
                     names=[dtu_view_name(scan, k) for k in ids])


# ---------------------------------------------------------------------------- evaluation protocol
EVAL_SIZE = (400, 300)              # (W, H) every metric is computed at
GT_INTERMEDIATE_SIZE = (768, 576)   # (W, H) the ground truth passes through (PIL default filter: bicubic)
PROTOCOL = ("ViewNeTI DTU protocol: ground truth 1600x1200 -PIL bicubic-> 768x576 -bicubic-> 400x300; predictions "
            "bicubic -> 400x300 (uint8 round trip, no antialias, as torchvision 0.14 on tensors); masks PIL "
            "bicubic -> 400x300, /255 > 0.01, missing = all ones; masked MSE summed over channels / sum of mask, "
            "PSNR per image then mean; SSIM (skimage, data_range 1) and LPIPS-VGG on masked images")


def _to_uint8_grid(images: torch.Tensor) -> torch.Tensor:
    """[N,H,W,C] float 0..1 (rounded to 1/255 like a saved PNG) or uint8 -> float32 0..255 on the integer grid."""
    images = torch.as_tensor(images).detach().cpu()
    if images.dtype == torch.uint8:
        return images.to(torch.float32)
    if not images.is_floating_point():
        raise ValueError(f"images must be float 0..1 or uint8, got {images.dtype}")
    return (images.to(torch.float32) * 255).round().clamp(0, 255)


def published_resize(images, size: Tuple[int, int] = EVAL_SIZE, antialias: bool = False) -> torch.Tensor:
    """Resize [N,H,W,C] images (float 0..1 or uint8) to ``size`` = (W, H) the way ViewNeTI's evaluation does:
    torchvision 0.14 ``Resize(bicubic)`` on uint8 tensors, i.e. float32 bicubic interpolation
    (align_corners False, no antialias), clamp to 0..255, round, back to uint8; returned as float32 0..1.
    Float inputs are first rounded to 8 bits, as the pipeline's PIL outputs are."""
    x = _to_uint8_grid(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N,H,W,C], got {tuple(x.shape)}")
    w, h = int(size[0]), int(size[1])
    if (x.shape[2], x.shape[1]) != (w, h):
        y = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                            align_corners=False, antialias=antialias)
        x = y.clamp(0, 255).round().permute(0, 2, 3, 1)
    return x / 255.0


def load_dtu_eval_ground_truth(root: PathLike, scan: int, ids: Sequence[int], light: Union[int, str] = DTU_LIGHT,
                               size: Tuple[int, int] = EVAL_SIZE) -> torch.Tensor:
    """Ground truth [N,300,400,3] float32 (values k/255): the 1600x1200 file, PIL resize to 768x576 with the
    default filter (bicubic), then :func:`published_resize` to 400x300."""
    folder = find_scan_folder(root, scan)
    out = []
    for k in ids:
        path = image_path(folder, k, light)
        if not path.is_file():
            raise _missing_image(path, k, light)
        im = _open(path, "RGB").resize(GT_INTERMEDIATE_SIZE, resample=Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
    return published_resize(torch.stack(out), size)


def load_dtu_eval_masks(masks_root: Optional[PathLike], scan: int, ids: Sequence[int],
                        size: Tuple[int, int] = EVAL_SIZE) -> Tuple[torch.Tensor, List[int]]:
    """Binary per-channel masks [N,H,W,3] at ``size`` and the ids that had a mask file: each file as RGB, PIL
    resize (bicubic) to 400x300, /255, > 0.01. A missing file (or no ``masks_root``) gives all ones."""
    w, h = int(size[0]), int(size[1])
    if masks_root is not None and not Path(masks_root).is_dir():
        raise FileNotFoundError(f"DTU masks folder not found: {masks_root} (expected RegNeRF's idrmasks folder "
                                f"with scan{scan}/mask/000.png ...)")
    out, found = [], []
    for k in ids:
        path = mask_path(masks_root, scan, k) if masks_root is not None else None
        if path is None:
            out.append(torch.ones(h, w, 3))
            continue
        m = np.asarray(_open(path, "RGB").resize((w, h), resample=Image.BICUBIC), dtype=np.float32) / 255.0
        out.append(torch.from_numpy((m > 0.01).astype(np.float32)))
        found.append(int(k))
    return torch.stack(out), found


def binarize_masks(masks: Optional[torch.Tensor], count: int, size: Tuple[int, int] = EVAL_SIZE) -> torch.Tensor:
    """[N,H,W] soft masks (or None) -> binary [N,h,w,3] at ``size`` as the protocol does for mask files."""
    w, h = int(size[0]), int(size[1])
    if masks is None:
        return torch.ones(count, h, w, 3)
    m = published_resize(torch.as_tensor(masks).float()[..., None].expand(-1, -1, -1, 3), size)
    return (m > 0.01).float()


def _nan_mean(values: Sequence[float]) -> float:
    v = [x for x in values if x == x]
    return float(np.mean(v)) if v else float("nan")


def find_lpips(enabled: bool = True, search_dirs: Sequence[PathLike] = (), device=None):
    """(LPIPS model, None) or (None, reason) — LPIPS is reported as unavailable instead of failing."""
    from . import metrics

    if not enabled:
        return None, "LPIPS switched off"
    try:
        return metrics.load_lpips(list(search_dirs), device=device), None
    except metrics.LPIPSUnavailable as e:
        return None, str(e)


def dtu_metrics(preds: Sequence[torch.Tensor], gt: torch.Tensor, masks: Optional[torch.Tensor], ids: Sequence[int],
                train_ids: Optional[Sequence[int]] = None, seeds: Optional[Sequence] = None, lpips_model=None,
                lpips_reason: Optional[str] = None) -> dict:
    """Metrics of one scan under the published protocol, on images already at the evaluation size.

    Args:
        preds: one [N,H,W,3] float 0..1 tensor per seed (same views as ``gt``).
        gt: [N,H,W,3] float 0..1.  masks: [N,H,W,3] or [N,H,W] (1 = evaluated), or None for all ones.
        ids: the N camera ids (labels and train/held-out marking).
        train_ids: the training views (e.g. ``dtu_subset_ids(3)``); adds ``train_mean`` / ``heldout_mean``
            (upstream's validation "train"/"test" numbers). Without it only the mean over all views is given,
            which is what ``summarize_dtu.py`` reports (all 34 views, training views included).
        lpips_model: an :class:`nvs_core.metrics.LPIPS`, or None with ``lpips_reason`` saying why.

    Returns a JSON-ready dict: ``per_seed`` (per-view psnr/ssim/lpips and their means), ``psnr``/``ssim``/
    ``lpips`` = mean over seeds of the per-seed means (NaN-skipping), and the split means.
    """
    from . import metrics

    ids = [int(i) for i in ids]
    seeds = list(seeds) if seeds is not None else list(range(len(preds)))
    if len(seeds) != len(preds):
        raise ValueError(f"{len(preds)} prediction sets but {len(seeds)} seed labels")
    if not preds:
        raise ValueError("no predictions to evaluate")
    if len(ids) != gt.shape[0]:
        raise ValueError(f"{gt.shape[0]} ground-truth views but {len(ids)} camera ids")
    per_seed = []
    for seed, pred in zip(seeds, preds):
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(f"predictions of seed {seed} are {tuple(pred.shape)} but the ground truth is "
                             f"{tuple(gt.shape)}; expected one prediction per view at the same size")
        r = metrics.compute_metrics(pred, gt, masks, lpips_model=lpips_model)
        per_seed.append({"seed": seed, "psnr": r["psnr"], "ssim": r["ssim"], "lpips": r.get("lpips"),
                         "psnr_mean": r["psnr_mean"], "ssim_mean": r["ssim_mean"], "lpips_mean": r.get("lpips_mean")})
    names = ("psnr", "ssim") + (("lpips",) if lpips_model is not None else ())
    out = {"views": ids, "seeds": seeds, "per_seed": per_seed, "count": len(ids),
           "lpips_available": lpips_model is not None, "lpips_reason": lpips_reason, "protocol": PROTOCOL}
    for n in ("psnr", "ssim", "lpips"):
        out[n] = _nan_mean([s[f"{n}_mean"] for s in per_seed]) if n in names else None
    if train_ids is not None:
        train = set(int(i) for i in train_ids)
        out["split"] = ["train" if i in train else "heldout" for i in ids]
        for group in ("train", "heldout"):
            rows = [j for j, s in enumerate(out["split"]) if s == group]
            out[f"{group}_mean"] = {n: (_nan_mean([s[n][j] for s in per_seed for j in rows]) if n in names else None)
                                    for n in ("psnr", "ssim", "lpips")}
            out[f"{group}_count"] = len(rows)
    return out


def format_dtu_table(result: dict, title: str = "") -> str:
    """Fixed-width text: one row per (view, seed), then the means."""
    fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [title] if title else []
    lines.append(f"{'cam':>5} {'split':>8} {'seed':>6} {'PSNR':>9} {'SSIM':>8} {'LPIPS':>8}")
    lines.append("-" * len(lines[-1]))
    split = result.get("split") or ["-"] * len(result["views"])
    for j, k in enumerate(result["views"]):
        for s in result["per_seed"]:
            lp = s["lpips"][j] if s["lpips"] is not None else None
            lines.append(f"{k:>5} {split[j]:>8} {str(s['seed']):>6} {fmt(s['psnr'][j], 3):>9} "
                         f"{fmt(s['ssim'][j], 4):>8} {fmt(lp, 4):>8}")
    lines.append("-" * len(lines[-1]))
    for s in result["per_seed"]:
        lines.append(f"{'mean':>5} {'all':>8} {str(s['seed']):>6} {fmt(s['psnr_mean'], 3):>9} "
                     f"{fmt(s['ssim_mean'], 4):>8} {fmt(s['lpips_mean'], 4):>8}")
    for group in ("train", "heldout"):
        g = result.get(f"{group}_mean")
        if g is not None and result.get(f"{group}_count"):
            lines.append(f"{'mean':>5} {group:>8} {'all':>6} {fmt(g['psnr'], 3):>9} {fmt(g['ssim'], 4):>8} "
                         f"{fmt(g['lpips'], 4):>8}")
    lines.append(f"{'MEAN':>5} {'all':>8} {'all':>6} {fmt(result['psnr'], 3):>9} {fmt(result['ssim'], 4):>8} "
                 f"{fmt(result['lpips'], 4):>8}   ({result['count']} views x {len(result['per_seed'])} seeds)")
    if not result["lpips_available"]:
        lines.append("LPIPS unavailable: " + (result.get("lpips_reason") or "no model").splitlines()[0])
    return "\n".join(lines)


def select_eval_views(ids: Sequence[int], views: str = "given", subset: Optional[int] = None) -> List[int]:
    """Which of ``ids`` to evaluate: "given"/"all" (every one: summarize_dtu's all-34 protocol),
    "test" (the 25 standard test views), "heldout" (those not in training ``subset``: the validation protocol)."""
    ids = [int(i) for i in ids]
    if views in ("given", "all", "found"):
        return ids
    if views == "test":
        keep = set(DTU_TEST_IDS)
    elif views == "heldout":
        if subset is None:
            raise ValueError("views 'heldout' needs the training subset (1, 3, 6, 9, ...) to leave out")
        keep = set(range(CALIBRATION_COUNT)) - set(dtu_subset_ids(subset))
    else:
        raise ValueError(f"views must be 'all', 'test' or 'heldout', got {views!r}")
    chosen = [i for i in ids if i in keep]
    if not chosen:
        raise ValueError(f"none of the views {ids} is in the '{views}' selection")
    return chosen


# ----------------------------------------------------------------------------- published results
@dataclass
class DTUResults:
    """One entry of a published ``results_all_iter_{N}.pt``: predictions per seed, ground truth and masks
    as stored (already at 300x400), converted to [N,H,W,3] float32, plus the stored ``*_mean`` numbers."""

    preds: List[torch.Tensor]
    gt: torch.Tensor
    masks: torch.Tensor
    stored: Dict[str, float]
    label: Optional[str] = None


def _nchw_images(value, what: str, path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[1] != 3 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{path}: '{what}' must be a float tensor (N,3,H,W) in 0..1, got {shape}")
    value = value.detach().to("cpu", torch.float32)
    if not torch.isfinite(value).all():
        raise ValueError(f"{path}: '{what}' contains NaN or Inf")
    return value.permute(0, 2, 3, 1).contiguous()


def read_dtu_results(path: PathLike) -> List[DTUResults]:
    """Read a ViewNeTI ``results_all_iter_{N}.pt`` safely (``torch.load(weights_only=True)``).

    The published files are flat dicts (``imgs_pred``: a list per seed of (34,3,300,400) tensors in 0..1,
    ``imgs_gt`` (34,3,300,400), ``masks`` (34,3,300,400) binary, and ``*_mean`` floats); the repository's
    current ``scripts/inference.py`` would nest such a dict under an object-token key (None in modes != 3).
    Both are read; one :class:`DTUResults` per entry.
    """
    from .checkpoints import load_torch_weights

    data = load_torch_weights(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with 'imgs_pred', 'imgs_gt' and 'masks', got {type(data).__name__}")
    entries = [(None, data)] if "imgs_gt" in data else [(k, v) for k, v in data.items() if isinstance(v, dict)]
    if not entries or not all("imgs_gt" in v for _, v in entries):
        raise ValueError(f"{path}: expected ViewNeTI results with 'imgs_pred', 'imgs_gt' and 'masks' (flat, or "
                         f"nested per object token), found keys {list(data)[:8]}")
    out = []
    for label, entry in entries:
        where = f"{path}" + (f" [{label!r}]" if label is not None else "")
        missing = [k for k in ("imgs_pred", "imgs_gt", "masks") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {missing}; expected 'imgs_pred', 'imgs_gt' and 'masks'")
        gt = _nchw_images(entry["imgs_gt"], "imgs_gt", where)
        masks = _nchw_images(entry["masks"], "masks", where)
        raw = entry["imgs_pred"]
        raw = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        preds = [_nchw_images(p, f"imgs_pred[{i}]", where) for i, p in enumerate(raw)]
        for name, t in [("masks", masks)] + [(f"imgs_pred[{i}]", p) for i, p in enumerate(preds)]:
            if t.shape != gt.shape:
                raise ValueError(f"{where}: '{name}' is {tuple(t.permute(0, 3, 1, 2).shape)} but 'imgs_gt' is "
                                 f"{tuple(gt.permute(0, 3, 1, 2).shape)}")
        if not preds:
            raise ValueError(f"{where}: 'imgs_pred' is empty")
        stored = {k: float(v) for k, v in entry.items() if k.endswith("_mean") and isinstance(v, (int, float))}
        out.append(DTUResults(preds, gt, masks, stored, None if label is None else str(label)))
    return out


def evaluate_dtu_results(path: PathLike, ids: Optional[Sequence[int]] = None, views: str = "all",
                         subset: Optional[int] = None, lpips_model=None, lpips_reason: Optional[str] = None) -> List[dict]:
    """Recompute the metrics of a ``results_all_iter_*.pt`` (one result per entry). Its 34 views are the sorted
    train + test ids unless ``ids`` says otherwise; ``views`` picks all / test / heldout (needs ``subset``)."""
    results = []
    for entry in read_dtu_results(path):
        n = entry.gt.shape[0]
        view_ids = [int(i) for i in ids] if ids is not None else (list(DTU_EVAL_IDS) if n == len(DTU_EVAL_IDS) else None)
        if view_ids is None:
            if views != "all" or subset is not None:
                raise ValueError(f"{path}: {n} views, not the standard 34, so their camera ids are unknown; give the ids")
            view_ids = list(range(n))
        if len(view_ids) != n:
            raise ValueError(f"{path}: {n} views but {len(view_ids)} camera ids given")
        keep = select_eval_views(view_ids, views, subset)
        rows = [view_ids.index(k) for k in keep]
        r = dtu_metrics([p[rows] for p in entry.preds], entry.gt[rows], entry.masks[rows], keep,
                        train_ids=dtu_subset_ids(subset) if subset is not None else None,
                        lpips_model=lpips_model, lpips_reason=lpips_reason)
        r.update(source=str(path), label=entry.label, stored=entry.stored)
        results.append(r)
    return results


# ------------------------------------------------------------------------------- prediction folders
PREDICTION_NAMING = ("prediction file names (any image extension): the 0-based camera id as 'cam{k}' between "
                     "underscores (scan114_cam25.png, cam025_seed1.png) or DTU's 1-based 'rect_{k+1:03d}_...' "
                     "(rect_026_3_r5000.png); an optional 'seed{s}' part groups files into seeds")
_CAM_RE = re.compile(r"(?:^|_)cam(\d+)(?:_|$)")
_RECT_RE = re.compile(r"^rect_(\d{3})(?:_|$)")
_SEED_RE = re.compile(r"(?:^|_)seed(\d+)(?:_|$)")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_prediction_folder(folder: PathLike) -> Dict[Optional[int], Dict[int, Path]]:
    """{seed (None without seed parts): {camera id: file}} of a folder of predicted views (see
    ``PREDICTION_NAMING``). Other image files are ignored with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"predictions folder not found: {folder}")
    found: Dict[Optional[int], Dict[int, Path]] = {}
    ignored = []
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in _IMAGE_EXT or not f.is_file():
            continue
        cam, rect, seed = _CAM_RE.search(f.stem), _RECT_RE.match(f.stem), _SEED_RE.search(f.stem)
        if cam is None and rect is None:
            ignored.append(f.name)
            continue
        k = int(cam.group(1)) if cam is not None else int(rect.group(1)) - 1
        s = int(seed.group(1)) if seed is not None else None
        if k in found.setdefault(s, {}):
            raise ValueError(f"{folder}: camera {k}{'' if s is None else f' seed {s}'} has two files, "
                             f"{found[s][k].name} and {f.name}")
        found[s][k] = f
    if ignored:
        log.warning("%s: ignoring %d image(s) without a camera id: %s", folder, len(ignored), ", ".join(ignored[:5]))
    if not found:
        raise ValueError(f"{folder}: no predicted views found; expected {PREDICTION_NAMING}")
    views = {s: sorted(v) for s, v in found.items()}
    first = next(iter(views.values()))
    for s, v in views.items():
        if v != first:
            raise ValueError(f"{folder}: seeds cover different views (seed {s}: {v} vs {first}); every seed needs "
                             "the same views")
    return found


def _read_prediction(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(_open(path, "RGB"), dtype=np.uint8).copy())


def evaluate_dtu_folder(predictions: PathLike, root: PathLike, scan: int, masks: Optional[PathLike] = None,
                        light: Union[int, str] = DTU_LIGHT, views: str = "given", subset: Optional[int] = None,
                        lpips_model=None, lpips_reason: Optional[str] = None) -> dict:
    """Evaluate a folder of predicted views (any size, 4:3 expected) against DTU ``scan`` under the protocol."""
    found = read_prediction_folder(predictions)
    seeds = sorted(found, key=lambda s: -1 if s is None else s)
    ids = select_eval_views(sorted(found[seeds[0]]), views, subset)
    gt = load_dtu_eval_ground_truth(root, scan, ids, light)
    mask_t, with_mask = load_dtu_eval_masks(masks, scan, ids)
    if masks is not None and not with_mask:
        log.warning("no mask files for scan %s in %s: every view is evaluated unmasked (all-ones masks)", scan, masks)
    preds = []
    for s in seeds:
        imgs = [_read_prediction(found[s][k]) for k in ids]
        sizes = {tuple(i.shape) for i in imgs}
        if len(sizes) != 1:
            raise ValueError(f"{predictions}: predicted views of seed {s} differ in size: {sorted(sizes)}")
        preds.append(published_resize(torch.stack(imgs)))
    r = dtu_metrics(preds, gt, mask_t, ids, train_ids=dtu_subset_ids(subset) if subset is not None else None,
                    seeds=[s if s is not None else 0 for s in seeds], lpips_model=lpips_model, lpips_reason=lpips_reason)
    r.update(source=str(predictions), scan=int(scan), masks_found=with_mask)
    return r


# --------------------------------------------------------------------------------------------- CLI
def _json_safe(value):
    if isinstance(value, float):
        return None if value != value else (("inf" if value > 0 else "-inf") if abs(value) == float("inf") else value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def summarize_results(results: Sequence[dict]) -> dict:
    """``summarize_dtu.py``: per seed position, the mean over results (scans) of the per-seed means."""
    n_seeds = min(len(r["per_seed"]) for r in results)
    per_seed = []
    for i in range(n_seeds):
        row = {"seed": results[0]["per_seed"][i]["seed"]}
        for n in ("psnr", "ssim", "lpips"):
            vals = [r["per_seed"][i][f"{n}_mean"] for r in results]
            row[n] = None if any(v is None for v in vals) else _nan_mean(vals)
        per_seed.append(row)
    out = {"files": len(results), "per_seed": per_seed}
    for n in ("psnr", "ssim", "lpips"):
        vals = [s[n] for s in per_seed]
        out[n] = None if any(v is None for v in vals) else _nan_mean(vals)
    return out


def _default_lpips_dirs() -> List[str]:
    import os

    base = os.environ.get("NVS_MODELS_DIR", os.path.join(os.getcwd(), "models", "nvs"))
    return [os.path.join(base, "lpips")]


def _parse_ids(text: Optional[str]) -> Optional[List[int]]:
    if text is None or not text.strip():
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--view-ids: expected 0-based camera ids like '0,1,2', got {text!r}") from None


def add_cli(sub) -> None:
    p = sub.add_parser("dtu-eval", help="evaluate DTU novel views with ViewNeTI's published protocol (masked "
                                        "PSNR/SSIM, LPIPS-VGG when its weights are present)",
                       description=PROTOCOL + ". Give --results (published results_all_iter_*.pt files) or "
                                   "--pred (a folder of predicted views) with --root and --scan. "
                                   + PREDICTION_NAMING[0].upper() + PREDICTION_NAMING[1:] + ".")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", nargs="+", help="ViewNeTI results_all_iter_*.pt file(s); several are averaged "
                                                  "per seed like summarize_dtu.py")
    src.add_argument("--pred", help="folder of predicted views (naming: see above)")
    p.add_argument("--root", help="DTU folder holding Rectified/scan{ID}/ (needed with --pred)")
    p.add_argument("--scan", type=int, help="DTU scan number (needed with --pred)")
    p.add_argument("--masks", help="RegNeRF idrmasks folder (scan{ID}/mask/{k:03d}.png); views without a mask "
                                   "are evaluated unmasked")
    p.add_argument("--light", default=str(DTU_LIGHT), help="lighting index of the image names (default 3)")
    p.add_argument("--views", choices=("all", "test", "heldout"), default="all",
                   help="all given views (summarize_dtu: all 34 incl. training views), the 25 standard test views, "
                        "or the views held out from --subset (validation)")
    p.add_argument("--subset", type=int, choices=sorted(DTU_SUBSETS),
                   help="training subset: marks train / held-out views and adds their means")
    p.add_argument("--view-ids", help="camera ids of a results file's rows when it does not hold the standard 34")
    p.add_argument("--lpips-dir", action="append", help="folder with vgg16-397923af.pth and vgg.pth "
                                                        "(default $NVS_MODELS_DIR/lpips or ./models/nvs/lpips)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--device", default="cpu", help="device for LPIPS (cpu, cuda, ...)")
    p.add_argument("--json", help="also write the full per-view results to this JSON file")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    import json

    model, reason = find_lpips(not args.no_lpips, args.lpips_dir or _default_lpips_dirs(), device=args.device)
    if args.pred is not None:
        if args.root is None or args.scan is None:
            raise SystemExit("dtu-eval: --pred needs --root (the DTU folder) and --scan")
        results = [evaluate_dtu_folder(args.pred, args.root, args.scan, args.masks, args.light, args.views,
                                       args.subset, model, reason)]
    else:
        results = []
        for path in args.results:
            results += evaluate_dtu_results(path, _parse_ids(args.view_ids), args.views, args.subset, model, reason)
    for r in results:
        title = r["source"] + (f" [{r['label']}]" if r.get("label") else "")
        print(format_dtu_table(r, title))
        if r.get("stored"):
            print("stored in file: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["stored"].items())))
        print()
    summary = summarize_results(results)
    summary.update(views=args.views, subset=args.subset, lpips_available=model is not None,
                   lpips_reason=None if reason is None else reason.splitlines()[0])
    if len(results) == 1:
        for key in ("count", "train_mean", "heldout_mean", "scan", "masks_found"):
            if key in results[0]:
                summary[key] = results[0][key]
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe({"summary": summary, "results": results}), indent=1))
    print(json.dumps(_json_safe(summary)))
    return 0
