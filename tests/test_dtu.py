"""DTU reader (splits, file patterns, cameras) and the published ViewNeTI evaluation protocol."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvs_core import dtu
from nvs_core.viewneti.camera_tokens import dtu_projections_from_cameras, read_dtu_projection
from tests.paths import SHARED

CAL18 = SHARED / "golden" / "viewneti" / "cal18_synthetic"
SCAN = 114


def _rng_image(seed: int, w: int, h: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_tiny_dtu(tmp: Path, scan: int = SCAN, ids=dtu.DTU_EVAL_IDS, size=(32, 24), light=3,
                  masks_layout: str = "mask") -> Path:
    """A DTU root in ``tmp``: Rectified/scan{scan} (1-based rect_ files), Calibration/cal18 (copied from the
    golden synthetic set, or a written copy of it when the shared folder is absent), idrmasks (0-based)."""
    root = Path(tmp) / "dtu"
    rect = root / "Rectified" / f"scan{scan}"
    rect.mkdir(parents=True, exist_ok=True)
    cal = root / "Calibration" / "cal18"
    if not cal.is_dir():
        if not CAL18.is_dir():
            pytest.skip(f"golden calibration folder not found at {CAL18}")
        shutil.copytree(CAL18, cal)
    w, h = size
    for k in ids:
        Image.fromarray(_rng_image(k, w, h)).save(rect / f"rect_{k + 1:03d}_{light}_r5000.png")
    if masks_layout:
        mdir = root / "idrmasks" / f"scan{scan}"
        mdir = mdir / "mask" if masks_layout == "mask" else mdir
        mdir.mkdir(parents=True, exist_ok=True)
        for k in ids[::2]:  # every other view has a mask; the rest fall back to all ones
            m = np.zeros((h, w), np.uint8)
            m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
            Image.fromarray(m).save(mdir / f"{k:03d}.png")
    return root


# ----------------------------------------------------------------------------------------- splits
def test_split_constants():
    assert dtu.DTU_TRAIN_IDS == (25, 22, 28, 40, 44, 48, 0, 8, 13)
    assert dtu.DTU_TEST_IDS == (1, 2, 9, 10, 11, 12, 14, 15, 23, 24, 26, 27, 29, 30, 31, 32, 33, 34, 35, 41, 42, 43,
                                45, 46, 47)
    assert len(dtu.DTU_EVAL_IDS) == 34 and list(dtu.DTU_EVAL_IDS) == sorted(dtu.DTU_EVAL_IDS)
    assert set(dtu.DTU_EVAL_IDS) | set(dtu.DTU_EXCLUDED_IDS) == set(range(49))
    assert dtu.dtu_subset_ids(1) == [25] and dtu.dtu_subset_ids(3) == [25, 22, 28]
    assert dtu.dtu_subset_ids(6) == [25, 22, 28, 40, 44, 48] and len(dtu.dtu_subset_ids(9)) == 9
    assert sorted(dtu.dtu_subset_ids(0)) == list(dtu.DTU_EVAL_IDS)
    assert dtu.dtu_subset_ids(-1) == list(range(12, 36)) and dtu.dtu_subset_ids(-3) == list(range(12, 36, 3))
    assert dtu.DTU_TEST_SCANS == (8, 21, 30, 31, 34, 38, 40, 41, 45, 55, 63, 82, 103, 110, 114)
    assert len(dtu.DTU_PRETRAIN_SCANS) == 88 and not set(dtu.DTU_PRETRAIN_SCANS) & set(dtu.DTU_TEST_SCANS)
    assert not set(dtu.DTU_PRETRAIN_SCANS) & set(dtu.DTU_TRAIN_EXCLUDED_SCANS)


def test_resolve_views():
    assert dtu.resolve_dtu_views("train") == sorted(dtu.DTU_TRAIN_IDS)
    assert dtu.resolve_dtu_views("TEST") == list(dtu.DTU_TEST_IDS)
    assert dtu.resolve_dtu_views("all") == list(dtu.DTU_EVAL_IDS)
    assert dtu.resolve_dtu_views(3) == [22, 25, 28]          # dataset order: sorted by camera id
    assert dtu.resolve_dtu_views([28, 5]) == [28, 5]        # explicit ids keep their order
    for bad, msg in [("val", "views must be"), (2, "subset must be one of"), ([64], "0..63"),
                     ([1, 1], "repeat"), ([], "empty"), (True, "views must be")]:
        with pytest.raises(ValueError, match=msg):
            dtu.resolve_dtu_views(bad)


# ----------------------------------------------------------------------------------------- reader
def test_load_scan_files_cameras_and_names(tmp_path):
    root = make_tiny_dtu(tmp_path, ids=(21, 24, 27))
    mv = dtu.load_dtu_scan(root, SCAN, views=[24, 21], size=None)
    assert mv.names == ["scan114_cam24", "scan114_cam21"] and dtu.dtu_camera_ids(mv) == [24, 21]
    assert dtu.dtu_scan_ids(mv) == [SCAN, SCAN] and mv.masks is None
    # file 1-based: camera 24 is rect_025
    expect = _rng_image(24, 32, 24).astype(np.float32) / 255
    assert np.array_equal(mv.images[0].numpy(), expect)
    # cameras: the calibration projection back from NVS_CAMERA, up to the file's matrix scale
    for i, k in enumerate([24, 21]):
        P = read_dtu_projection(CAL18 / f"pos_{k + 1:03d}.txt").double()
        Q = dtu_projections_from_cameras(mv.cameras[i:i + 1].with_size(1600, 1200))[0]
        P = P / P[2, :3].norm()
        assert torch.allclose(Q, P, rtol=1e-5, atol=1e-6 * P.abs().max().item())
    # names survive indexing and concatenation
    both = type(mv).cat([mv[1:], mv[:1]])
    assert dtu.dtu_camera_ids(both) == [21, 24]


def test_load_scan_resize_masks_and_layouts(tmp_path):
    root = make_tiny_dtu(tmp_path, ids=(22, 25, 28), size=(64, 48), masks_layout="flat")
    mv = dtu.load_dtu_scan(root / "Rectified", SCAN, views=3, size=(32, 24), masks=root / "idrmasks",
                           calibration=root / "Calibration" / "cal18")
    assert tuple(mv.images.shape) == (3, 24, 32, 3) and (mv.cameras.width, mv.cameras.height) == (32, 24)
    ref = Image.fromarray(_rng_image(22, 64, 48)).resize((32, 24), Image.BICUBIC)
    assert np.array_equal((mv.images[0].numpy() * 255).round().astype(np.uint8), np.asarray(ref))
    # masks written for 22 and 28 (ids[::2]); 25 has none -> all ones
    assert mv.masks[1].min() == 1 and mv.masks[0].min() == 0 and mv.masks[0].max() == 1
    # the scan folder itself, and the official "_train" folder name
    (root / "Rectified" / f"scan{SCAN}").rename(root / "Rectified" / f"scan{SCAN}_train")
    mv2 = dtu.load_dtu_scan(root, SCAN, views=[22], size=None)
    assert mv2.images.shape[1:3] == (48, 64)


def test_load_scan_errors(tmp_path):
    root = make_tiny_dtu(tmp_path, ids=(22, 25), masks_layout="")
    with pytest.raises(FileNotFoundError, match="DTU scan 8 not found"):
        dtu.load_dtu_scan(root, 8)
    with pytest.raises(FileNotFoundError, match=r"rect_029_3_r5000\.png.*rect_\{k\+1:03d\}.*camera id 28"):
        dtu.load_dtu_scan(root, SCAN, views=3)
    with pytest.raises(FileNotFoundError, match="exists with light 3"):
        dtu.load_dtu_scan(root, SCAN, views=[22], light=5)
    (root / "Calibration" / "cal18" / "pos_026.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"pos_026\.txt.*pos_\{k\+1:03d\}\.txt.*camera id 25"):
        dtu.load_dtu_scan(root, SCAN, views=[22, 25])
    with pytest.raises(FileNotFoundError, match="calibration folder not found"):
        dtu.load_dtu_scan(root, SCAN, views=[22], calibration=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="masks folder not found"):
        dtu.load_dtu_scan(root, SCAN, views=[22], masks=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="DTU root folder not found"):
        dtu.load_dtu_scan(tmp_path / "nowhere", SCAN)
    (root / "Rectified" / f"scan{SCAN}" / "rect_023_3_r5000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        dtu.load_dtu_scan(root, SCAN, views=[22])
    with pytest.raises(ValueError, match="not a DTU view name"):
        dtu.parse_dtu_view_name("view_000")
