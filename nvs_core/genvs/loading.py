"""Loading GeNVS weights safely: the published ``genvs.pt`` and our converted safetensors + JSON.

``genvs.pt`` is ``torch.save({'optim', 'model', 'step', 'epoch'})``; it is read with
``torch.load(weights_only=True)`` (via :mod:`nvs_core.checkpoints`). The model dict stores the
denoiser twice (``ddpm_pipeline.inner_model.inner_model.*`` and, sharing storage,
``ddpm_pipeline.model.inner_model.inner_model.*``): the copies are checked equal and collapsed.
A ``module.`` prefix (DDP) is accepted. The Fourier buffer ``timestep_embed.weight`` is data and is
kept. The file holds no constructor arguments, so sizes are inferred from the tensor shapes.

``python -m nvs_core convert genvs.pt --method genvs --out genvs.safetensors`` writes our format.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..checkpoints import CheckpointError, check_state_dict, load_checkpoint, load_with_config, sniff_format
from .config import GeNVSConfig, NOISE_CONFIGS, full_config
from .model import GeNVS, build_genvs

PathLike = Union[str, Path]
log = logging.getLogger(__name__)

METHOD = "genvs"
NETWORK_CLASS = "GeNVS"
DUPLICATE_PREFIX = "ddpm_pipeline.model."
CANONICAL_PREFIX = "ddpm_pipeline."
_DENOISER = "ddpm_pipeline.inner_model.inner_model."
REQUIRED_KEYS = ("input_unet.encoder.conv1.weight", "input_unet.decoder.aspp.0.convs.0.0.weight",
                 "nerf.sigma_color_net.net.0.dense.weight", _DENOISER + "proj_in.weight",
                 _DENOISER + "timestep_embed.weight")


@dataclass
class GeNVSCheckpoint:
    source: str
    config: GeNVSConfig
    state_dict: Dict[str, torch.Tensor]          # canonical names, no duplicates
    extras: Dict[str, Any] = field(default_factory=dict)

    def build(self, device=None, dtype: Optional[torch.dtype] = torch.float32) -> GeNVS:
        return genvs_from_state_dict(self.state_dict, self.config, device, dtype, self.source)


def model_state_dict(obj: Any, path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The model dict of a loaded ``genvs.pt`` (``obj['model']`` when present) and the other entries."""
    extras: Dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        extras = {k: (v if isinstance(v, (int, float, str)) else type(v).__name__) for k, v in obj.items()
                  if k != "model"}
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(path, f"not a GeNVS checkpoint: expected a dict with 'model' (genvs.pt) or a state "
                                    f"dict, got {type(obj).__name__}")
    sd = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"not a GeNVS checkpoint: entry {key!r} is {type(value).__name__}; expected "
                                        "genvs.pt ({'model': state dict, ...}) or a state dict of tensors")
        sd[key[len("module."):] if key.startswith("module.") else key] = value
    return sd, extras


def collapse_duplicates(state_dict: Mapping[str, torch.Tensor], path: PathLike = "<state dict>"
                        ) -> Dict[str, torch.Tensor]:
    """Drop ``ddpm_pipeline.model.X`` after checking it equals ``ddpm_pipeline.X`` (a lone copy is renamed)."""
    out: Dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if not key.startswith(DUPLICATE_PREFIX):
            out[key] = t
    for key, t in state_dict.items():
        if not key.startswith(DUPLICATE_PREFIX):
            continue
        twin = CANONICAL_PREFIX + key[len(DUPLICATE_PREFIX):]
        if twin not in out:
            out[twin] = t
            continue
        other = out[twin]
        if other.shape != t.shape or other.dtype != t.dtype or not torch.equal(other, t):
            raise CheckpointError(path, f"the duplicated denoiser copies differ at {key!r} vs {twin!r}: expected "
                                        "identical tensors (the published file stores one denoiser twice)")
    return out


def _check_genvs(sd: Mapping[str, torch.Tensor], path: PathLike) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        sample = ", ".join(list(sd)[:3])
        raise CheckpointError(path, f"not a GeNVS checkpoint: missing {missing[0]!r} (expected input_unet.*, "
                                    f"nerf.* and ddpm_pipeline.inner_model.inner_model.* keys); found e.g. {sample}")
    bad = [k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(path, f"tensor {bad[0]!r} contains NaN or infinite values ({len(bad)} tensors in all)")


def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def infer_config(sd: Mapping[str, torch.Tensor], noise: str = "mid") -> GeNVSConfig:
    """Network sizes from tensor shapes; sigma limits from the named k-diffusion config (default mid,
    which is what the published scripts instantiate), sizes of images and renders at their defaults."""
    cfg = full_config(noise)
    cfg.encoder.layers = [_count(sd, rf"input_unet\.encoder\.layer{i}\.(\d+)\.") for i in range(1, 5)]
    cfg.encoder.in_channels = sd["input_unet.encoder.conv1.weight"].shape[1]
    cfg.decoder.channels = sd["input_unet.decoder.aspp.0.convs.0.0.weight"].shape[0]
    n_mlp = _count(sd, r"nerf\.sigma_color_net\.net\.(\d+)\.")
    first = sd["nerf.sigma_color_net.net.0.dense.weight"]
    last = sd[f"nerf.sigma_color_net.net.{n_mlp - 1}.weight"]
    cfg.nerf.num_layers, cfg.nerf.hidden_dim, cfg.nerf.sigma_color_rank = n_mlp, first.shape[0], first.shape[1]
    cfg.nerf.color_feat_dim = last.shape[0] - 1
    d = cfg.denoiser
    p = _DENOISER
    d.mapping_out = sd[p + "timestep_embed.weight"].shape[0] * 2
    d.mapping_cond_dim = sd[p + "mapping_cond.weight"].shape[1] if p + "mapping_cond.weight" in sd else 0
    n_stages = _count(sd, re.escape(p) + r"u_net\.d_blocks\.(\d+)\.")
    depths, channels, attn = [], [], []
    for i in range(n_stages):
        stage = f"{p}u_net.d_blocks.{i}."
        convs = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(stage) + r"(\d+)\.main\.2\.weight$", k)]
                        if m})
        depths.append(len(convs))
        channels.append(sd[f"{stage}{convs[-1]}.main.6.weight"].shape[0])
        attn.append(any(k.startswith(stage) and ".qkv_proj." in k for k in sd))
    d.depths, d.channels, d.self_attn_depths = depths, channels, attn
    out_ch = sd[p + "proj_out.weight"].shape[0]
    d.has_variance = out_ch == 4
    d.input_channels = out_ch - (1 if d.has_variance else 0)
    d.unet_cond_dim = sd[p + "proj_in.weight"].shape[1] - d.input_channels
    return cfg


def genvs_from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Optional[GeNVSConfig] = None, device=None,
                          dtype: Optional[torch.dtype] = torch.float32, source: PathLike = "<state dict>") -> GeNVS:
    """Build from ``config`` (inferred from shapes if None) and load strictly; errors name ``source``."""
    config = config if config is not None else infer_config(state_dict)
    model = build_genvs(config, device="meta")   # no random init: every tensor comes from the file
    check_state_dict(model.state_dict(), state_dict, source)
    # fresh contiguous copies: file-backed tensors can be misaligned, which changes CPU kernels' rounding
    model.load_state_dict({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()},
                          strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device) if device is not None else model


def read_genvs_pt(path: PathLike, noise: str = "mid") -> GeNVSCheckpoint:
    """A published-format ``genvs.pt`` (or any torch file holding the model dict)."""
    obj, fmt = load_checkpoint(path)
    sd, extras = model_state_dict(obj, path)
    sd = collapse_duplicates(sd, path)
    _check_genvs(sd, path)
    extras["source_format"] = fmt
    return GeNVSCheckpoint(str(path), infer_config(sd, noise), sd, extras)


def load_genvs_checkpoint(path: PathLike, noise: Optional[str] = None) -> GeNVSCheckpoint:
    """``genvs.pt`` or a converted ``.safetensors`` (+ JSON), detected from content.

    ``noise`` picks the sigma limits of a published k-diffusion config (low/mid/high); default: the
    converted file's own, else mid.
    """
    fmt = sniff_format(path)
    log.info("%s: detected %s; reading it as a GeNVS checkpoint", path, fmt)
    if fmt in ("torch_zip", "torch_legacy"):
        return read_genvs_pt(path, noise or "mid")
    if fmt == "safetensors":
        try:
            sd, cfg = load_with_config(path)
        except CheckpointError as e:
            raise CheckpointError(path, f"expected a converted GeNVS checkpoint (safetensors + GeNVS config): "
                                        f"{str(e).split(': ', 1)[-1]}") from None
        if cfg.get("method") != METHOD or not isinstance(cfg.get("constructor"), dict):
            raise CheckpointError(path, f"expected a converted GeNVS checkpoint (method {METHOD!r} with its "
                                        f"config), got method {cfg.get('method')!r}")
        try:
            config = GeNVSConfig.from_dict(cfg["constructor"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(path, f"invalid GeNVS config: {e}") from None
        if noise is not None:
            config.denoiser.sigma_min = NOISE_CONFIGS[noise]["sigma_min"]
            config.denoiser.sigma_max = NOISE_CONFIGS[noise]["sigma_max"]
        _check_genvs(sd, path)
        return GeNVSCheckpoint(str(path), config, sd, {"meta": cfg.get("meta", {})})
    raise CheckpointError(path, f"found {fmt}: expected genvs.pt (torch.save) or a converted GeNVS .safetensors")


def load_genvs(path: PathLike, device=None, dtype: Optional[torch.dtype] = torch.float32,
               noise: Optional[str] = None) -> GeNVS:
    """Load a GeNVS model from either format, in eval mode."""
    return load_genvs_checkpoint(path, noise).build(device, dtype)


def convert_genvs(path: PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Converter for ``nvs_core.convert``: de-duplicated state dict + the inferred config."""
    ckpt = load_genvs_checkpoint(path)
    meta = {"source": Path(path).name}
    meta.update({k: v for k, v in ckpt.extras.items() if isinstance(v, (int, float, str))})
    return ckpt.state_dict, {"method": METHOD, "class": NETWORK_CLASS, "constructor": ckpt.config.to_dict(),
                             "meta": meta}


def _register_converter() -> None:
    from ..convert import register_converter

    register_converter(METHOD, convert_genvs)


_register_converter()
