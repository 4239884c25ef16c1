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


# ------------------------------------------------------------------- independent reference code
def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Keys cubic (a = -0.75), half-pixel centres, edge clamping, no antialias: (n_out, n_in)."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            m[o, min(max(tap, 0), n_in - 1)] += _cubic(src - tap)
    return m


def _ref_resize(img_u8: np.ndarray, w: int, h: int) -> np.ndarray:
    """[H,W,3] uint8 -> [h,w,3] float64 0..255 before rounding: separable bicubic, clamped."""
    x = img_u8.astype(np.float64)
    if x.shape[:2] != (h, w):
        x = np.einsum("oh,hwc->owc", _bicubic_matrix(x.shape[0], h), x)
        x = np.einsum("pw,owc->opc", _bicubic_matrix(x.shape[1], w), x)
    return np.clip(x, 0, 255)


def _assert_rounds_to(ours: np.ndarray, ref: np.ndarray):
    """``ours`` (0..1 on the 1/255 grid) is ``ref`` (0..255, unrounded) rounded, except at near-ties (x.5),
    where float32 (torch) and float64 (here) may round differently by one level."""
    got = ours.astype(np.float64) * 255
    assert np.abs(got - got.round()).max() < 1e-3          # on the 8-bit grid
    tie = np.abs(ref - np.floor(ref) - 0.5) < 1e-2  # torch accumulates in float32 (errors ~3e-3)
    assert np.array_equal(got.round()[~tie], ref.round()[~tie])
    assert np.abs(got - ref)[tie].max(initial=0) <= 0.5 + 1e-2


def _ref_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray):
    """Upstream's formulas on [N,3,H,W] float arrays: masked MSE/PSNR and skimage SSIM of masked images."""
    from skimage.metrics import structural_similarity

    n = len(pred)
    mse = ((gt * mask - pred * mask) ** 2).reshape(n, -1).sum(1) / mask.reshape(n, -1).sum(1)
    psnr = -10 * np.log10(mse)
    ssim = np.array([structural_similarity(p * m, g * m, channel_axis=0, data_range=1.0)
                     for p, g, m in zip(pred, gt, mask)])
    return psnr, ssim


# --------------------------------------------------------------------------------- resize chain
def test_published_resize_matches_reference_bicubic():
    img = _rng_image(3, 40, 30)
    for w, h in [(20, 15), (64, 48), (40, 30)]:
        ours = dtu.published_resize(torch.from_numpy(img)[None], (w, h))[0].numpy()
        assert ours.shape == (h, w, 3)
        _assert_rounds_to(ours, _ref_resize(img, w, h))
    # float inputs are first rounded to 8 bits
    f = torch.from_numpy(img).float()[None] / 255 + 0.001
    assert torch.equal(dtu.published_resize(f, (40, 30)), torch.from_numpy(img).float()[None] / 255)


def test_ground_truth_chain_from_1600x1200(tmp_path):
    root = make_tiny_dtu(tmp_path, ids=(), masks_layout="")
    yy, xx = np.mgrid[0:1200, 0:1600]
    big = np.stack([(xx * 255 // 1599), (yy * 255 // 1199), ((xx + yy) % 256)], -1).astype(np.uint8)
    Image.fromarray(big).save(root / "Rectified" / f"scan{SCAN}" / "rect_026_3_r5000.png")
    gt = dtu.load_dtu_eval_ground_truth(root, SCAN, [25])
    mid = np.asarray(Image.fromarray(big).resize((768, 576), Image.BICUBIC))
    assert gt.shape == (1, 300, 400, 3)
    _assert_rounds_to(gt[0].numpy(), _ref_resize(mid, 400, 300))
    # masks: 1600x1200 file -> PIL bicubic 400x300, /255 > 0.01; 'mask/' level or not; missing -> ones
    m = np.zeros((1200, 1600), np.uint8)
    m[300:900, 400:1200] = 255
    for layout in ("mask", "flat"):
        folder = tmp_path / layout / f"scan{SCAN}"
        folder = folder / "mask" if layout == "mask" else folder
        folder.mkdir(parents=True)
        Image.fromarray(m).save(folder / "025.png")
        masks, found = dtu.load_dtu_eval_masks(tmp_path / layout, SCAN, [25, 26])
        ref_m = np.asarray(Image.fromarray(m).convert("RGB").resize((400, 300), Image.BICUBIC)) / 255 > 0.01
        assert found == [25] and np.array_equal(masks[0].numpy(), ref_m.astype(np.float32))
        assert masks[1].min() == 1
    assert dtu.load_dtu_eval_masks(None, SCAN, [1])[0].min() == 1


# ------------------------------------------------------------------------------------ metrics
def _fake_scan_arrays(n: int, h: int = 30, w: int = 40, seeds: int = 2):
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(n, 3, h, w, generator=g) * 255).round() / 255
    preds = [((gt + 0.1 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1) * 255).round() / 255 for _ in range(seeds)]
    masks = torch.zeros(n, 3, h, w)
    masks[:, :, 5:25, 8:30] = 1
    masks[0] = 1  # one view unmasked
    return preds, gt, masks


def test_dtu_metrics_match_independent_formulas():
    preds, gt, masks = _fake_scan_arrays(4)
    ids = [22, 25, 28, 40]
    nhwc = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
    r = dtu.dtu_metrics([nhwc(p) for p in preds], nhwc(gt), nhwc(masks), ids, train_ids=dtu.dtu_subset_ids(1),
                        lpips_reason="no weights")
    for s, p in zip(r["per_seed"], preds):
        psnr, ssim = _ref_metrics(p.numpy().astype(np.float64), gt.numpy().astype(np.float64), masks.numpy())
        assert np.allclose(s["psnr"], psnr, atol=1e-6) and np.allclose(s["ssim"], ssim, atol=1e-6)
        assert s["psnr_mean"] == pytest.approx(psnr.mean()) and s["lpips"] is None
    assert r["psnr"] == pytest.approx(np.mean([s["psnr_mean"] for s in r["per_seed"]]))
    assert r["split"] == ["heldout", "train", "heldout", "heldout"] and r["train_count"] == 1
    assert r["train_mean"]["psnr"] == pytest.approx(np.mean([s["psnr"][1] for s in r["per_seed"]]))
    assert r["lpips"] is None and not r["lpips_available"]
    table = dtu.format_dtu_table(r)
    assert "heldout" in table and "LPIPS unavailable: no weights" in table and "MEAN" in table


def test_dtu_metrics_lpips_on_masked_images(tmp_path):
    from nvs_core import metrics

    model = metrics.LPIPS()
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data = torch.rand(p.shape, generator=g) * 0.05
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")},
               tmp_path / "vgg16-397923af.pth")
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    loaded, reason = dtu.find_lpips(True, [tmp_path])
    assert reason is None
    preds, gt, masks = _fake_scan_arrays(2, 32, 32, seeds=1)
    nhwc = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
    r = dtu.dtu_metrics([nhwc(preds[0])], nhwc(gt), nhwc(masks), [1, 2], lpips_model=loaded)
    with torch.no_grad():
        ref = model((preds[0] * masks) * 2 - 1, (gt * masks) * 2 - 1)
    assert np.allclose(r["per_seed"][0]["lpips"], ref.double().numpy(), atol=1e-5) and r["lpips_available"]
    none, why = dtu.find_lpips(True, [tmp_path / "empty"])
    assert none is None and "vgg16-397923af.pth" in why
    assert dtu.find_lpips(False)[1] == "LPIPS switched off"


# ------------------------------------------------------------------------------ results files
class _PickledClass:
    """Stands for foreign code in a results file."""


def _write_results(path: Path, n: int = 34, nested: bool = False):
    preds, gt, masks = _fake_scan_arrays(n, 12, 16)
    entry = {"imgs_pred": preds, "imgs_gt": gt, "masks": masks, "psnr_test_mean": 20.5, "ssim_train_mean": 0.8}
    torch.save({None: entry} if nested else entry, path)
    return preds, gt, masks


def test_results_file_recomputed(tmp_path):
    preds, gt, masks = _write_results(tmp_path / "results_all_iter_3000.pt")
    (r,) = dtu.evaluate_dtu_results(tmp_path / "results_all_iter_3000.pt", subset=3)
    assert r["views"] == list(dtu.DTU_EVAL_IDS) and r["stored"]["psnr_test_mean"] == 20.5
    psnr0, ssim0 = _ref_metrics(preds[0].double().numpy(), gt.double().numpy(), masks.numpy())
    assert np.allclose(r["per_seed"][0]["psnr"], psnr0, atol=1e-6)
    assert np.allclose(r["per_seed"][0]["ssim"], ssim0, atol=1e-6)
    train_rows = [j for j, k in enumerate(dtu.DTU_EVAL_IDS) if k in (22, 25, 28)]
    assert r["train_count"] == 3 and r["heldout_count"] == 31
    psnr1, _ = _ref_metrics(preds[1].double().numpy(), gt.double().numpy(), masks.numpy())
    assert r["train_mean"]["psnr"] == pytest.approx(np.mean(np.concatenate([psnr0[train_rows], psnr1[train_rows]])))
    # test-view selection, nested layout, and the per-seed average over files (summarize_dtu)
    (t,) = dtu.evaluate_dtu_results(tmp_path / "results_all_iter_3000.pt", views="test")
    assert t["views"] == list(dtu.DTU_TEST_IDS)
    _write_results(tmp_path / "nested.pt", nested=True)
    (nested,) = dtu.evaluate_dtu_results(tmp_path / "nested.pt")
    summary = dtu.summarize_results([r, nested])
    assert summary["per_seed"][0]["psnr"] == pytest.approx((r["per_seed"][0]["psnr_mean"]
                                                            + nested["per_seed"][0]["psnr_mean"]) / 2)


def test_results_file_errors(tmp_path):
    torch.save({"imgs_gt": torch.rand(2, 3, 4, 4)}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"missing \['imgs_pred', 'masks'\]"):
        dtu.read_dtu_results(tmp_path / "a.pt")
    torch.save({"imgs_pred": [torch.rand(2, 3, 4, 4)], "imgs_gt": torch.rand(2, 3, 4, 4),
                "masks": torch.ones(2, 3, 4, 5)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="'masks' is"):
        dtu.read_dtu_results(tmp_path / "b.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="expected ViewNeTI results"):
        dtu.read_dtu_results(tmp_path / "c.pt")
    torch.save({"imgs_pred": [torch.rand(5, 3, 4, 4)], "imgs_gt": torch.rand(5, 3, 4, 4),
                "masks": torch.ones(5, 3, 4, 4)}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="not the standard 34"):
        dtu.evaluate_dtu_results(tmp_path / "d.pt", views="test")
    from nvs_core.checkpoints import CheckpointError

    torch.save({"imgs_gt": _PickledClass()}, tmp_path / "e.pt")  # a pickled class: refused, never run
    with pytest.raises(CheckpointError):
        dtu.read_dtu_results(tmp_path / "e.pt")


# ---------------------------------------------------------------------------- prediction folders
def test_folder_evaluation_and_cli(tmp_path, capsys):
    import json

    from nvs_core.__main__ import main

    ids = (22, 25, 28)
    root = make_tiny_dtu(tmp_path, ids=ids)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    preds = {}
    for s in (0, 1):
        for k in ids:
            preds[s, k] = _rng_image(100 * s + k, 64, 48)
            Image.fromarray(preds[s, k]).save(pred_dir / f"scan114_cam{k}_seed{s}.png")
    (pred_dir / "grid.png").write_bytes((pred_dir / "scan114_cam22_seed0.png").read_bytes())  # ignored
    r = dtu.evaluate_dtu_folder(pred_dir, root, SCAN, masks=root / "idrmasks", subset=3)
    assert r["views"] == list(ids) and r["seeds"] == [0, 1] and r["masks_found"] == [22, 28]
    assert r["split"] == ["train"] * 3 and r["heldout_count"] == 0
    # independent: PIL 768x576 then bicubic to 400x300 for the ground truth, bicubic for predictions
    gt = np.stack([_ref_resize(np.asarray(Image.fromarray(_rng_image(k, 32, 24)).resize((768, 576), Image.BICUBIC)),
                               400, 300).round() for k in ids]) / 255
    mask = np.stack([np.asarray(Image.open(root / "idrmasks" / f"scan{SCAN}" / "mask" / f"{k:03d}.png").convert("RGB")
                                .resize((400, 300), Image.BICUBIC)) / 255 > 0.01 if k != 25 else np.ones((300, 400, 3))
                     for k in ids]).astype(np.float64)
    for s in (0, 1):
        p = np.stack([_ref_resize(preds[s, k], 400, 300).round() for k in ids]) / 255
        psnr, ssim = _ref_metrics(p.transpose(0, 3, 1, 2), gt.transpose(0, 3, 1, 2), mask.transpose(0, 3, 1, 2))
        assert np.allclose(r["per_seed"][s]["psnr"], psnr, atol=2e-3)
        assert np.allclose(r["per_seed"][s]["ssim"], ssim, atol=2e-3)

    code = main(["dtu-eval", "--pred", str(pred_dir), "--root", str(root), "--scan", str(SCAN), "--masks",
                 str(root / "idrmasks"), "--lpips-dir", str(tmp_path / "no_lpips"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert code == 0 and summary["psnr"] == pytest.approx(r["psnr"]) and summary["lpips"] is None
    assert summary["lpips_available"] is False and "LPIPS weights not found" in summary["lpips_reason"]
    assert any(line.startswith("   22    ") or " 22 " in line for line in out)
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["views"] == list(ids)


def test_results_cli(tmp_path, capsys):
    import json

    from nvs_core.__main__ import main

    _write_results(tmp_path / "results_all_iter_1500.pt")
    main(["dtu-eval", "--results", str(tmp_path / "results_all_iter_1500.pt"), "--subset", "1", "--views",
          "heldout", "--no-lpips"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["count"] == 33 and summary["heldout_mean"]["psnr"] == pytest.approx(summary["psnr"])
    assert summary["lpips_reason"] == "LPIPS switched off" and any("stored in file" in line for line in out)


def test_prediction_folder_naming_and_errors(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    img = Image.fromarray(_rng_image(0, 8, 6))
    img.save(d / "rect_026_3_r5000.png")
    img.save(d / "cam022.png")
    assert {k: f.name for k, f in dtu.read_prediction_folder(d)[None].items()} == {25: "rect_026_3_r5000.png",
                                                                                  22: "cam022.png"}
    img.save(d / "scan114_cam25.jpg")
    with pytest.raises(ValueError, match="camera 25 has two files"):
        dtu.read_prediction_folder(d)
    e = tmp_path / "e"
    e.mkdir()
    img.save(e / "view.png")
    with pytest.raises(ValueError, match="no predicted views found.*cam\\{k\\}"):
        dtu.read_prediction_folder(e)
    img.save(e / "cam1_seed0.png")
    img.save(e / "cam1_seed1.png")
    img.save(e / "cam2_seed1.png")
    with pytest.raises(ValueError, match="seeds cover different views"):
        dtu.read_prediction_folder(e)
    with pytest.raises(FileNotFoundError, match="predictions folder not found"):
        dtu.read_prediction_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'heldout' needs the training subset"):
        dtu.select_eval_views([1, 2], "heldout")


def test_per_channel_masks_in_metrics():
    from nvs_core import metrics

    g = torch.Generator().manual_seed(2)
    p, t = torch.rand(2, 8, 8, 3, generator=g), torch.rand(2, 8, 8, 3, generator=g)
    m = torch.ones(2, 8, 8, 3)
    m[:, :, :4, 1] = 0  # channel 1 masked on the left only
    got = metrics.masked_mse(p, t, m)
    ref = ((t * m - p * m) ** 2).sum((1, 2, 3)) / m.sum((1, 2, 3))
    assert torch.allclose(got, ref.double())
    with pytest.raises(ValueError, match="per channel"):
        metrics.masked_mse(p, t, torch.ones(2, 8, 8, 2))
