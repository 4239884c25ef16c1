"""The committed demo VIVID model and novel-view evaluation on held-out procedural objects.

``models/demo/vivid_procedural.safetensors`` (+ ``.json``) is a 32-px VIVID-architecture network
trained by ``nvs_core.vivid.training`` on procedural scenes (seeds in ``data.TRAIN_SEEDS``) with
``training.demo_recipe`` (one run on pairs matched to the evaluation's orbit, camera labels
standardised with statistics fitted to them); its JSON meta holds the command that reproduces it.
Evaluation uses scenes from ``data.EVAL_SEEDS`` only and compares the faithful sampler's views with the copy-source baseline (every target
"predicted" as the unchanged source view).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch

from ..checkpoints import load_with_config
from ..metrics import compute_metrics
from ..progress import ProgressFactory
from .data import EvalSet, PairBatch, from_model_space
from .loading import load_vivid
from .precond import NVPrecond
from .sampler import generate_views

PathLike = Union[str, Path]

DEMO_MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "demo" / "vivid_procedural.safetensors"
DEFAULT_TRANSLATION_SCALE = 0.25  # training.DEMO_TRANSLATION_SCALE, when a file does not say


def load_demo_model(path: Optional[PathLike] = None) -> tuple:
    """(net, translation_scale) of the demo model; the scale is the one it was trained with."""
    path = Path(path) if path is not None else DEMO_MODEL_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo VIVID model not found; expected the committed "
                                f"models/demo/vivid_procedural.safetensors (+ .json) or a file from vivid-train")
    _, config = load_with_config(path)
    training = config.get("meta", {}).get("training", {})
    return load_vivid(path), float(training.get("translation_scale", DEFAULT_TRANSLATION_SCALE))


def sample_views(net: NVPrecond, pairs: PairBatch, seeds: Optional[Sequence[int]] = None, num_steps: int = 32,
                 max_batch_size: int = 64, progress: Optional[ProgressFactory] = None) -> torch.Tensor:
    """Target views [B, S, S, 3] (0..1) for model-space pairs, with the EDM Heun sampler (no guidance)."""
    seeds = list(range(len(pairs))) if seeds is None else list(seeds)
    src_pixels = ((pairs.src.to(torch.float32) + 1) * 127.5).round()
    with torch.no_grad():
        out = generate_views(net, src_pixels, pairs.geometry, seeds, num_steps=num_steps,
                             max_batch_size=max_batch_size, progress=progress)
    return out["images"].permute(0, 2, 3, 1).to(torch.float32) / 255.0


def image_metrics(pred: torch.Tensor, gt: torch.Tensor) -> Dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM over whole images (0..1, IMAGE layout)."""
    m = compute_metrics(pred, gt)
    return {"psnr": round(m["psnr_mean"], 4), "ssim": round(m["ssim_mean"], 4)}


def evaluate(net: NVPrecond, evalset: EvalSet, num_steps: int = 32, max_batch_size: int = 64,
             progress: Optional[ProgressFactory] = None) -> Dict[str, object]:
    """Model vs copy-source PSNR/SSIM on an eval set; also returns the generated ``views``."""
    views = sample_views(net, evalset.pairs, num_steps=num_steps, max_batch_size=max_batch_size, progress=progress)
    truth = from_model_space(evalset.pairs.dst)
    source = from_model_space(evalset.pairs.src)
    model, copy = image_metrics(views, truth), image_metrics(source, truth)
    return {"model": model, "copy_source": copy,
            "difference": {k: round(model[k] - copy[k], 4) for k in model}, "views": views}


@torch.no_grad()
def conditioning_use(net: NVPrecond, pairs: PairBatch, sigmas: Sequence[float] = (1.0, 5.0), count: int = 64,
                     seed: int = 0) -> Dict[str, Dict[str, float]]:
    """How much the net uses its inputs: denoising MSE of the first ``count`` pairs at each sigma with
    the right source and label, with another object's source (same label), and with the label of
    another target of the same source (the source's targets are consecutive, as in the evaluation
    sets; their labels are cycled by half the group). Equal errors mean an ignored input.

    The label is swapped within an object because the evaluation sets give every object the same
    target offsets: another object's pair at the same position has almost the same label."""
    pairs = pairs[torch.arange(min(count, len(pairs)))]
    n = len(pairs)
    same_source = int((pairs.src[:1] == pairs.src).flatten(1).all(1).sum())  # targets of the first object
    other_source = torch.roll(torch.arange(n), max(same_source, 1))
    if same_source > 1 and n % same_source == 0:
        other_target = torch.arange(n).reshape(-1, same_source).roll(same_source // 2, 1).flatten()
    else:
        other_target = torch.roll(torch.arange(n), 1)
    noise = torch.randn(pairs.dst.shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for sigma in sigmas:
        s = torch.full([n], float(sigma))
        x = pairs.dst + noise * sigma

        def mse(src, geometry):
            return round(float(((net(src, x, s, geometry) - pairs.dst) ** 2).mean()), 5)

        out[f"sigma_{sigma:g}"] = {"right": mse(pairs.src, pairs.geometry),
                                   "other_source": mse(pairs.src[other_source], pairs.geometry),
                                   "other_label": mse(pairs.src, pairs.geometry[other_target])}
    return out


def format_comparison(result: Dict[str, Dict[str, float]]) -> str:
    """A small fixed-width table of model vs copy-source metrics."""
    rows = [f"{'':12s}{'PSNR (dB)':>11s}{'SSIM':>9s}"]
    for name in ("model", "copy_source", "difference"):
        if name in result:
            values = result[name]
            rows.append(f"{name:12s}{values['psnr']:>11.3f}{values['ssim']:>9.4f}")
    return "\n".join(rows)
