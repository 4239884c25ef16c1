"""Golden parity handlers for VIVID (``$NVS_GOLDEN_DIR/vivid``; see its README.md and cases.json)."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from nvs_core.progress import silent_progress
from nvs_core.vivid import geometry as vivid_geometry
from nvs_core.vivid import sampler as vivid_sampler
from nvs_core.vivid.loading import load_vivid_pickle, vivid_network_from_weights
from nvs_core.checkpoints import load_safetensors


# ------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


def _tolerance(case: dict, output: str):
    per_output = case.get("per_output_tolerance", {})
    for pattern, tol in per_output.items():
        if pattern == output or (pattern.endswith("*") and output.startswith(pattern[:-1])):
            return tol["atol"], tol["rtol"]
    return case["atol"], case["rtol"]


def _assert_close(case: dict, output: str, got: torch.Tensor, expected: torch.Tensor,
                  tol: Optional[tuple] = None) -> None:
    atol, rtol = tol if tol is not None else _tolerance(case, output)
    assert got.shape == expected.shape, f"{case['name']} {output}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{case['name']} {output}: dtype {got.dtype} != {expected.dtype}"
    if atol == 0 and rtol == 0:
        assert torch.equal(got, expected), f"{case['name']} {output}: not bit-exact"
        return
    excess = (got.double() - expected.double()).abs() - (atol + rtol * expected.double().abs())
    assert excess.max() <= 0, (f"{case['name']} {output}: max |diff| "
                               f"{(got.double() - expected.double()).abs().max():.3g} exceeds atol {atol} rtol {rtol}")


@functools.lru_cache(maxsize=None)
def _network(path: Path, kwargs_json: str):
    """The network of a fixture file, built from its kwargs through the users' loader."""
    tensors = _tensors(path)
    state_dict = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    return vivid_network_from_weights(json.loads(kwargs_json), state_dict, source=path)


def _net(method_dir: Path, weights: dict, kwargs: dict):
    assert weights["prefix"] == "state_dict."
    return _network(method_dir / weights["file"], json.dumps(kwargs))


# --------------------------------------------------------------------------- module_forward (a b c)

def module_forward(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    net = _net(method_dir, case["weights"], case["constructor_kwargs"])
    args = {name: t[key] for name, key in case["call"]["forward"].items()}
    if net.super_res:  # the fixture replaced the net's fresh conditioning noise by input.cond_noise
        args["conditioning_noise"] = t["input.cond_noise"]

    raw_outputs = []
    hook = net.unet.register_forward_hook(lambda module, inputs, output: raw_outputs.append(output))
    try:
        with torch.no_grad():
            D_x = net(**args)
            _, logvar = net(**args, return_logvar=True)
            features = net(**args, return_features=True)
            if net.super_res:
                D_noiseless = net(**{**args, "conditioning_noise": torch.zeros_like(t["input.cond_noise"])})
    finally:
        hook.remove()

    got = {"output.D_x": D_x, "output.F_x": raw_outputs[0], "output.logvar": logvar}
    got.update({f"output.features.{i}": f for i, f in enumerate(features)})
    if net.super_res:
        got["output.D_x_noiseless_cond"] = D_noiseless
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])
    if not net.uncond:
        assert len(features) == sum(k.startswith("output.features.") for k in t), "number of encoder feature maps"

    if net.uncond:  # the guidance net ignores geometry and source (README case b)
        with torch.no_grad():
            assert torch.equal(net(t["input.src"], t["input.dst"], t["input.sigma"], t["input.geometry"]), D_x)
            assert torch.equal(net(torch.zeros_like(t["input.src"]), t["input.dst"], t["input.sigma"]), D_x)


# ----------------------------------------------------------------------------------- function (d d2 s)

def compose_geometry_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    got = {
        "output.geometry_64": vivid_geometry.compose_geometry(t["input.tgt2src"], t["input.src_K_64"],
                                                              t["input.tgt_K_64"], 64),
        "output.geometry_256": vivid_geometry.compose_geometry(t["input.tgt2src"], t["input.src_K_256"],
                                                               t["input.tgt_K_256"], 256),
        "const.MEAN": vivid_geometry.MEAN,
        "const.STD": vivid_geometry.STD,
    }
    tgt2src, src_K, tgt_K = vivid_geometry.decompose_geometry(t["output.geometry_64"], 64)
    got.update({"output.decompose_64.tgt2src": tgt2src, "output.decompose_64.src_K": src_K,
                "output.decompose_64.tgt_K": tgt_K})
    for output in case["outputs"]:
        tol = (0, 0) if output.startswith("const.") else None
        _assert_close(case, output, got[output], t[output], tol)
    # Unbatched calls give the same values.
    single = vivid_geometry.compose_geometry(t["input.tgt2src"][3], t["input.src_K_64"][3], t["input.tgt_K_64"][3])
    assert torch.equal(single, got["output.geometry_64"][3])


def dataset_geometry_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    call = case["call"]
    results = [vivid_geometry.dataset_geometry(src, tgt, call["imsize"], call["srsize"], call["frame_size_HxW"])
               for src, tgt in call["lines"]]
    got = {"output.geometry": torch.stack([r["geometry"] for r in results]),
           "output.sr_geometry": torch.stack([r["sr_geometry"] for r in results]),
           "output.src_K_after_pipeline": torch.stack([r["src_K"] for r in results]),
           "output.tgt_K_after_pipeline": torch.stack([r["tgt_K"] for r in results])}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])

    # The parser reads what the fixture says it reads (float32 of the line's values).
    for i, (src, tgt) in enumerate(call["lines"]):
        for line, side in ((src, "src"), (tgt, "tgt")):
            _, K, w2c = vivid_geometry.parse_camera_line(line)
            assert torch.equal(w2c, t[f"input.{side}_w2c"][i].float())
            norm = t[f"input.{side}_intrinsics_norm"][i]
            assert torch.equal(vivid_geometry.intrinsics_to_vector(K),
                               (norm * torch.tensor([640, 360, 640, 360], dtype=torch.float64)).float())

    # The non-aliased variant gives the fixture's single-transform reference values.
    single = [vivid_geometry.dataset_geometry(src, tgt, call["imsize"], call["srsize"], call["frame_size_HxW"],
                                              aliased=False) for src, tgt in call["lines"]]
    for key, ref in (("geometry", "reference.geometry_single_transform_64"),
                     ("sr_geometry", "reference.sr_geometry_single_transform_256"),
                     ("src_K", "reference.src_K_single_transform_64")):
        _assert_close(case, ref, torch.stack([r[key] for r in single]), t[ref])


def sr_upsample_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    y = vivid_sampler.resize_bilinear_antialias(t["input.x"], case["call"]["size"])
    _assert_close(case, "output.y", y, t["output.y"])


# ------------------------------------------------------------------------------------ sampler (e)

def sampler_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    net = _net(method_dir, case["weights"]["net"], case["constructor_kwargs"]["net"])
    gnet = _net(method_dir, case["weights"]["gnet"], case["constructor_kwargs"]["gnet"])
    kwargs = dict(case["call"]["kwargs"])
    assert kwargs.pop("dtype") == "float32" and kwargs.pop("conditioning_image") is None

    calls = {"x": [], "sigma": [], "D_net": [], "D_gnet": []}

    def recording(model, name):
        def call(src, x, sigma, geometry=None, *args, **kw):
            out = model(src, x, sigma, geometry, *args, **kw)
            if name == "D_net":
                calls["x"].append(x)
                calls["sigma"].append(sigma)
            else:
                assert geometry is None, "the guidance net must be called without geometry"
            calls[name].append(out)
            return out
        return call

    steps = []
    with torch.no_grad():
        x_final = vivid_sampler.edm_sampler(recording(net, "D_net"), t["input.src"], t["input.noise"],
                                            t["input.labels"], recording(gnet, "D_gnet"), progress=silent_progress,
                                            callback=steps.append, **kwargs)
    got = {
        "output.t_steps": vivid_sampler.edm_time_steps(kwargs["num_steps"], kwargs["sigma_min"], kwargs["sigma_max"],
                                                       kwargs["rho"]),
        "output.x_traj": torch.stack([s["x"] for s in steps] + [x_final]),
        "output.x_euler": torch.stack([s["x_euler"] for s in steps]),
        "output.x_final": x_final,
        "output.calls.x": torch.stack(calls["x"]),
        "output.calls.sigma": torch.stack(calls["sigma"]),
        "output.calls.D_net": torch.stack(calls["D_net"]),
        "output.calls.D_gnet": torch.stack(calls["D_gnet"]),
        "output.calls.D_guided": torch.stack([g.lerp(n, kwargs["guidance"])
                                              for n, g in zip(calls["D_net"], calls["D_gnet"])]),
    }
    assert all(s.ndim == 0 for s in calls["sigma"]), "the sampler passes a 0-d sigma"
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


# ---------------------------------------------------------------------------- seeded_sampling (g)

def _assert_images(case: dict, output: str, images: torch.Tensor, expected: torch.Tensor,
                   latents: torch.Tensor) -> None:
    """uint8 levels: exact where the recorded latent is clear of a truncation boundary, else +-1."""
    atol, rtol = case["atol"], case["rtol"]
    diff = (images.int() - expected.int()).abs()
    assert diff.max() <= 1, f"{case['name']} {output}: pixels differ by {diff.max()} levels"
    level = latents.double() * 127.5 + 128
    margin = 127.5 * (atol + rtol * latents.double().abs())
    near_boundary = (level - level.round()).abs() <= margin
    assert (diff[~near_boundary] == 0).all(), f"{case['name']} {output}: a pixel clear of a boundary differs"


def seeded_sampling_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    net = _net(method_dir, case["weights"]["net"], case["constructor_kwargs"]["net"])
    gnet = _net(method_dir, case["weights"]["gnet"], case["constructor_kwargs"]["gnet"])
    call = case["call"]
    seeds = t["input.seeds"].tolist()
    assert seeds == call["seeds"]
    kwargs = dict(call["sampler_kwargs"])
    assert kwargs.pop("dtype") == "float32"

    noise = vivid_sampler.seeded_noise(seeds, t["input.src_pixels"].shape[1:])
    _assert_close(case, "output.noise", noise, t["output.noise"])

    with torch.no_grad():
        steps = []
        latents = vivid_sampler.edm_sampler(net, vivid_sampler.encode_pixels(t["input.src_pixels"]), noise, t["input.labels"],
                                  gnet, progress=silent_progress, callback=steps.append, **kwargs)
        x_traj = torch.stack([s["x"] for s in steps] + [latents])
        _assert_close(case, "output.x_traj", x_traj, t["output.x_traj"])
        for max_batch_size, suffix in ((call["max_batch_size"], ""), (1, "_batch1")):
            result = vivid_sampler.generate_views(net, t["input.src_pixels"], t["input.labels"], seeds, gnet=gnet,
                                                  max_batch_size=max_batch_size, progress=silent_progress, **kwargs)
            _assert_close(case, "output.latents" + suffix, result["latents"], t["output.latents" + suffix])
            _assert_images(case, "output.images" + suffix, result["images"], t["output.images" + suffix],
                           t["output.latents" + suffix])
            if not suffix:  # the driver batches the seeds as one edm_sampler call does
                assert torch.equal(result["latents"], latents)


# ---------------------------------------------------------------------------- checkpoint_load (f)

def checkpoint_load_case(case: dict, method_dir: Path) -> None:
    modules_before = set(sys.modules)
    ckpt = load_vivid_pickle(method_dir / case["file"])
    new_modules = set(sys.modules) - modules_before
    assert not [m for m in new_modules if m.startswith(("dnnlib", "torch_utils", "training", "_imported_module"))], \
        f"loading imported upstream code: {sorted(new_modules)}"

    expected_json = json.loads((method_dir / case["expected"]["init_kwargs"]["file"]).read_text())
    assert list(ckpt.init_kwargs.items()) == list(expected_json["ema_init_kwargs"].items())
    assert ckpt.init_kwargs == case["constructor_kwargs"]
    assert ckpt.class_name == expected_json["ema_class_name"]
    assert list(ckpt.state_dict) == expected_json["state_dict_key_order"]

    top = expected_json["top_level"]
    assert list(ckpt.extras) + ["ema"] == top["key_order"]
    assert ckpt.extras["dataset_kwargs"] == top["dataset_kwargs"]
    for name in ("encoder", "loss_fn"):
        described = json.loads(json.dumps(ckpt.extras[name]))  # tuples -> lists, as in the JSON
        assert described == top[name], f"top-level {name}: {described} != {top[name]}"

    t = _tensors(method_dir / case["expected"]["state_dict"]["file"])
    prefix = case["expected"]["state_dict"]["prefix"]
    expected_sd = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    assert set(ckpt.state_dict) == set(expected_sd)
    for key, tensor in ckpt.state_dict.items():
        _assert_close(case, "expected.state_dict." + key, tensor, expected_sd[key])

    forward = case["call"]["forward_after_load"]
    args = [t[forward[name]] for name in ("src", "dst", "sigma", "geometry")]
    with torch.no_grad():
        for dtype, output in ((torch.float32, "output.D_x_fp32_params"), (None, "output.D_x_fp16_params_cpu")):
            net = ckpt.build(dtype=dtype)
            _assert_close(case, output, net(*args), t[output])


HANDLERS = {
    "module_forward": module_forward,
    "name:d_compose_geometry": compose_geometry_case,
    "name:d2_dataset_geometry": dataset_geometry_case,
    "name:s_sr_lowres_upsample": sr_upsample_case,
    "sampler": sampler_case,
    "seeded_sampling": seeded_sampling_case,
    "checkpoint_load": checkpoint_load_case,
}
