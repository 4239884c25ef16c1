"""DTU nodes: NVS Load DTU Scan and NVS DTU Evaluate, without ComfyUI."""
import json

import numpy as np
import pytest
import torch

from tests.conftest import load_pack
from tests.test_dtu import SCAN, make_tiny_dtu

pack = load_pack()


def _node(node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


def tiny_dtu_root(tmp):
    """A DTU root with the 9 train views of scan 114 (used by tests/test_nodes.py too)."""
    return make_tiny_dtu(tmp, ids=(0, 8, 13, 22, 25, 28, 40, 44, 48))


def test_load_scan_node(tmp_path):
    root = tiny_dtu_root(tmp_path)
    mv, images, masks, cams = _node("NVSLoadDTUScan").load(str(root), SCAN, "subset 3", "3", 16, 12,
                                                           masks_folder=str(root / "idrmasks"))
    assert mv.names == ["scan114_cam22", "scan114_cam25", "scan114_cam28"]
    assert tuple(images.shape) == (3, 12, 16, 3) and tuple(masks.shape) == (3, 12, 16) and len(cams) == 3
    assert (cams.width, cams.height) == (16, 12)
    mv, images, masks, _ = _node("NVSLoadDTUScan").load(str(root), SCAN, "custom ids", "3", 0, 0, view_ids="48, 0")
    assert mv.names == ["scan114_cam48", "scan114_cam00"] and images.shape[1:3] == (24, 32) and masks.min() == 1
    for kwargs, msg in [({"views": "custom ids", "view_ids": ""}, "view_ids: give at least one"),
                        ({"views": "custom ids", "view_ids": "a,b"}, "view_ids: expected 0-based"),
                        ({"views": "everything"}, "views must be one of"),
                        ({"width": 0}, "width and height"),
                        ({"root": ""}, "root: give a folder"),
                        ({"views": "test (25 views)"}, "rect_002_3_r5000.png")]:
        args = dict(root=str(root), scan=SCAN, views="subset 1 (cam 25)", light="3", width=16, height=12)
        args.update(kwargs)
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            _node("NVSLoadDTUScan").load(**args)


def test_evaluate_node_with_dtu_root(tmp_path):
    root = tiny_dtu_root(tmp_path)
    mv = _node("NVSLoadDTUScan").load(str(root), SCAN, "train (subset 9)", "3", 32, 24)[0]
    pred = mv.images.clone()
    pred[4] = 1 - pred[4]  # camera 25 predicted badly
    out = _node("NVSDTUEvaluate").evaluate(pred, mv, True, dtu_root=str(root), masks_folder=str(root / "idrmasks"),
                                           training_subset="1")
    table, summary, psnr, ssim, lpips = out["result"]
    data = json.loads(summary)
    assert out["ui"]["text"] == [table] and "LPIPS unavailable" in table
    assert data["views"] == [0, 8, 13, 22, 25, 28, 40, 44, 48] and data["split"][4] == "train"
    assert data["train_mean"]["psnr"] == pytest.approx(data["per_view"]["psnr"][4])
    assert data["train_mean"]["psnr"] < data["heldout_mean"]["psnr"] and np.isnan(lpips)
    # without dtu_root the multiview's own images are the ground truth: a perfect prediction scores inf
    same = json.loads(_node("NVSDTUEvaluate").evaluate(mv.images, mv, False)["result"][1])
    assert same["psnr"] == "inf" and same["ssim"] == pytest.approx(1.0)


def test_evaluate_node_views_and_errors(tmp_path):
    root = tiny_dtu_root(tmp_path)
    mv = _node("NVSLoadDTUScan").load(str(root), SCAN, "train (subset 9)", "3", 32, 24)[0]
    node = _node("NVSDTUEvaluate")
    with pytest.raises(ValueError, match="none of the views"):
        node.evaluate(mv.images, mv, False, views="test")
    r = json.loads(node.evaluate(mv.images, mv, False, views="heldout", training_subset="3")["result"][1])
    assert r["views"] == [0, 8, 13, 40, 44, 48] and r["psnr"] == "inf"
    with pytest.raises(ValueError, match="one per view"):
        node.evaluate(mv.images[:2], mv, False)
    with pytest.raises(ValueError, match="aspect ratios must match"):
        node.evaluate(torch.rand(9, 24, 24, 3), mv, False)
    plain = type(mv)(mv.images, mv.cameras)  # no names: no DTU ids
    with pytest.raises(ValueError, match="carry no DTU camera ids"):
        node.evaluate(mv.images, plain, False, dtu_root=str(root))
    noisy = (mv.images + 0.05 * torch.randn(mv.images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    t = node.evaluate(noisy, plain, False)["result"]
    assert 15 < t[2] < 40 and 0 < t[3] < 1
