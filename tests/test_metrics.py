"""Tests for nvs_core.metrics (CPU, random weights; no downloads)."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage.metrics import structural_similarity

from nvs_core import metrics as M

# torchvision vgg16 "features" conv indices and their channel counts
CONV_IDX = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
CONV_CH = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
TAP_CONVS = {1, 3, 6, 9, 12}  # position in CONV_IDX after which LPIPS taps relu1_2 .. relu5_3
POOL_AFTER = {1, 3, 6, 9}
LIN_CH = [64, 128, 256, 512, 512]


def _img(b, h, w, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g)


# ----------------------------------------------------------------------------- PSNR / MSE
def test_psnr_hand_value():
    pred = torch.zeros(1, 2, 2, 3)
    gt = pred.clone()
    gt[0, 1, 0, 2] = 0.5  # one of 12 values off by 0.5
    assert M.masked_mse(pred, gt).item() == pytest.approx(0.25 / 12)
    assert M.masked_psnr(pred, gt).item() == pytest.approx(-10 * math.log10(0.25 / 12))
    assert M.masked_psnr(torch.zeros(1, 4, 4, 3), torch.full((1, 4, 4, 3), 0.1)).item() == pytest.approx(20.0)


def test_masked_psnr_equals_region_psnr():
    pred, gt = _img(2, 8, 10, seed=1), _img(2, 8, 10, seed=2)
    mask = torch.zeros(2, 8, 10)
    mask[0, :, :5] = 1  # left half
    mask[1, 2:6, 3:9] = 1
    got = M.masked_psnr(pred, gt, mask)
    for i in range(2):
        sel = mask[i].numpy() > 0.5
        d = (gt[i].numpy().astype(np.float64) - pred[i].numpy())[sel]  # [n_pixels, 3]
        # masked-out pixels add 0 to the numerator; denominator = pixels * channels
        assert got[i].item() == pytest.approx(-10 * np.log10((d ** 2).sum() / (sel.sum() * 3)), rel=1e-10)
    # [H,W] mask broadcasts over the batch
    both = M.masked_psnr(pred, gt, mask[0])
    assert both[0].item() == pytest.approx(got[0].item())


def test_mask_binarisation_threshold():
    pred, gt = _img(1, 4, 4, seed=3), _img(1, 4, 4, seed=4)
    soft = torch.tensor([0.0, 0.005, 0.01, 0.0101, 0.3, 1.0, 0.02, 0.009] * 2).view(1, 4, 4)
    hard = (soft > 0.01).float()
    assert M.masked_mse(pred, gt, soft).item() == M.masked_mse(pred, gt, hard).item()
    assert hard.sum() == 8


def test_empty_mask_nan_and_perfect_inf():
    pred, gt = _img(2, 4, 4, seed=5), _img(2, 4, 4, seed=6)
    mask = torch.ones(2, 4, 4)
    mask[1] = 0.005  # below threshold -> empty
    with pytest.warns(RuntimeWarning, match=r"\[1\]"):
        p = M.masked_psnr(pred, gt, mask)
    assert math.isfinite(p[0].item()) and math.isnan(p[1].item())
    assert M.masked_psnr(pred, pred).tolist() == [math.inf, math.inf]


# ----------------------------------------------------------------------------- SSIM
def test_ssim_matches_skimage():
    pred, gt = _img(2, 12, 9, seed=7), _img(2, 12, 9, seed=8)
    mask = torch.zeros(2, 12, 9)
    mask[:, 3:10, 2:8] = 0.7
    plain, masked = M.masked_ssim(pred, gt), M.masked_ssim(pred, gt, mask)
    for i in range(2):
        p, g = pred[i].double().numpy(), gt[i].double().numpy()
        m = (mask[i].numpy() > 0.01)[..., None].astype(np.float64)
        assert plain[i].item() == pytest.approx(structural_similarity(p, g, channel_axis=2, data_range=1.0))
        assert masked[i].item() == pytest.approx(
            structural_similarity(p * m, g * m, channel_axis=2, data_range=1.0))
    assert M.masked_ssim(pred, pred).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_small_images():
    pred, gt = _img(1, 5, 4, seed=9), _img(1, 5, 4, seed=10)
    ref = structural_similarity(pred[0].double().numpy(), gt[0].double().numpy(), win_size=3,
                                channel_axis=2, data_range=1.0)
    assert M.masked_ssim(pred, gt).item() == pytest.approx(ref)
    g1 = _img(1, 6, 6, c=1, seed=11)
    assert M.masked_ssim(g1, g1).item() == pytest.approx(1.0)  # 1 channel, win 5
    with pytest.raises(ValueError, match="3x3"):
        M.masked_ssim(_img(1, 2, 5), _img(1, 2, 5))


# ----------------------------------------------------------------------------- LPIPS
def _random_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    vgg, c_in = {}, 3
    for idx, c in zip(CONV_IDX, CONV_CH):
        vgg[f"features.{idx}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
        vgg[f"features.{idx}.bias"] = torch.randn(c, generator=g) * 0.01
        c_in = c
    vgg["classifier.0.weight"] = torch.randn(4, 4, generator=g)  # must be ignored
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(LIN_CH)}
    return vgg, lin


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    vgg, lin = _random_weights()
    pth, st = tmp_path_factory.mktemp("pth"), tmp_path_factory.mktemp("st")
    torch.save(vgg, pth / "vgg16-397923af.pth")
    torch.save(lin, pth / "vgg.pth")
    save_file(vgg, str(st / "vgg16-397923af.safetensors"))
    save_file(lin, str(st / "vgg.safetensors"))
    return {"vgg": vgg, "lin": lin, "pth": pth, "st": st}


@pytest.fixture(scope="module")
def lpips_model(lpips_files):
    return M.load_lpips([lpips_files["pth"]])


def _manual_lpips(x, y, vgg, lin):
    """Reference LPIPS on [1,H,W,3] 0..1 images, written with functional ops only."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def taps(img):
        h = ((img.permute(0, 3, 1, 2) * 2 - 1) - shift) / scale
        out = []
        for k, idx in enumerate(CONV_IDX):
            h = F.relu(F.conv2d(h, vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"], padding=1))
            if k in TAP_CONVS:
                out.append(h)
            if k in POOL_AFTER:
                h = F.max_pool2d(h, 2, 2)
        return out

    total = 0.0
    for i, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (torch.sqrt((a ** 2).sum(1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt((b ** 2).sum(1, keepdim=True)) + 1e-10)
        total += F.conv2d((a - b) ** 2, lin[f"lin{i}.model.1.weight"]).mean().item()
    return total


def test_lpips_manual_recomputation(lpips_files, lpips_model):
    x, y = _img(1, 16, 20, seed=12), _img(1, 16, 20, seed=13)
    ref = _manual_lpips(x, y, lpips_files["vgg"], lpips_files["lin"])
    assert ref > 0
    assert M.masked_lpips(x, y, model=lpips_model).item() == pytest.approx(ref, rel=1e-5)


def test_lpips_properties(lpips_files, lpips_model):
    a, b = _img(3, 16, 16, seed=14), _img(3, 16, 16, seed=15)
    d = M.masked_lpips(a, b, model=lpips_model)
    assert (d > 0).all()
    assert torch.equal(M.masked_lpips(a, a, model=lpips_model), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(M.masked_lpips(b, a, model=lpips_model), d)  # symmetric
    single = torch.cat([M.masked_lpips(a[i:i + 1], b[i:i + 1], model=lpips_model) for i in range(3)])
    assert torch.allclose(single, d, rtol=1e-5, atol=1e-7)  # batch independence
    assert torch.allclose(M.masked_lpips(a, b, model=lpips_model, chunk=2), d, rtol=1e-5, atol=1e-7)
    st_model = M.LPIPS.from_files(lpips_files["st"] / "vgg16-397923af.safetensors",
                                  lpips_files["st"] / "vgg.safetensors")
    assert torch.allclose(M.masked_lpips(a, b, model=st_model), d, rtol=1e-6, atol=0)
    # mask: equals LPIPS of the masked images; empty mask -> NaN
    mask = torch.zeros(3, 16, 16)
    mask[:2, 4:12, 4:12] = 1
    with pytest.warns(RuntimeWarning):
        md = M.masked_lpips(a, b, mask, model=lpips_model)
    m = mask[:2, ..., None]
    assert torch.allclose(md[:2], M.masked_lpips(a[:2] * m, b[:2] * m, model=lpips_model), rtol=1e-5)
    assert math.isnan(md[2].item())
    gray_a, gray_b = a[..., :1], b[..., :1]  # 1 channel is repeated to RGB
    assert torch.allclose(M.masked_lpips(gray_a, gray_b, model=lpips_model),
                          M.masked_lpips(gray_a.repeat(1, 1, 1, 3), gray_b.repeat(1, 1, 1, 3), model=lpips_model),
                          rtol=1e-5)
    with pytest.raises(ValueError, match="16x16"):
        M.masked_lpips(_img(1, 8, 8), _img(1, 8, 8), model=lpips_model)


def test_lpips_weight_files(tmp_path, lpips_files):
    assert M.find_lpips_weights([tmp_path, lpips_files["st"]]) == (
        lpips_files["st"] / "vgg16-397923af.safetensors", lpips_files["st"] / "vgg.safetensors")
    (tmp_path / "vgg.pth").write_bytes(b"")  # only one of the two files
    assert M.find_lpips_weights(tmp_path) is None
    folder = tmp_path / "models" / "nvs" / "lpips"
    with pytest.raises(M.LPIPSUnavailable, match="vgg16-397923af.pth") as e:
        M.load_lpips([folder])
    assert str(folder) in str(e.value) and "vgg.pth" in str(e.value)
    with pytest.raises(M.LPIPSUnavailable, match="missing file"):
        M.LPIPS.from_files(folder / "vgg16-397923af.pth", lpips_files["pth"] / "vgg.pth")
    bad = dict(lpips_files["lin"])
    bad.pop("lin4.model.1.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin4"):
        M.LPIPS.from_files(lpips_files["pth"] / "vgg16-397923af.pth", tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- summary / validation
def test_compute_metrics_and_table(lpips_model):
    pred, gt = _img(2, 16, 16, seed=16), _img(2, 16, 16, seed=17)
    mask = torch.ones(2, 16, 16)
    mask[1] = 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = M.compute_metrics(pred, gt, mask, lpips_model=lpips_model)
    assert len(w) == 1  # one warning, not one per metric
    assert res["count"] == 2 and res["masked"] is True
    assert res["psnr"][0] == pytest.approx(M.masked_psnr(pred[:1], gt[:1]).item())
    assert res["psnr_mean"] == pytest.approx(res["psnr"][0])  # NaN skipped
    assert math.isnan(res["ssim"][1]) and len(res["lpips"]) == 2
    table = M.format_table(res)
    lines = table.splitlines()
    assert "PSNR" in lines[0] and "LPIPS" in lines[0] and lines[-2].lstrip().startswith("mean")
    assert len({len(l) for l in lines[:-1]}) == 1  # fixed width
    plain = M.compute_metrics(pred, gt)
    assert "lpips" not in plain and "LPIPS" not in M.format_table(plain)


@pytest.mark.parametrize("pred,gt,mask,msg", [
    (_img(1, 4, 4), _img(1, 4, 5), None, r"shapes differ.*\(1, 4, 5, 3\)"),
    (_img(1, 4, 4, c=4), _img(1, 4, 4, c=4), None, "channels"),
    (torch.full((1, 4, 4, 3), math.nan), _img(1, 4, 4), None, "pred: contains NaN"),
    (_img(1, 4, 4), _img(1, 4, 4), torch.ones(1, 4, 5), r"mask shape.*expected \[1,4,4\]"),
    (_img(2, 4, 4), _img(2, 4, 4), torch.ones(3, 4, 4), "mask shape"),
    (_img(1, 4, 4), _img(1, 4, 4), torch.tensor([[math.inf] * 4] * 4), "mask: contains"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), _img(1, 4, 4), None, "float"),
    (torch.zeros(4, 3), torch.zeros(4, 3), None, r"\[B,H,W,C\]"),
])
def test_bad_inputs(pred, gt, mask, msg):
    with pytest.raises(ValueError, match=msg):
        M.compute_metrics(pred, gt, mask)
