"""Golden parity handlers for RealFusion (``$NVS_GOLDEN_DIR/realfusion``; see its README.md and cases.json).

Tolerances follow cases.json: a case default ``atol``/``rtol`` and per-key fnmatch patterns in
``tolerances`` (the most specific pattern wins: an exact key, else the longest matching pattern).
"""
from __future__ import annotations

import fnmatch
import functools
import json
import math
from pathlib import Path
from typing import Dict, Optional

import torch

from nvs_core.checkpoints import load_safetensors


# ------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _load(path: Path):
    return load_safetensors(path)


def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    return _load(path)[0]


def _fixture_meta(path: Path) -> dict:
    return json.loads(_load(path)[1]["fixture"])


def _tolerance(case: dict, key: str):
    patterns = case.get("tolerances", {})
    if key in patterns:
        return tuple(patterns[key])
    best = None
    for pattern, tol in patterns.items():
        if fnmatch.fnmatchcase(key, pattern) and (best is None or len(pattern) > len(best[0])):
            best = (pattern, tol)
    return tuple(best[1]) if best else (case["atol"], case["rtol"])


def assert_close(case: dict, key: str, got, expected: torch.Tensor, tol: Optional[tuple] = None) -> None:
    got = torch.as_tensor(got)
    atol, rtol = tol if tol is not None else _tolerance(case, key)
    name = f"{case['name']} {key}"
    assert tuple(got.shape) == tuple(expected.shape), f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(got.to(expected.dtype), expected), f"{name}: integer values differ"
        return
    g, e = got.detach().double().cpu(), expected.double()
    nan_g, nan_e = torch.isnan(g), torch.isnan(e)
    assert torch.equal(nan_g, nan_e), f"{name}: NaN positions differ ({int(nan_g.sum())} vs {int(nan_e.sum())})"
    g, e = g[~nan_e], e[~nan_e]
    inf = torch.isinf(e)
    assert torch.equal(g[inf], e[inf]), f"{name}: infinities differ"
    g, e = g[~inf], e[~inf]
    if atol == 0 and rtol == 0:
        assert torch.equal(g, e), f"{name}: not bit-exact (max |diff| {(g - e).abs().max():.3g})"
        return
    if e.numel():
        excess = (g - e).abs() - (atol + rtol * e.abs())
        assert excess.max() <= 0, f"{name}: max |diff| {(g - e).abs().max():.3g} exceeds atol {atol} rtol {rtol}"


def _state_dict(t: Dict[str, torch.Tensor], prefix: str = "state_dict.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def _check_all(case: dict, got: Dict[str, torch.Tensor], t: Dict[str, torch.Tensor], optional=()) -> None:
    missing = [k for k in case["outputs"] if k not in got and not any(fnmatch.fnmatchcase(k, p) for p in optional)]
    assert not missing, f"{case['name']}: no value computed for {missing}"
    for key in case["outputs"]:
        if key in got:
            assert_close(case, key, got[key], t[key])


# ------------------------------------------------------------------------- a: grid encoder

def grid_case(case: dict, method_dir: Path) -> None:
    from nvs_core.realfusion.grid import TiledGridEncoder, corners, inside_unit_cube, normalise_points

    t = _tensors(method_dir / case["file"])
    kw = case["constructor_kwargs"]
    assert kw["gridtype"] == "tiled" and not kw["align_corners"] and kw["interpolation"] == "linear"
    enc = TiledGridEncoder(kw["num_levels"], kw["level_dim"], kw["base_resolution"], kw["log2_hashmap_size"],
                           kw["desired_resolution"], kw["input_dim"], init_std=0)
    enc.load_state_dict(_state_dict(t), strict=True)
    assert torch.equal(enc.offsets, t["state_dict.offsets"])
    x, bound = t["input.x"], float(t["input.bound"])
    features = enc(x, bound)
    (features * t["input.grad_output"]).sum().backward()
    grad = enc.embeddings.grad
    rows = (grad != 0).any(dim=1).nonzero()[:, 0]

    u = normalise_points(x, bound)
    inside = inside_unit_cube(u)
    u_in = torch.where(inside[:, None], u, torch.zeros_like(u))
    corner_rows, corner_weights = zip(*(corners(u_in, lv) for lv in enc.levels))
    corner_index = torch.where(inside[:, None, None], torch.stack(corner_rows, 1), -1).int()
    corner_weight = torch.where(inside[:, None, None], torch.stack(corner_weights, 1), t["output.corner_weight"])

    got = {
        "output.features": features.detach(),
        "output.features_fma": features.detach(),
        "output.grad_embeddings_rows": rows,
        "output.grad_embeddings_values": grad[t["output.grad_embeddings_rows"]],
        "output.grad_embeddings_fma_values": grad[t["output.grad_embeddings_rows"]],
        "output.level_scale": torch.tensor([lv.scale for lv in enc.levels], dtype=torch.float32),
        "output.level_resolution": torch.tensor([lv.resolution for lv in enc.levels], dtype=torch.int32),
        "output.level_resolution_python": torch.tensor([lv.resolution_python for lv in enc.levels], dtype=torch.int32),
        "output.level_hashmap_size": torch.tensor([lv.rows for lv in enc.levels], dtype=torch.int32),
        "output.level_index_dims": torch.tensor([len(lv.strides) for lv in enc.levels], dtype=torch.int32),
        "output.oob": (~inside).to(torch.uint8),
        "output.corner_index": corner_index,
        "output.corner_weight": corner_weight,
    }
    _check_all(case, got, t)
    # The strict tolerance for a float32 port that follows README section 4.1.
    assert_close(case, "output.features", features.detach(), t["output.features"],
                 tuple(case["strict_tolerance"]["output.features"]))
    assert_close(case, "const.S_float32", torch.tensor(math.log2(float(t["const.per_level_scale"])),
                                                       dtype=torch.float32), t["const.S_float32"], (0, 0))


# ----------------------------------------------------------------- b, c: field and shading

def _fixture_field(case: dict, method_dir: Path):
    from nvs_core.realfusion.loading import build_field, load_field_weights

    t = _tensors(method_dir / case["file"])
    field = build_field(case["constructor_kwargs"])
    load_field_weights(field, _state_dict(t), method_dir / case["file"], require_occupancy=False)
    return field.train(False), t


def field_case(case: dict, method_dir: Path) -> None:
    from nvs_core.realfusion.field import freq_encode, trunc_exp

    field, t = _fixture_field(case, method_dir)
    x = t["input.x"]
    got = {}
    with torch.no_grad():
        assert field.grid_levels_mask == case["constructor_kwargs"]["grid_levels_mask"]
        got["output.grid_features"] = field.encoder(x, bound=field.bound)
        got["output.blob"] = field.gaussian(x)
        got["output.masked.mlp_out"] = field.mlp_out(x)
        got["output.masked.sigma"], got["output.masked.albedo"] = field.common_forward(x)
        field.grid_levels_mask = 0
        got["output.mlp_out"] = field.mlp_out(x)
        got["output.sigma"], got["output.albedo"] = field.common_forward(x)
        density = field.density(x)
        assert torch.equal(density["sigma"], got["output.sigma"]) and torch.equal(density["albedo"], got["output.albedo"])
        got["output.bg_rgb"] = field.background(t["input.d"])
        got["output.bg_rgb_freq_torch"] = torch.sigmoid(field.bg_net(freq_encode(t["input.d"], 6, kernel=False)))
        got["output.freq_torch"] = freq_encode(t["input.freq_x"], 6, kernel=False)
        got["output.freq_kernel"] = freq_encode(t["input.freq_x"], 6, kernel=True)
    xe = t["input.trunc_exp_x"].clone().requires_grad_(True)
    y = trunc_exp(xe)
    (y * t["input.trunc_exp_grad_output"]).sum().backward()
    got["output.trunc_exp_y"], got["output.trunc_exp_grad"] = y.detach(), xe.grad
    _check_all(case, got, t)
    assert torch.equal(t["const.freq_bands"], 2.0 ** torch.arange(6, dtype=torch.float64))


def shading_case(case: dict, method_dir: Path) -> None:
    field, t = _fixture_field(case, method_dir)
    x, d, light = t["input.x"], t["input.d"], t["input.light_d"]
    got = {}
    with torch.no_grad():
        got["output.fd_normal_raw"] = field.finite_difference_normal(x)
        got["output.normal"] = field.normal(x)
        sigma, color, normal = field(x, d, light, ratio=1, shading="albedo")
        got.update({"output.albedo.sigma": sigma, "output.albedo.color": color, "output.albedo.normal": normal})
        assert field(x, d, light, shading="albedo", albedo_only=True)[2] is None
        for ratio in t["input.ratios"].tolist():
            tag = f"r{ratio:g}".replace(".", "p")
            factor = ratio + (1 - ratio) * (got["output.normal"] @ light).clamp(min=0)
            got[f"output.lambertian_factor_{tag}"] = factor
            for mode in ("textureless", "lambertian", "normal"):
                sigma, color, _ = field(x, d, light, ratio=ratio, shading=mode)
                got[f"output.{mode}_{tag}.color"] = color
                got[f"output.{mode}_{tag}.sigma"] = sigma
    _check_all(case, got, t)


HANDLERS = {
    "function_transcribed": grid_case,
    "name:b_field_mlp_freq": field_case,
    "name:c_normals_shading": shading_case,
}
