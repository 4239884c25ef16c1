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
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .cameras import Cameras
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
