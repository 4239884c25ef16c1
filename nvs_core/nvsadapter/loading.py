"""Loading the NVS-Adapter's weights safely: only the 344 adapter tensors, from the EMA copy by default.

Formats (detected from content):
- the published Lightning checkpoint ``base_query_4_step_200000.ckpt``: read with ``torch.load(weights_only=True)``
  (numpy scalars of full optimizer states allow-listed, numpy-1 and numpy-2 spellings; if torch still refuses,
  our allow-list unpickler). From ``state_dict`` only ``model.diffusion_model.pe_blocks.*`` and the per-block
  ``support_emb`` / ``cross_view_attn_module`` / ``image_attn_module`` / ``support_query_attn`` /
  ``query_out_attn`` tensors are taken; with ``use_ema`` (the published inference default) each comes from its
  ``LitEma`` buffer ``model_ema.<name relative to model, every dot removed>``. Everything else in the file (the
  frozen SD UNet, VAE, OpenCLIP towers, optimizer states) is ignored: SD 2.1 base comes from the user's own
  checkpoint and the CLIP ViT-H vision model from ``clip_vision``;
- our converted format (``X.safetensors`` + ``X.json``, method ``nvsadapter``), written by
  ``python -m nvs_core convert base_query_4_step_200000.ckpt --method nvsadapter --out X.safetensors``;
- a bare tensor dict (safetensors or weights-only torch file) of adapter tensors, keyed like
  ``NVSAdapter.state_dict()`` or like the checkpoint.

The config is read from the JSON, else inferred from the tensor shapes and block names (heads from
``num_head_channels``, 64 as in SD 2.x unless given; the text-context width from the frozen UNet when present).
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ..checkpoints import (CheckpointError, check_state_dict, load_safetensors, load_torch_weights,
                           load_with_config, numpy_scalar_safe_globals, safe_torch_load, sniff_format)
from .config import ADAPTER_KEY_MARKERS, SD21_BASE, NVSAdapterConfig
from .model import NVSAdapter

PathLike = Union[str, Path]
log = logging.getLogger(__name__)

METHOD = "nvsadapter"
NETWORK_CLASS = "NVSAdapter"
PREFIX = "model.diffusion_model."


def is_adapter_key(key: str) -> bool:
    """An adapter tensor, keyed relative to ``ThreeDiMAdapter`` (= ``NVSAdapter.state_dict()``)."""
    return key.startswith("pe_blocks.") or any(marker in key for marker in ADAPTER_KEY_MARKERS)


def ema_key(checkpoint_key: str) -> str:
    """The ``LitEma`` buffer of a ``model.*`` parameter: ``model_ema.`` + the name below ``model`` without dots."""
    return "model_ema." + checkpoint_key[len("model."):].replace(".", "")


def read_lightning_checkpoint(path: PathLike) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of a torch checkpoint, loaded weights-only (see module doc)."""
    fmt = sniff_format(path)
    if fmt not in ("torch_zip", "torch_legacy"):
        raise CheckpointError(path, f"found {fmt}: expected the NVS-Adapter Lightning checkpoint (a torch.save file)")
    try:
        obj = load_torch_weights(path, numpy_scalar_safe_globals())
    except CheckpointError as e:
        if e.global_name is None:
            raise
        log.info("%s: torch refused %s; retrying with the allow-list unpickler", path, e.global_name)
        obj = safe_torch_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"found a {type(obj).__name__}: expected a checkpoint dict with a 'state_dict'")
    return state


def extract_adapter(state_dict: Mapping[str, torch.Tensor], use_ema: bool = True,
                    source: PathLike = "<state dict>") -> Dict[str, torch.Tensor]:
    """The adapter tensors of an engine ``state_dict`` keyed like ``NVSAdapter.state_dict()``."""
    keys = [k for k in state_dict if k.startswith(PREFIX) and is_adapter_key(k[len(PREFIX):])]
    if not keys:
        if any(k.startswith(PREFIX) for k in state_dict):
            raise CheckpointError(source, "this is a Stable Diffusion checkpoint without NVS-Adapter tensors: expected "
                                          f"{PREFIX}pe_blocks.* and per-block support_emb / cross_view_attn_module "
                                          "tensors (base_query_4_step_200000.ckpt)")
        raise CheckpointError(source, f"no NVS-Adapter tensors: expected {PREFIX}pe_blocks.* and per-block "
                                      "support_emb / *_attn_module tensors")
    out = {}
    for key in keys:
        if use_ema:
            name = ema_key(key)
            if name not in state_dict:
                raise CheckpointError(source, f"use_ema: no EMA copy {name!r} of {key!r} in the file; load it with "
                                              "use_ema=False for the raw weights")
            value = state_dict[name]
        else:
            value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(source, f"{key!r} is a {type(value).__name__}, expected a tensor")
        out[key[len(PREFIX):]] = value
    return out


def _block_names(keys) -> set:
    return {k.split(".transformer_blocks.")[0][len("unet."):] for k in keys if ".transformer_blocks." in k}


def infer_config(adapter: Mapping[str, torch.Tensor], num_head_channels: Optional[int] = None,
                 context_dim: Optional[int] = None, source: PathLike = "<state dict>") -> NVSAdapterConfig:
    """The config that has exactly these adapter tensors (shapes and block names)."""
    levels = sorted(int(k.split(".")[1]) for k in adapter if k.startswith("pe_blocks.") and k.endswith(".weight"))
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(source, f"expected pe_blocks.0..L-1 weights, found levels {levels}")
    widths = [adapter[f"pe_blocks.{level}.weight"].shape[0] for level in levels]
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise CheckpointError(source, f"pe_blocks widths {widths} are not multiples of {model_channels}")
    first = next((k for k in adapter if k.endswith(".image_attn_module.to_k.weight")), None)
    emb = next((k for k in adapter if k.endswith(".support_emb")), None)
    if first is None or emb is None:
        raise CheckpointError(source, "expected per-block image_attn_module and support_emb tensors")
    head_channels = num_head_channels or (SD21_BASE.num_head_channels
                                          if all(w % SD21_BASE.num_head_channels == 0 for w in widths)
                                          else math.gcd(*widths))
    names = _block_names(adapter)
    base = dict(model_channels=model_channels, channel_mult=tuple(w // model_channels for w in widths),
                num_head_channels=head_channels, context_dim=context_dim or SD21_BASE.context_dim,
                image_context_dim=adapter[first].shape[1], posemb_dim=adapter["pe_blocks.0.weight"].shape[1])
    for num_res_blocks in range(1, 5):
        for mask in itertools.product((True, False), repeat=len(levels)):
            attention = tuple(2 ** level for level, on in enumerate(mask) if on)
            try:
                candidate = NVSAdapterConfig(num_res_blocks=num_res_blocks, attention_resolutions=attention,
                                             latent_resolution=SD21_BASE.latent_resolution, **base)
            except ValueError:
                continue
            layers = candidate.layers()
            if {layer.name for layer in layers} != names:
                continue
            level0 = next((layer for layer in layers if layer.level == 0), layers[0])
            tokens = adapter[level0.prefix + "support_emb"].shape[1]
            side = math.isqrt(tokens) * 2 ** level0.level
            config = replace(candidate, latent_resolution=side)
            if config.tokens(level0.level) != tokens:
                continue
            return config
    raise CheckpointError(source, f"the adapter blocks {sorted(names)[:4]}... fit no SD UNet layout")


def _from_state(adapter: Mapping[str, torch.Tensor], config: NVSAdapterConfig, source, device, dtype) -> NVSAdapter:
    with torch.device("meta"):
        model = NVSAdapter(config)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, adapter, source)
    model.load_state_dict({k: v.to(dtype=dtype) for k, v in adapter.items()}, strict=True, assign=True)
    return model.to(device=device).train(False).requires_grad_(False)


def adapter_state_from_file(path: PathLike, use_ema: bool = True, config: Optional[NVSAdapterConfig] = None,
                            num_head_channels: Optional[int] = None
                            ) -> Tuple[Dict[str, torch.Tensor], NVSAdapterConfig, dict]:
    """(adapter tensors, config, info) of any supported file (see module doc), nothing built yet."""
    path = Path(path)
    fmt = sniff_format(path)
    info = {"source": path.name, "source_format": fmt}
    if fmt == "safetensors" and (path.with_suffix(".json").is_file() or "nvs_config" in _metadata(path)):
        state, cfg = load_with_config(path)
        if cfg.get("method") != METHOD:
            raise CheckpointError(path, f"converted for method {cfg.get('method')!r}, expected {METHOD!r}")
        info.update(cfg.get("meta", {}))
        return state, config or NVSAdapterConfig.from_dict(cfg["constructor"]), info
    if fmt in ("torch_zip", "torch_legacy"):
        full = read_lightning_checkpoint(path)
    elif fmt == "safetensors":
        full = load_safetensors(path)[0]
    else:
        raise CheckpointError(path, f"found {fmt}: expected the NVS-Adapter checkpoint (.ckpt) or a converted "
                                    ".safetensors + .json")
    if any(k.startswith(PREFIX) for k in full):
        state = extract_adapter(full, use_ema, path)
        info["weights"] = "ema" if use_ema else "raw"
    else:
        state = {k: v for k, v in full.items() if is_adapter_key(k)}
        if not state:
            raise CheckpointError(path, "no NVS-Adapter tensors: expected pe_blocks.* and per-block support_emb / "
                                        "*_attn_module tensors")
    context = config.context_dim if config else frozen_context_dim(full)
    return state, config or infer_config(state, num_head_channels, context, path), info

def _metadata(path: Path) -> dict:
    """The safetensors header metadata (no tensor is read; ``sniff_format`` validated the header)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def frozen_context_dim(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    value = state.get(PREFIX + "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    return int(value.shape[1]) if isinstance(value, torch.Tensor) else None


def load_nvs_adapter(path: PathLike, use_ema: bool = True, config: Optional[NVSAdapterConfig] = None,
                     num_head_channels: Optional[int] = None, device="cpu",
                     dtype: torch.dtype = torch.float32) -> NVSAdapter:
    """An ``NVSAdapter`` (eval mode, no grad) from any supported file; ``use_ema`` picks the EMA copy of a
    Lightning checkpoint (ignored for converted files, which hold one set)."""
    state, cfg, info = adapter_state_from_file(path, use_ema, config, num_head_channels)
    model = _from_state(state, cfg, path, device, dtype)
    log.info("%s: NVS-Adapter (%s, %s weights): %d tensors, %s parameters, %d blocks", path, info["source_format"],
             info.get("weights", "stored"), len(state), f"{sum(v.numel() for v in state.values()):,}",
             model.num_layers)
    return model


def adapter_from_state_dict(state: Mapping[str, torch.Tensor], config: NVSAdapterConfig, device="cpu",
                            dtype: torch.dtype = torch.float32, source: PathLike = "<state dict>") -> NVSAdapter:
    """An ``NVSAdapter`` from adapter tensors keyed like ``NVSAdapter.state_dict()`` (exact key/shape check)."""
    return _from_state(dict(state), config, source, device, dtype)


def convert_nvs_adapter(path: PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Converter ``nvsadapter``: the adapter tensors only, EMA when the file has them (the published inference
    default), else the raw weights; the JSON records which."""
    try:
        state, config, info = adapter_state_from_file(path, use_ema=True)
    except CheckpointError as e:
        if "use_ema" not in str(e):
            raise
        state, config, info = adapter_state_from_file(path, use_ema=False)
    _from_state(state, config, path, "meta", torch.float32)  # exact key/shape check against the config
    return state, {"class": NETWORK_CLASS, "constructor": config.to_dict(), "meta": info}


def _register_converter() -> None:
    from ..convert import register_converter

    register_converter(METHOD, convert_nvs_adapter)


_register_converter()
