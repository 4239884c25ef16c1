"""Loading and saving RealFusion fields safely.

Formats (detected from content):
- the published ``df.pth`` / ``current.pth`` (``Trainer.save_checkpoint``): a torch zip with
  ``{epoch, global_step, stats, mean_count, mean_density, model}``, read with
  ``torch.load(weights_only=True)``. ``model`` is loaded strictly; the constructor options are
  inferred from its shapes (levels from ``encoder.offsets``, the finest resolution from the row table,
  MLP widths from ``sigma_net``/``bg_net``). ``grid_levels_mask`` is forced to 0 (the flag is not
  stored and a rebuilt model would otherwise mask the fine levels). The stored parameters are the live
  weights at save time, not the EMA average (golden case g);
- a bare ``state_dict()`` of the field (same keys, no metadata);
- our converted format: ``X.safetensors`` + ``X.json`` (``python -m nvs_core convert df.pth
  --method realfusion --out X.safetensors``), which also keeps ``mean_density`` / ``mean_count``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..checkpoints import (CheckpointError, check_state_dict, load_torch_weights, load_with_config,
                           save_with_config, sniff_format)
from .field import FieldConfig, RealFusionField
from .grid import level_table

PathLike = Union[str, Path]
log = logging.getLogger(__name__)

METHOD = "realfusion"
FIELD_CLASS = "RealFusionField"
OCCUPANCY_KEYS = ("density_grid", "density_bitfield", "step_counter")


@dataclass
class FieldCheckpoint:
    """What a field file holds besides the weights."""

    config: FieldConfig
    state_dict: Dict[str, torch.Tensor]
    mean_density: float = 0.0
    mean_count: int = 0
    meta: Dict[str, Any] = dc_field(default_factory=dict)


# ----------------------------------------------------------------------------- building

def build_field(config: Union[FieldConfig, Mapping[str, Any], None] = None, device=None,
                dtype: Optional[torch.dtype] = None) -> RealFusionField:
    """A field from a config (``device='meta'`` builds the structure without allocating)."""
    if not isinstance(config, FieldConfig):
        config = FieldConfig.from_dict(config or {})
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            field = RealFusionField(config)
    else:
        field = RealFusionField(config)
        if device is not None:
            field = field.to(device)
    if dtype is not None:
        field = field.to(dtype)
    return field


def load_field_weights(field: RealFusionField, state_dict: Mapping[str, torch.Tensor], source: PathLike = "<state dict>",
                       require_occupancy: bool = True) -> RealFusionField:
    """Strict load; errors name ``source`` and the first missing / unexpected / mis-shaped key.

    ``require_occupancy=False`` accepts a state dict without the occupancy buffers (they stay empty).
    """
    expected = field.state_dict()
    if not require_occupancy:
        expected = {k: v for k, v in expected.items() if k not in OCCUPANCY_KEYS or k in state_dict}
    check_state_dict(expected, state_dict, source)
    for key, value in state_dict.items():
        want = expected[key].dtype
        if value.dtype != want and not (value.is_floating_point() and want.is_floating_point):
            raise CheckpointError(source, f"dtype mismatch for {key!r}: expected {want}, got {value.dtype}")
    field.load_state_dict(dict(state_dict), strict=require_occupancy)
    return field


# ----------------------------------------------------------------------------- config inference

def infer_config(model: Mapping[str, torch.Tensor], source: PathLike = "<state dict>",
                 base: Optional[FieldConfig] = None) -> FieldConfig:
    """Constructor options that reproduce the shapes of a published ``model`` state dict."""
    required = ("aabb_train", "encoder.embeddings", "encoder.offsets", "sigma_net.net.0.weight")
    for key in required:
        if key not in model:
            found = ", ".join(list(model)[:6])
            raise CheckpointError(source, f"not a RealFusion field: missing key {key!r} (found {found}, ...); "
                                          "expected the model of a RealFusion / stable-dreamfusion 'grid' df.pth")
    base = base or FieldConfig()
    aabb = model["aabb_train"].float()
    bound = float(aabb[3])
    if aabb.shape != (6,) or not torch.allclose(aabb, torch.tensor([-bound] * 3 + [bound] * 3)):
        raise CheckpointError(source, f"aabb_train {aabb.tolist()}: expected a cube [-b, b]^3")
    emb, offsets = model["encoder.embeddings"], model["encoder.offsets"]
    if emb.ndim != 2 or offsets.ndim != 1 or offsets.numel() < 2:
        raise CheckpointError(source, f"encoder.embeddings {tuple(emb.shape)} / encoder.offsets "
                                      f"{tuple(offsets.shape)}: expected [rows, level_dim] and [levels + 1]")
    levels, level_dim = offsets.numel() - 1, emb.shape[1]
    offsets_list = [int(o) for o in offsets.tolist()]
    sigma_keys = sorted(k for k in model if k.startswith("sigma_net.net.") and k.endswith(".weight"))
    num_layers = len(sigma_keys)
    w0 = model["sigma_net.net.0.weight"]
    if w0.shape[1] != levels * level_dim:
        raise CheckpointError(source, f"sigma_net.net.0.weight {tuple(w0.shape)}: expected {levels * level_dim} "
                                      "inputs (grid levels x level_dim)")
    last = model[f"sigma_net.net.{num_layers - 1}.weight"]
    if last.shape[0] != 4:
        raise CheckpointError(source, f"sigma_net.net.{num_layers - 1}.weight {tuple(last.shape)}: expected 4 "
                                      "outputs (density + albedo); is this a RealFusion field?")
    bg_keys = sorted(k for k in model if k.startswith("bg_net.net.") and k.endswith(".weight"))
    bg = {}
    if bg_keys:
        bw0 = model["bg_net.net.0.weight"]
        degree, rem = divmod(bw0.shape[1] - 3, 6)
        if rem:
            raise CheckpointError(source, f"bg_net.net.0.weight {tuple(bw0.shape)}: expected 3 + 6k inputs "
                                          "(frequency-encoded directions)")
        bg = dict(num_layers_bg=len(bg_keys), hidden_dim_bg=bw0.shape[0], freq_degree=degree,
                  bg_radius=base.bg_radius if base.bg_radius > 0 else 1.4)
    else:
        bg = dict(bg_radius=0.0)
    resolution = _infer_grid_resolution(offsets_list, bound, base, source)
    cfg = dataclasses.replace(base, bound=bound, grid_levels=levels, level_dim=level_dim, num_layers=num_layers,
                              hidden_dim=w0.shape[0], grid_resolution=resolution, desired_resolution=None,
                              grid_levels_mask=0, **bg)
    if "density_grid" in model:
        cells = model["density_grid"].shape[-1]
        size = round(cells ** (1 / 3))
        if size ** 3 != cells:
            raise CheckpointError(source, f"density_grid {tuple(model['density_grid'].shape)}: expected H^3 cells")
        cfg = dataclasses.replace(cfg, grid_size=size)
    return cfg


def _infer_grid_resolution(offsets, bound, base: FieldConfig, source) -> float:
    levels = len(offsets) - 1

    def matches(res):
        table = level_table(levels, base.base_resolution, base.log2_hashmap_size, res * bound)
        return [lv.offset for lv in table] + [table[-1].offset + table[-1].rows] == offsets

    candidates = [base.grid_resolution] + [2 ** k for k in range(4, 15)] + list(range(16, 4097))
    for res in candidates:
        if matches(res):
            return float(res) if res != int(res) else int(res)
    raise CheckpointError(source, f"encoder.offsets {offsets[:6]}...: no grid resolution reproduces this row "
                                  f"table with base {base.base_resolution} and 2^{base.log2_hashmap_size} rows")


# ----------------------------------------------------------------------------- reading files

def read_field_checkpoint(path: PathLike, config: Optional[Union[FieldConfig, Mapping]] = None) -> FieldCheckpoint:
    """Read a published ``df.pth``, a bare state dict or our ``.safetensors`` (+ ``.json``)."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        state_dict, cfg = load_with_config(path)
        if cfg.get("method") != METHOD:
            raise CheckpointError(path, f"expected a converted RealFusion field (method {METHOD!r}), got method "
                                        f"{cfg.get('method')!r}")
        meta = dict(cfg.get("meta") or {})
        try:
            field_config = FieldConfig.from_dict(cfg.get("constructor") or {})
        except (TypeError, ValueError) as e:
            raise CheckpointError(path, f"bad constructor options in the config ({e})") from None
        return FieldCheckpoint(field_config, state_dict, float(meta.get("mean_density", 0.0)),
                               int(meta.get("mean_count", 0)), meta)
    if fmt not in ("torch_zip", "torch_legacy"):
        raise CheckpointError(path, f"found {fmt}: expected a RealFusion df.pth (torch zip) or a converted "
                                    ".safetensors field")
    obj = load_torch_weights(path)
    meta: Dict[str, Any] = {"source": path.name, "source_format": "df.pth"}
    mean_density, mean_count = 0.0, 0
    if isinstance(obj, dict) and "model" in obj:
        model = obj["model"]
        mean_density = float(obj.get("mean_density", 0.0) or 0.0)
        mean_count = int(obj.get("mean_count", 0) or 0)
        for key in ("epoch", "global_step"):
            if isinstance(obj.get(key), int):
                meta[key] = obj[key]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        model, meta["source_format"] = obj, "state_dict"
    else:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(path, f"expected a RealFusion checkpoint dict with a 'model' entry, found {keys}")
    if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(path, "the 'model' entry is not a dict of tensors")
    base = config if isinstance(config, FieldConfig) else FieldConfig.from_dict(config or {})
    field_config = infer_config(model, path, base)
    return FieldCheckpoint(field_config, dict(model), mean_density, mean_count, meta)


def field_from_checkpoint(ckpt: FieldCheckpoint, source: PathLike = "<checkpoint>", device=None,
                          dtype: Optional[torch.dtype] = None) -> RealFusionField:
    field = build_field(ckpt.config)
    load_field_weights(field, ckpt.state_dict, source, require_occupancy=all(k in ckpt.state_dict for k in OCCUPANCY_KEYS))
    field.grid_levels_mask = 0  # not stored; a trained field uses every level
    field.mean_density = ckpt.mean_density
    field.mean_count = ckpt.mean_count
    if device is not None:
        field = field.to(device)
    if dtype is not None:
        field = field.to(dtype)
    field.train(False)
    return field


def load_field(path: PathLike, device=None, dtype: Optional[torch.dtype] = None,
               config: Optional[Union[FieldConfig, Mapping]] = None) -> RealFusionField:
    """Load a RealFusion field (published ``df.pth`` or converted ``.safetensors``), ready to render."""
    ckpt = read_field_checkpoint(path, config)
    field = field_from_checkpoint(ckpt, path, device, dtype)
    log.info("%s: RealFusion field, %d levels (finest %d), mean density %.4g, %s", path, ckpt.config.grid_levels,
             field.encoder.levels[-1].resolution, field.mean_density, ckpt.meta.get("source_format", "converted"))
    return field


# ----------------------------------------------------------------------------- saving / converting

def field_state(field: RealFusionField) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state dict, config) of our converted format for ``field``."""
    meta = {"mean_density": float(field.mean_density), "mean_count": int(field.mean_count)}
    config = {"method": METHOD, "class": FIELD_CLASS, "constructor": field.config.to_dict(), "meta": meta}
    return {k: v.detach().cpu() for k, v in field.state_dict().items()}, config


def save_field(path: PathLike, field: RealFusionField, meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``X.safetensors`` + ``X.json`` atomically."""
    state_dict, config = field_state(field)
    config["meta"].update(dict(meta or {}))
    save_with_config(path, state_dict, config)


def convert_realfusion_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Converter for ``nvs_core.convert``: a published ``df.pth`` to (state dict, config)."""
    ckpt = read_field_checkpoint(path)
    field = field_from_checkpoint(ckpt, path)
    state_dict, config = field_state(field)
    config["meta"].update({k: v for k, v in ckpt.meta.items() if k != "source_format"})
    config["meta"]["source_format"] = ckpt.meta.get("source_format", "df.pth")
    return state_dict, config


def _register_converter() -> None:
    from ..convert import register_converter

    register_converter(METHOD, convert_realfusion_checkpoint)


_register_converter()
