"""Golden parity handlers for NVS-Adapter (``$NVS_GOLDEN_DIR/nvsadapter``; see its README.md and cases.json).

The adapter always comes through the users' loader (``load_nvs_adapter`` on the case e Lightning checkpoint,
whose raw weights are case a's) and runs through the SD backend seam (the diffusers adapter, with the tiny
frozen UNet converted from the fixture's LDM keys by diffusers' own converter).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from nvs_core.checkpoints import load_safetensors
from nvs_core.nvsadapter import cameras as nvs_cameras
from nvs_core.nvsadapter.config import ADAPTER_MODULES, NVSAdapterConfig
from nvs_core.nvsadapter.loading import (ema_key, extract_adapter, frozen_context_dim, infer_config, is_adapter_key,
                                         load_nvs_adapter, read_lightning_checkpoint)
from nvs_core.nvsadapter.model import AdapterBlock
from nvs_core.nvsadapter.network import AdapterHook, adapter_forward, build_batch
from nvs_core.nvsadapter.sampler import denoiser_sigmas, sample, sampling_schedule
from nvs_core.progress import silent_progress
from nvs_core.sd import tiny
from nvs_core.sd.diffusers_backend import DiffusersSDBackend

CHECKPOINT = "case_e_checkpoint.ckpt"
CHECKPOINT_VARIANTS = ("case_e_checkpoint.ckpt", "case_e_checkpoint_numpy_scalars.ckpt",
                       "case_e_checkpoint_numpy1_scalars.ckpt")


# ------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


def _parse_override(text: str):
    if text.strip().startswith("exact"):
        return 0.0, 0.0
    m = re.match(r"\s*atol ([0-9.e-]+), rtol ([0-9.e-]+)", text)
    return (float(m[1]), float(m[2])) if m else None


def _tolerance(case: dict, output: str):
    override = case.get("tolerance_overrides", {}).get(output)
    parsed = _parse_override(override) if override else None
    return parsed if parsed is not None else (case["atol"], case["rtol"])


def _assert_close(case: dict, output: str, got: torch.Tensor, expected: torch.Tensor,
                  tol: Optional[tuple] = None) -> None:
    atol, rtol = tol if tol is not None else _tolerance(case, output)
    assert got.shape == expected.shape, f"{case['name']} {output}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{case['name']} {output}: dtype {got.dtype} != {expected.dtype}"
    if isinstance(atol, (int, float)) and atol == 0 and rtol == 0:
        assert torch.equal(got, expected), f"{case['name']} {output}: not bit-exact"
        return
    diff = (got.double() - expected.double()).abs()
    excess = diff - (torch.as_tensor(atol, dtype=torch.float64) + rtol * expected.double().abs())
    assert excess.max() <= 0, f"{case['name']} {output}: max |diff| {diff.max():.3g} exceeds atol {atol} rtol {rtol}"


def _channel_atol(atol: torch.Tensor) -> torch.Tensor:
    """Per-channel atol (144,) broadcast over (..., 144, h, w)."""
    return atol.double()[:, None, None]


def _adapter_config(case: dict) -> NVSAdapterConfig:
    c = case["config"]
    return NVSAdapterConfig.from_published_sd_config(
        c["sd_config"], image_context_dim=c["image_context_dim"], posemb_dim=c["posemb_dim"],
        latent_resolution=c["latent_resolution"], query_emb_scale=c["query_emb_scale"])


@functools.lru_cache(maxsize=None)
def _model(method_dir: Path, case_json: str):
    """(backend, adapter, weights) of case a: adapter through the users' loader, frozen UNet via diffusers."""
    case = json.loads(case_json)
    weights = {k[len("state_dict."):]: v for k, v in _tensors(method_dir / case["file"]).items()
               if k.startswith("state_dict.")}
    config = _adapter_config(case)
    adapter = load_nvs_adapter(method_dir / CHECKPOINT, use_ema=False, config=config)
    own = adapter.state_dict()
    fixture_adapter = {k: v for k, v in weights.items() if is_adapter_key(k)}
    assert len(fixture_adapter) == case["weights"]["adapter_tensors"] == len(own)
    assert all(torch.equal(own[k], v) for k, v in fixture_adapter.items()), "checkpoint raw weights != case a weights"
    sd = case["config"]["sd_config"]
    unet_config = tiny.unet_config_from_ldm(sd["model_channels"], sd["channel_mult"], sd["num_res_blocks"],
                                            sd["attention_resolutions"], sd["num_head_channels"], sd["context_dim"],
                                            sample_size=case["config"]["latent_resolution"])
    frozen = {k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.") and not is_adapter_key(k)}
    assert len(frozen) == case["weights"]["frozen_unet_tensors"]
    backend = DiffusersSDBackend(tiny.unet_from_ldm_state_dict(unet_config, frozen), any_layout=True)
    return backend, adapter


def _case_named(method_dir: Path, name: str) -> dict:
    spec = json.loads((method_dir / "cases.json").read_text())
    return next(c for c in spec["cases"] if c["name"] == name)


def block_steps(block: AdapterBlock, x1: torch.Tensor, posemb: torch.Tensor, image: torch.Tensor,
                objects: int, queries: int) -> Dict[str, torch.Tensor]:
    """Steps 2-4 of one block with every intermediate the fixtures record (README block algorithm)."""
    out = {"state_after_attn1": x1, "posemb_tokens": posemb}
    query = (x1 + posemb)[objects:].unflatten(0, (objects, queries)).flatten(1, 2)
    out["support_query_attn_out"] = block.support_query_attn(block.support_emb.repeat((objects, 1, 1)), query)
    out["composer_out"] = block.compose_queries(x1 + posemb, objects, queries)
    x2 = out["state_after_composer"] = out["composer_out"] + x1
    out["cross_view_out"] = block.cross_view(x2 + posemb, objects, queries)
    x3 = out["state_after_cross_view"] = out["cross_view_out"] + x2
    out["image_attn_out"] = block.image_attention(x3, image, objects)
    out["state_after_image_attn"] = out["image_attn_out"] + x3
    assert torch.equal(out["state_after_image_attn"],
                       block.after_self_attention(x1, posemb, image, objects, queries))
    assert torch.equal(out["state_after_image_attn"][:objects], 2 * x3[:objects])  # the support doubling quirk
    return out


# ------------------------------------------------------------------------------ module_forward (a, b)

def _adapter_forward_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    backend, adapter = _model(method_dir, json.dumps(case))
    args = [t["input." + k] for k in ("inputs", "timesteps", "txt_context", "image_context", "rays_context",
                                      "support_latents")]
    noise = t["input.uncond_support_noise"]

    # Record what the fixture records: the batch, the UNet's time embedding and output, and the first block.
    unet = backend.unet_model
    layer = backend.layers[0]
    got: Dict[str, torch.Tensor] = {}
    hooks = [layer.transformer.register_forward_pre_hook(lambda m, a: got.__setitem__("inter.st.x_in", a[0])),
             layer.transformer.register_forward_hook(lambda m, a, o: got.__setitem__("inter.st.out", o[0])),
             layer.block.attn1.register_forward_hook(lambda m, a, o: got.__setitem__("inter.blk.attn1_out", o)),
             layer.block.attn2.register_forward_hook(lambda m, a, o: got.__setitem__("inter.blk.attn2_out", o)),
             layer.block.ff.register_forward_hook(lambda m, a, o: got.__setitem__("inter.blk.ff_out", o)),
             layer.block.norm1.register_forward_pre_hook(lambda m, a: got.__setitem__("inter.blk.tokens_in", a[0])),
             unet.time_embedding.register_forward_hook(lambda m, a, o: got.__setitem__("inter.xunet.time_emb", o)),
             unet.register_forward_hook(lambda m, a, o: got.__setitem__("inter.xunet.out", o[0]))]
    seen = {}
    original_call = AdapterHook.__call__

    def recording_call(self, hidden, call):
        result = original_call(self, hidden, call)
        if call.layer == 0:
            seen.update(tokens=self.posemb_tokens(self.layers[0].level), hidden=hidden, result=result)
        return result

    AdapterHook.__call__ = recording_call
    try:
        with torch.no_grad():
            got["output.pred"] = adapter_forward(backend, adapter, *args, uncond=t["input.ucg_mask"],
                                                 noise=lambda shape: noise)
    finally:
        AdapterHook.__call__ = original_call
        for h in hooks:
            h.remove()
    with torch.no_grad():
        got["output.pred_all_cond"] = adapter_forward(backend, adapter, *args,
                                                      uncond=torch.zeros_like(t["input.ucg_mask"]))
        batch = build_batch(*args, uncond=t["input.ucg_mask"], noise=lambda shape: noise)
        got.update({"inter.xunet.latents": batch.latents, "inter.xunet.timesteps": batch.timesteps,
                    "inter.xunet.txt_context": batch.text, "inter.xunet.image_context": batch.image,
                    "inter.xunet.rays_context": batch.rays})
        for level in range(len(adapter.pe_blocks)):
            got[f"inter.xunet.posemb_level{level}"] = adapter.posemb(batch.rays, level)
        side = t["inter.st.x_in"].shape[-2:]
        got["inter.st.posemb_in"] = seen["tokens"].transpose(1, 2).unflatten(2, side)
        steps = block_steps(adapter.block(0), seen["hidden"], seen["tokens"], batch.image, batch.objects,
                            batch.queries)
        assert torch.equal(steps["state_after_image_attn"], seen["result"])
    got.update({f"inter.blk.{k}": v for k, v in steps.items()})
    got["inter.blk.state_after_attn2"] = got["inter.blk.attn2_out"] + got["inter.blk.state_after_image_attn"]
    got["inter.blk.out"] = got["inter.blk.ff_out"] + got["inter.blk.state_after_attn2"]
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])
    # object 0 is conditional in both calls: bit-identical
    assert torch.equal(got["output.pred"][0], got["output.pred_all_cond"][0])


def _block_case(case: dict, method_dir: Path) -> None:
    from diffusers.models.attention import BasicTransformerBlock

    t = _tensors(method_dir / case["file"])
    c = case["config"]
    weights = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    assert len(weights) == case["weights"]["count"]
    adapter = AdapterBlock(c["dim"], c["n_heads"], c["feat_resolution"] ** 2, c["image_context_dim"])
    adapter.load_state_dict({k: v for k, v in weights.items()
                             if k == "support_emb" or k.split(".")[0] in ADAPTER_MODULES}, strict=True)
    frozen = BasicTransformerBlock(c["dim"], c["n_heads"], c["d_head"], cross_attention_dim=c["context_dim"],
                                   activation_fn="geglu", norm_type="layer_norm")
    frozen.load_state_dict({k: v for k, v in weights.items() if k.split(".")[0] in
                            ("attn1", "attn2", "ff", "norm1", "norm2", "norm3")}, strict=True)
    x, text, image, posemb = t["input.x"], t["input.text_context"], t["input.image_context"], t["input.posemb"]
    queries = int(t["input.num_query"])
    objects = x.shape[0] // (int(t["input.num_support"]) + queries)
    with torch.no_grad():
        got = {"inter.attn1_out": frozen.attn1(frozen.norm1(x))}
        x1 = got["inter.attn1_out"] + x
        got.update({f"inter.{k}": v for k, v in block_steps(adapter, x1, posemb, image, objects, queries).items()})
        x4 = got["inter.state_after_image_attn"]
        got["inter.attn2_out"] = frozen.attn2(frozen.norm2(x4), encoder_hidden_states=text)
        x5 = got["inter.state_after_attn2"] = got["inter.attn2_out"] + x4
        got["inter.ff_out"] = frozen.ff(frozen.norm3(x5))
        got["output.out"] = got["inter.ff_out"] + x5
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


def module_forward(case: dict, method_dir: Path) -> None:
    if "ThreeDiMAdapter.forward" in case["callable"]:
        _adapter_forward_case(case, method_dir)
    elif "ThreeDiMBasicTransformerBlock" in case["callable"]:
        _block_case(case, method_dir)
    else:
        raise AssertionError(f"{case['name']}: no NVS-Adapter module for {case['callable']}")


# ----------------------------------------------------------------------------- function_pipeline (c)

def camera_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    cfg = case["config"]
    ref = t["input.support_elevation_azimuth_distance"].tolist()
    el, az, dist = t["input.elevation_deg"].numpy(), t["input.azimuth_deg"].numpy(), t["input.distance"].numpy()
    got: Dict[str, torch.Tensor] = {}
    raw = [[nvs_cameras.published_lookat_matrix(np.deg2rad(a), np.deg2rad(e), d)
            for e, a, d in zip([ref[0], *el[b]], [ref[1], *az[b]], [ref[2], *dist[b]])] for b in range(el.shape[0])]
    got["output.view_matrix_raw"] = torch.stack([torch.stack(r) for r in raw])
    support = nvs_cameras.published_c2w(*ref).expand(el.shape[0], 1, 4, 4)
    got["output.c2w_flipped"] = c2w = torch.cat([support, nvs_cameras.published_c2w(el, az, dist)], dim=1)
    got["output.c2w_relative"] = relative = nvs_cameras.relative_to_reference(c2w)
    K = nvs_cameras.published_intrinsics(np.deg2rad(cfg["fov_deg"]), cfg["resolution"], cfg["resolution"])
    got["output.intrinsics"] = K
    got["output.intrinsics_latent"] = nvs_cameras.latent_intrinsics(K, cfg["stride"])
    got["output.inv_intrinsics_latent"] = nvs_cameras.inverse_intrinsics(got["output.intrinsics_latent"])[:3, :3]
    size = (cfg["resolution"], cfg["resolution"])
    origins, directions = nvs_cameras.rays_on_grid(K.expand(*c2w.shape[:2], 4, 4), relative, size, cfg["stride"])
    got["output.rays_offset"], got["output.rays_direction"] = origins, directions
    got["output.plucker_moment"], got["output.plucker_direction"] = nvs_cameras.plucker(origins, directions)
    got["output.ray_pe"] = nvs_cameras.ray_embedding(origins, directions)
    assert torch.equal(got["output.ray_pe"], nvs_cameras.rays_context_spherical(el, az, dist, ref, cfg["fov_deg"],
                                                                               cfg["resolution"], cfg["stride"]))
    tiny64 = cfg["tiny64"]
    el64, az64 = t["input.tiny64.elevation_deg"].numpy(), t["input.tiny64.azimuth_deg"].numpy()
    c2w64 = torch.cat([nvs_cameras.published_c2w(*ref).expand(el64.shape[0], 1, 4, 4),
                       nvs_cameras.published_c2w(el64, az64, ref[2])], dim=1)
    got["output.tiny64.c2w_relative"] = rel64 = nvs_cameras.relative_to_reference(c2w64)
    got["output.tiny64.intrinsics"] = K64 = nvs_cameras.published_intrinsics(
        np.deg2rad(cfg["fov_deg"]), tiny64["resolution"], tiny64["resolution"])
    o64, d64 = nvs_cameras.rays_on_grid(K64.expand(*c2w64.shape[:2], 4, 4), rel64,
                                        (tiny64["resolution"],) * 2, tiny64["stride"])
    got["output.tiny64.rays_offset"], got["output.tiny64.rays_direction"] = o64, d64
    got["output.tiny64.ray_pe"] = nvs_cameras.ray_embedding(o64, d64)
    channel_atol = _channel_atol(t["meta.ray_pe_channel_atol"])
    for output in case["outputs"]:
        tol = (channel_atol, 0.0) if output.endswith("ray_pe") else None
        _assert_close(case, output, got[output], t[output], tol)
    # The stricter check: our PE of the fixture's Plücker vectors.
    pe = torch.cat([nvs_cameras.sinusoidal_embedding(t["output.plucker_moment"], nvs_cameras.OFFSET_DEG),
                    nvs_cameras.sinusoidal_embedding(t["output.plucker_direction"], nvs_cameras.DIRECTION_DEG)], dim=-1)
    _assert_close(case, "PE(plucker)", pe.permute(0, 1, 4, 2, 3), t["output.ray_pe"], (1e-4, 0.0))


# ----------------------------------------------------------------------------- sampler_trajectory (d)

def sampler_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    case_a = _case_named(method_dir, "a_adapter_forward")
    backend, adapter = _model(method_dir, json.dumps(case_a))
    cfg = case["config"]
    timesteps, sigmas = sampling_schedule(cfg["num_steps"])
    drawn = iter(t["input.uncond_support_noise"])
    record: dict = {}
    with torch.no_grad():
        final = sample(backend, adapter, t["input.x_T_noise"], t["input.txt_context"], t["input.image_context"],
                       t["input.rays_context"], t["input.support_latents"], cfg_scale=float(t["input.cfg_scale"]),
                       steps=cfg["num_steps"], reference_noise=lambda shape: next(drawn), progress=silent_progress,
                       record=record)
    assert next(drawn, None) is None, "one reference-noise draw per step"
    got = {"output.final": final, "output.timesteps_50": timesteps, "output.sigmas_51": sigmas,
           "output.denoiser_sigmas_1000": denoiser_sigmas(),
           **{f"output.{k}": record[k] for k in ("net_input", "net_eps", "net_timestep_idx", "denoised_cfg",
                                                  "step_sigma", "x_trajectory")}}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


# ------------------------------------------------------------------------------- checkpoint_load (e)

def checkpoint_case(case: dict, method_dir: Path) -> None:
    expected = _tensors(method_dir / case["expected_file"])
    config = _adapter_config(_case_named(method_dir, "a_adapter_forward"))
    prefix = "model.diffusion_model."
    for name in CHECKPOINT_VARIANTS:
        full = read_lightning_checkpoint(method_dir / name)  # weights-only, numpy scalars allow-listed
        for use_ema in (True, False):
            state = extract_adapter(full, use_ema, name)
            got_config = infer_config(state, config.num_head_channels, frozen_context_dim(full), name)
            assert got_config == config, f"{name}: inferred {got_config} != {config}"
            label = "adapter_ema" if use_ema else "adapter_raw"
            want = {k[len(f"expected.{label}.{prefix}"):]: v for k, v in expected.items()
                    if k.startswith(f"expected.{label}.")}
            assert len(want) == 151 and set(state) == set(want), f"{name} {label}: keys differ"
            for key, value in want.items():
                _assert_close(case, f"{label}.{key}", state[key], value, (0.0, 0.0))
    raw = {k: v for k, v in expected.items() if k.startswith("expected.adapter_raw.")}
    for key, value in raw.items():  # the EMA naming rule, on the expected dicts themselves
        ckpt_key = key[len("expected.adapter_raw."):]
        assert ema_key(ckpt_key).startswith("model_ema.diffusion_model")
        assert not torch.equal(value, expected["expected.adapter_ema." + ckpt_key])
    for name in CHECKPOINT_VARIANTS:  # the users' loader, EMA by default, config inferred
        adapter = load_nvs_adapter(method_dir / name, num_head_channels=config.num_head_channels)
        assert adapter.config == config
        assert all(torch.equal(v, expected[f"expected.adapter_ema.{prefix}{k}"])
                   for k, v in adapter.state_dict().items())


HANDLERS = {
    "module_forward": module_forward,
    "function_pipeline": camera_case,
    "sampler_trajectory": sampler_case,
    "checkpoint_load": checkpoint_case,
}
