"""Image metrics for novel-view evaluation: PSNR, SSIM and LPIPS (VGG, v0.1), optionally masked.

Inputs use ComfyUI's IMAGE layout: float ``[B,H,W,C]`` in 0..1 (C = 3 or 1); masks ``[B,H,W]``
(or ``[H,W]`` / ``[1,H,W]``, broadcast over the batch), 1 = evaluated region. A per-channel mask
``[B,H,W,C]`` (or ``[1,H,W,C]``, C matching the images) is also accepted, as the published DTU
results files store RGB masks.

Masked metrics follow the DTU protocol of ViewNeTI (``training/inference_dtu.py``): the mask is
binarised (``> 0.01``), expanded to every channel, both images are multiplied by it, and

    MSE  = sum((gt*m - pred*m)**2) / sum(m)      (sums over pixels AND channels)
    PSNR = -10 * log10(MSE)
    SSIM = skimage structural_similarity(pred*m, gt*m, data_range=1)
    LPIPS = lpips_vgg(pred*m, gt*m)

Per-image results are float64 CPU tensors ``[B]``. An image whose mask is empty has no evaluated
region: it gets NaN for every metric (with one ``warnings.warn`` naming the indices) instead of a
fake perfect score; means skip NaN. MSE 0 gives PSNR +inf (and a +inf mean).

LPIPS never downloads anything: weights come from two local files (see :class:`LPIPSUnavailable`).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

MASK_THRESHOLD = 0.01
VGG_FILES = ("vgg16-397923af.pth", "vgg16-397923af.safetensors")
LIN_FILES = ("vgg.pth", "vgg.safetensors")
PathLike = Union[str, Path]


# ----------------------------------------------------------------------------- validation
def _as_image(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float IMAGE tensor in 0..1, got dtype {x.dtype}")
    if x.ndim == 3:  # a single [H,W,C] image
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected IMAGE shape [B,H,W,C], got {tuple(x.shape)}")
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected 3 (RGB) or 1 channels in the last dim of [B,H,W,C], "
                         f"got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty image tensor {tuple(x.shape)}")
    # CPU float64: exact enough for PSNR and works where the device lacks float64 (MPS)
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf values")
    return x


def _prepare(pred, gt, mask=None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Validate; return (pred, gt, m) with m the binarised mask [B,H,W,1] (float64) or None."""
    pred, gt = _as_image(pred, "pred"), _as_image(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)} "
                         f"(expected identical [B,H,W,C])")
    if mask is None:
        return pred, gt, None
    b, h, w, _ = pred.shape
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(np.asarray(mask))
    mask = mask.detach().to("cpu", torch.float64)
    if mask.ndim == 4:  # per-channel mask [B|1,H,W,C]
        if tuple(mask.shape[1:]) != (h, w, pred.shape[-1]) or mask.shape[0] not in (1, b):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not fit images {tuple(pred.shape)}: "
                             f"expected [{b},{h},{w}], [{h},{w}] or per channel [{b},{h},{w},{pred.shape[-1]}]")
        if not torch.isfinite(mask).all():
            raise ValueError("mask: contains NaN or Inf values")
        return pred, gt, (mask > MASK_THRESHOLD).to(torch.float64).expand(b, h, w, pred.shape[-1])
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or tuple(mask.shape[1:]) != (h, w) or mask.shape[0] not in (1, b):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit images {tuple(pred.shape)}: "
                         f"expected [{b},{h},{w}], [1,{h},{w}] or [{h},{w}]")
    if not torch.isfinite(mask).all():
        raise ValueError("mask: contains NaN or Inf values")
    m = (mask > MASK_THRESHOLD).to(torch.float64).expand(b, h, w).unsqueeze(-1)
    return pred, gt, m


def _empty(m: Optional[torch.Tensor]) -> List[int]:
    return [] if m is None else torch.nonzero(m.sum(dim=(1, 2, 3)) == 0).flatten().tolist()


def _warn_empty(idx: List[int]) -> None:
    if idx:
        warnings.warn(f"mask is empty for image(s) {idx}: no evaluated region, metrics set to NaN",
                      RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- PSNR / SSIM
def _mse(pred, gt, m) -> torch.Tensor:
    if m is None:
        return ((gt - pred) ** 2).mean(dim=(1, 2, 3))
    m = m.expand_as(pred)  # mask counted once per channel, in numerator and denominator
    num = ((gt * m - pred * m) ** 2).sum(dim=(1, 2, 3))
    den = m.sum(dim=(1, 2, 3))
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    return -10.0 * torch.log10(mse)  # log10(0) = -inf -> +inf PSNR; NaN stays NaN


def masked_mse(pred, gt, mask=None) -> torch.Tensor:
    """Per-image MSE [B] (DTU protocol when ``mask`` is given; NaN for an empty mask)."""
    pred, gt, m = _prepare(pred, gt, mask)
    _warn_empty(_empty(m))
    return _mse(pred, gt, m)


def masked_psnr(pred, gt, mask=None) -> torch.Tensor:
    """Per-image PSNR [B] in dB, data range 1 (DTU protocol when ``mask`` is given)."""
    pred, gt, m = _prepare(pred, gt, mask)
    _warn_empty(_empty(m))
    return _psnr(_mse(pred, gt, m))


def _win_size(h: int, w: int) -> int:
    # skimage's default window is 7; smaller images get the largest odd window that fits.
    # Below 3 px the sample covariance (N-1 normalisation) is undefined, so refuse.
    s = min(h, w, 7)
    if s < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {h}x{w}")
    return s if s % 2 else s - 1


def _ssim(pred, gt, m, empty: Sequence[int]) -> torch.Tensor:
    from skimage.metrics import structural_similarity

    if m is not None:
        pred, gt = pred * m, gt * m
    win = _win_size(pred.shape[1], pred.shape[2])
    out = []
    for i in range(pred.shape[0]):
        if i in empty:
            out.append(math.nan)
            continue
        out.append(float(structural_similarity(pred[i].numpy(), gt[i].numpy(), win_size=win,
                                               channel_axis=-1, data_range=1.0)))
    return torch.tensor(out, dtype=torch.float64)


def masked_ssim(pred, gt, mask=None) -> torch.Tensor:
    """Per-image SSIM [B]: skimage ``structural_similarity(pred*m, gt*m, channel_axis=-1,
    data_range=1.0)``, win_size 7 or the largest odd size that fits (images need >= 3x3)."""
    pred, gt, m = _prepare(pred, gt, mask)
    empty = _empty(m)
    _warn_empty(empty)
    return _ssim(pred, gt, m, empty)


# ----------------------------------------------------------------------------- LPIPS
class LPIPSUnavailable(RuntimeError):
    """LPIPS weights are not on disk. Nothing is ever downloaded; the message says what to place where."""

    def __init__(self, search_dirs: Union[PathLike, Iterable[PathLike]], detail: str = ""):
        self.search_dirs = [str(d) for d in _dirs(search_dirs)]
        where = " or ".join(self.search_dirs) or "(no folder given)"
        msg = (f"LPIPS weights not found. Place these two files in {where}:\n"
               f"  1. {VGG_FILES[0]}  (torchvision VGG16 ImageNet weights, "
               f"https://download.pytorch.org/models/{VGG_FILES[0]}; or {VGG_FILES[1]})\n"
               f"  2. {LIN_FILES[0]}  (LPIPS v0.1 linear layers, from the lpips package: "
               f"lpips/weights/v0.1/{LIN_FILES[0]}; or {LIN_FILES[1]})")
        super().__init__(msg + (f"\n{detail}" if detail else ""))


def _dirs(search_dirs) -> List[Path]:
    if isinstance(search_dirs, (str, Path)):
        search_dirs = [search_dirs]
    return [Path(d) for d in search_dirs]


def find_lpips_weights(search_dirs: Union[PathLike, Iterable[PathLike]]) -> Optional[Tuple[Path, Path]]:
    """Return (vgg_path, lin_path) from the first folders holding each file, or None."""
    dirs = _dirs(search_dirs)

    def first(names):
        for d in dirs:
            for n in names:
                if (d / n).is_file():
                    return d / n
        return None

    vgg, lin = first(VGG_FILES), first(LIN_FILES)
    return (vgg, lin) if vgg is not None and lin is not None else None


def _load_state(path: PathLike) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)  # no pickled code
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


# VGG16 "features" config; indices then match torchvision's keys (features.N.weight)
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_SLICE_ENDS = (4, 9, 16, 23, 30)  # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


class _Lin(nn.Module):
    """lpips NetLinLayer: keys ``model.1.weight`` (index 0 is the dropout, a no-op in eval)."""

    def __init__(self, c: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS VGG v0.1 distance. ``forward(x, y)`` takes [N,3,H,W] in [-1,1] and returns [N]."""

    def __init__(self):
        super().__init__()
        layers: List[nn.Module] = []
        c_in = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        for i, c in enumerate(_CHANNELS):
            setattr(self, f"lin{i}", _Lin(c))
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)
        self.train(False).requires_grad_(False)

    @classmethod
    def from_files(cls, vgg_path: PathLike, lin_path: PathLike) -> "LPIPS":
        for p in (vgg_path, lin_path):
            if not Path(p).is_file():
                raise LPIPSUnavailable([Path(p).parent], detail=f"missing file: {p}")
        model = cls()
        vgg = {k: v for k, v in _load_state(vgg_path).items() if k.startswith("features.")}
        lin = {k: v for k, v in _load_state(lin_path).items() if k.startswith("lin")}
        want = model.state_dict()
        missing = sorted(set(want) - set(vgg) - set(lin))
        if missing:
            raise ValueError(f"LPIPS weights incomplete ({vgg_path}, {lin_path}): missing keys {missing[:6]}"
                             f"{' ...' if len(missing) > 6 else ''}")
        for k, v in {**vgg, **lin}.items():
            if k in want and tuple(v.shape) != tuple(want[k].shape):
                raise ValueError(f"LPIPS weight {k}: shape {tuple(v.shape)}, expected {tuple(want[k].shape)}")
        model.load_state_dict({k: v for k, v in {**vgg, **lin}.items() if k in want})
        return model

    def _feats(self, x: torch.Tensor) -> List[torch.Tensor]:
        h, out, start = (x - self.shift) / self.scale, [], 0
        for end in _SLICE_ENDS:
            h = self.features[start:end](h)
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))  # unit-normalise channels
            start = end
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # separate passes: identical inputs give bit-identical features, so d(x,x) == 0 exactly
        fx, fy = self._feats(x), self._feats(y)
        d = 0
        for i, (a, b) in enumerate(zip(fx, fy)):
            d = d + getattr(self, f"lin{i}").model((a - b) ** 2).mean(dim=(2, 3))
        return d.flatten()


def load_lpips(search_dirs: Union[PathLike, Iterable[PathLike]], device=None) -> LPIPS:
    """Load LPIPS from the first folders holding the two weight files, else raise LPIPSUnavailable."""
    found = find_lpips_weights(search_dirs)
    if found is None:
        raise LPIPSUnavailable(search_dirs)
    model = LPIPS.from_files(*found)
    return model.to(device) if device is not None else model


def _lpips(pred, gt, m, empty: Sequence[int], model: LPIPS, chunk: int) -> torch.Tensor:
    if min(pred.shape[1], pred.shape[2]) < 16:  # four 2x2 max-pools before relu5_3
        raise ValueError(f"LPIPS needs images of at least 16x16 pixels, got {pred.shape[1]}x{pred.shape[2]}")
    if m is not None:
        pred, gt = pred * m, gt * m
    p = next(model.parameters())
    out = []
    with torch.no_grad():
        for s in range(0, pred.shape[0], chunk):
            x, y = (t[s:s + chunk].permute(0, 3, 1, 2).expand(-1, 3, -1, -1) * 2 - 1  # 0..1 -> -1..1
                    for t in (pred, gt))
            out.append(model(x.to(p.device, p.dtype), y.to(p.device, p.dtype)).to("cpu", torch.float64))
    res = torch.cat(out)
    if empty:
        res[list(empty)] = math.nan
    return res


def masked_lpips(pred, gt, mask=None, model: Optional[LPIPS] = None, chunk: int = 8) -> torch.Tensor:
    """Per-image LPIPS [B] of IMAGE tensors (0..1) on the masked images ``pred*m`` vs ``gt*m``.
    1-channel images are repeated to RGB; images need >= 16x16 pixels."""
    if model is None:
        raise ValueError("masked_lpips needs an LPIPS model (LPIPS.from_files or load_lpips)")
    pred, gt, m = _prepare(pred, gt, mask)
    empty = _empty(m)
    _warn_empty(empty)
    return _lpips(pred, gt, m, empty, model, chunk)


# ----------------------------------------------------------------------------- summary
def _mean(v: torch.Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else math.nan


def compute_metrics(pred, gt, mask=None, lpips_model: Optional[LPIPS] = None) -> dict:
    """Per-image lists ``psnr``, ``ssim`` (+ ``lpips`` with a model) and ``*_mean`` (NaN skipped),
    plus ``count`` and ``masked``."""
    pred, gt, m = _prepare(pred, gt, mask)
    empty = _empty(m)
    _warn_empty(empty)  # once, not per metric
    vals = {"psnr": _psnr(_mse(pred, gt, m)), "ssim": _ssim(pred, gt, m, empty)}
    if lpips_model is not None:
        vals["lpips"] = _lpips(pred, gt, m, empty, lpips_model, 8)
    out: dict = {"count": pred.shape[0], "masked": m is not None}
    for k, v in vals.items():
        out[k] = v.tolist()
        out[f"{k}_mean"] = _mean(v)
    return out


def format_table(metrics: dict) -> str:
    """Fixed-width text table: one row per image, then the mean row."""
    cols = [k for k in ("psnr", "ssim", "lpips") if k in metrics]
    fmt = {"psnr": "{:>10.3f}", "ssim": "{:>10.4f}", "lpips": "{:>10.4f}"}
    lines = ["{:>6}".format("image") + "".join(f"{c.upper():>10}" for c in cols)]
    lines.append("-" * len(lines[0]))
    for i in range(len(metrics[cols[0]]) if cols else 0):
        lines.append(f"{i:>6}" + "".join(fmt[c].format(metrics[c][i]) for c in cols))
    lines.append("-" * len(lines[0]))
    lines.append("{:>6}".format("mean") + "".join(fmt[c].format(metrics[f"{c}_mean"]) for c in cols))
    if metrics.get("masked"):
        lines.append(f"(masked, DTU protocol: mask > {MASK_THRESHOLD})")
    return "\n".join(lines)
