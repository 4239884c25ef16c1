"""Golden parity handlers for GeNVS (``$NVS_GOLDEN_DIR/genvs``; see its README.md and cases.json)."""
from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from nvs_core.checkpoints import load_safetensors
from nvs_core.convert import convert
from nvs_core.genvs import cameras as genvs_cameras
from nvs_core.genvs import sampler as genvs_sampler
from nvs_core.genvs.config import DenoiserConfig
from nvs_core.genvs.denoiser import build_denoiser
from nvs_core.genvs.encoder import DeepLabV3PlusDecoder, preprocess
from nvs_core.genvs.loading import genvs_from_state_dict, load_genvs, load_genvs_checkpoint
from nvs_core.genvs.nerf import (NeRFField, RenderDraws, SourceViews, get_rays, near_far_from_bound, render_rays,
                                 render_views, upsample_condition)
from nvs_core.genvs import orbit as genvs_orbit
from nvs_core.multiview import load_srn
from nvs_core.progress import silent_progress


# ------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


def _prefixed(t: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def _seeds(method_dir: Path) -> dict:
    spec = json.loads((method_dir / "cases.json").read_text())
    return spec.get("seeds", {}) if isinstance(spec, dict) else {}


def _seed(case: dict, method_dir: Path, key: str) -> Optional[int]:
    """A recorded torch seed of this case (cases.json -> seeds -> <case letter>), if any."""
    entry = _seeds(method_dir).get(case["name"].split("_")[0], {})
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, str):  # e.g. "torch.manual_seed(5103) immediately before each call"
        match = re.search(r"manual_seed\((\d+)\)", value)
        value = int(match.group(1)) if match else None
    return value if isinstance(value, int) else None


def _side_file(case: dict, method_dir: Path, suffix: str) -> Path:
    files = [f for f in case.get("files", []) if f.endswith(suffix)]
    assert len(files) == 1, f"{case['name']}: expected one file ending {suffix} in {case.get('files')}"
    return method_dir / files[0]


def _tolerance(case: dict, output: str):
    for pattern, tol in case.get("per_output_tolerance", {}).items():
        if pattern == output or (pattern.endswith("*") and output.startswith(pattern[:-1])):
            return tol["atol"], tol["rtol"]
    return case["atol"], case["rtol"]


def _assert_close(case: dict, output: str, got: torch.Tensor, expected: torch.Tensor,
                  tol: Optional[tuple] = None) -> None:
    atol, rtol = tol if tol is not None else _tolerance(case, output)
    got = got.detach().cpu()
    assert got.shape == expected.shape, f"{case['name']} {output}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{case['name']} {output}: dtype {got.dtype} != {expected.dtype}"
    if atol == 0 and rtol == 0:
        assert torch.equal(got, expected), f"{case['name']} {output}: not bit-exact"
        return
    diff = (got.double() - expected.double()).abs()
    excess = diff - (atol + rtol * expected.double().abs())
    assert excess.max() <= 0, f"{case['name']} {output}: max |diff| {diff.max():.3g} exceeds atol {atol} rtol {rtol}"


# --------------------------------------------------------------------------- a1: decoder

def decoder_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    kw = case["constructor_kwargs"]
    assert kw["output_stride"] == 16
    dec = DeepLabV3PlusDecoder(kw["encoder_channels"], kw["out_channels"], kw["atrous_rates"])
    dec.load_state_dict(_prefixed(t, "state_dict."), strict=True)
    dec.train(False)
    steps: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        y = dec(*[t[f"input.features.{i}"] for i in range(6)], intermediates=steps)
    got = {"output.y": y, **{f"output.intermediate.{k}": v for k, v in steps.items()}}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


# --------------------------------------------------------------------------- a2: input_unet

@functools.lru_cache(maxsize=None)
def _model_with_input_unet(path: Path, prefix: str):
    """A GeNVS network built by the users' loader (config inferred from shapes) from a file that holds a
    full expected state dict; ``prefix`` names the input_unet part of it."""
    assert prefix.endswith("input_unet.")
    return genvs_from_state_dict(_prefixed(_tensors(path), prefix[:-len("input_unet.")]), source=path.name)


def input_unet_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    model = _model_with_input_unet(method_dir / case["weights"]["file"], case["weights"]["prefix"])
    assert model.config.decoder.channels == case["constructor_kwargs"]["decoder_channels"]
    assert list(model.config.decoder.atrous_rates) == case["constructor_kwargs"]["decoder_atrous_rates"]
    images = t["input.images"]
    B, V = images.shape[:2]
    targets01 = 0.5 * (images + 1)
    with torch.no_grad():
        unet_input = preprocess(targets01.reshape(B * V, *images.shape[2:]))
        features = model.input_unet.encoder(unet_input)
        volume = model.encode(targets01)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    got = {"output.targets01": targets01, "output.img_tp": ((targets01 - mean) / std).reshape(B * V, *images.shape[2:]),
           "output.unet_input": unet_input, "output.volume": volume}
    got.update({f"output.encoder_features.{i}": f for i, f in enumerate(features)})
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


# --------------------------------------------------------------------------- b: lifting + NeRF + renderer

def nerf_render_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    kw = case["constructor_kwargs"]
    field = NeRFField(kw["resolution_z"], kw["sigma_color_rank"], kw["color_feat_dim"], kw["hidden_dim"],
                      kw["num_layers"], kw["bound"], kw["min_near"])
    field.load_state_dict(_prefixed(t, "state_dict."), strict=True)
    field.train(False)
    src = SourceViews(t["input.volume"], t["input.src_poses"], t["input.camera_k"])
    tgt, intrinsics = t["input.tgt_poses"], t["input.intrinsics"]
    B, Q, N = t["input.draw.jitter_rand"].shape[:3]
    H = W = int(round(N ** 0.5))

    seed = _seed(case, method_dir, "renderer_draws")
    if seed is not None:  # the seed alone reproduces the recorded draws (same order as the original renderer)
        seeded = RenderDraws.draw(B, Q, N, random_importance=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(seeded.jitter, t["input.draw.jitter_rand"])
        assert torch.equal(seeded.pdf_u, t["input.draw_train.pdf_u_rand"])

    got = {}
    with torch.no_grad():
        draws = RenderDraws(t["input.draw.jitter_rand"])
        # a small memory budget forces many chunks: chunking must not change anything
        f, d, o = render_views(field, tgt, intrinsics, src, H, W, draws, memory_mb=4)
        got.update({"output.features": f, "output.depth": d, "output.opacity": o,
                    "output.cond_upsampled": upsample_condition(f)})
        train = RenderDraws(t["input.draw.jitter_rand"], t["input.draw_train.pdf_u_rand"])
        f, d, o = render_views(field, tgt, intrinsics, src, H, W, train)
        got.update({"output.train.features": f, "output.train.depth": d, "output.train.opacity": o})
        got["output.probe_cam_coords"] = field.cam_coords(t["input.probe_points"], src)
        rays_o, rays_d = get_rays(tgt.reshape(B * Q, 4, 4), intrinsics, H, W)
        near, far = near_far_from_bound(rays_o, rays_d, kw["bound"], kw["min_near"])
        got.update({"output.rays_o": rays_o.reshape(B, Q, N, 3), "output.rays_d": rays_d.reshape(B, Q, N, 3),
                    "output.near": near.reshape(B, Q, N), "output.far": far.reshape(B, Q, N)})
        idx = t["output.diag.pixel_index"]
        n = len(idx)
        pick = lambda x: x[:, :, idx].reshape(B, Q * n, *x.shape[3:])  # noqa: E731
        details: Dict[str, torch.Tensor] = {}
        render_rays(field, pick(got["output.rays_o"]), pick(got["output.rays_d"]), src,
                    pick(t["input.draw.jitter_rand"]), None, details=details)
        for key, value in details.items():
            got[f"output.diag.{key}"] = value.reshape(B, Q, n, *value.shape[2:])
    for output in case["outputs"]:
        if output == "output.diag.pixel_index":
            continue
        _assert_close(case, output, got[output], t[output])
    # Rays that miss the cube render the white background: features 1, depth 0, opacity 0.
    miss = (t["output.near"] >= 1e9).reshape(B, Q, H, W)
    assert torch.all(got["output.opacity"][:, :, 0][miss] == 0)
    assert torch.all(got["output.features"].permute(0, 1, 3, 4, 2)[miss] == 1)


# --------------------------------------------------------------------------- c, c2: image_v1 denoiser

@functools.lru_cache(maxsize=None)
def _denoiser(path: Path, section_json: str):
    section = json.loads(section_json)
    cfg = DenoiserConfig(input_channels=section["input_channels"], input_size=section["input_size"],
                         mapping_out=section["mapping_out"], depths=section["depths"], channels=section["channels"],
                         self_attn_depths=section["self_attn_depths"], dropout_rate=section["dropout_rate"],
                         has_variance=section["has_variance"], sigma_data=section["sigma_data"],
                         sigma_min=section["sigma_min"], sigma_max=section["sigma_max"])
    den = build_denoiser(cfg)
    den.inner_model.inner_model.load_state_dict(_prefixed(_tensors(path), "state_dict."), strict=True)
    return den.train(False)


def denoiser_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    assert case["weights"]["prefix"] == "state_dict."
    den = _denoiser(method_dir / case["weights"]["file"],
                    json.dumps(case["constructor_kwargs"]["kpipeline_config_model_section"]))
    x, sigma, cond = t["input.x"], t["input.sigma"], t["input.unet_cond"]
    net = den.inner_model.inner_model
    c_skip, c_out, c_in = den.get_scalings(sigma)
    details: Dict[str, torch.Tensor] = {}
    aug_details: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        denoised = den(x, sigma, unet_cond=cond)
        F_out, logvar = den.inner_model(x * c_in[:, None, None, None], sigma, unet_cond=cond, return_variance=True,
                                        details=details)
        denoised_aug = den(x, sigma, unet_cond=cond, aug_cond=t["input.aug_cond"])
        net.mapping_output(sigma, t["input.aug_cond"], aug_details)
    got = {"output.denoised": denoised, "output.F": F_out, "output.logvar": logvar, "output.c_skip": c_skip,
           "output.c_out": c_out, "output.c_in": c_in, "output.timestep_embed": details["timestep_embed"],
           "output.mapping_out": details["mapping_out"], "output.denoised_aug_cond": denoised_aug,
           "output.mapping_out_aug_cond": aug_details["mapping_out"]}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


# --------------------------------------------------------------------------- d: Karras sigmas + Euler churn

def sampler_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    section = case["constructor_kwargs"]["kpipeline_config_model_section"]
    den = _denoiser(method_dir / case["weights"]["file"], json.dumps(section))
    cond = t["input.unet_cond"]
    n = t["output.sigma_hat"].shape[0]
    smin, smax = section["sigma_min"], section["sigma_max"]
    got = {"output.sigmas": genvs_sampler.karras_sigmas(n, smin, smax)}
    seed = _seed(case, method_dir, "torch_manual_seed")
    for stochastic, prefix in ((True, "output."), (False, "output.det.")):
        record = []
        sources = [genvs_sampler.ReplayNoise(t["input.x_noise"], t["input.step_noise"])]
        if seed is not None:  # the seed alone reproduces the draws
            sources.append(genvs_sampler.BatchNoise(seed))
        for noise in sources:
            calls = []
            with torch.no_grad():
                x_final = genvs_sampler.sample(den, cond, steps=n, stochastic=stochastic, sigma_min=smin, sigma_max=smax,
                                               noise=noise, callback=calls.append, progress=silent_progress,
                                               return_unclipped=True)
            record.append((x_final, calls))
        x_final, calls = record[0]
        assert all(torch.equal(x_final, other) for other, _ in record[1:]), "seeded draws differ from the recorded ones"
        got[prefix + "x_final"] = x_final
        got[prefix + "sample"] = x_final.clip(-1, 1)
        got[prefix + "sigma_hat"] = torch.stack([c["sigma_hat"] for c in calls])
        got[prefix + "denoised"] = torch.stack([c["denoised"] for c in calls])
        got[prefix + ("x_hat" if stochastic else "x_in")] = torch.stack([c["x_hat"] for c in calls])
        if stochastic:
            got["output.x_before_churn"] = torch.stack([c["x_before_churn"] for c in calls])
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


# --------------------------------------------------------------------------- e: genvs.pt loading

def _pipeline_outputs(model, t: Dict[str, torch.Tensor], sigmas: dict) -> Dict[str, torch.Tensor]:
    images = t["input.images"]
    targets01 = 0.5 * (images + 1)
    with torch.no_grad():
        unet_input = preprocess(targets01.reshape(-1, *images.shape[2:]))
        volume = model.encode(targets01)
        src = SourceViews(volume, t["input.src_pose"], t["input.camera_k"])
        size = int(round(t["input.render.jitter_rand"].shape[2] ** 0.5))
        features, depth, opacity = model.render(src, t["input.tgt_pose"], t["input.intrinsics"], size=size,
                                                draws=RenderDraws(t["input.render.jitter_rand"]))
        cond = model.condition(features)
        denoised = model.ddpm_pipeline(t["input.x_sigma"], t["input.sigma"], unet_cond=cond)
        calls = []
        steps = t["input.sample.step_noise"].shape[0]
        sample = genvs_sampler.sample(model.ddpm_pipeline, cond, steps=steps, stochastic=True,
                                      sigma_min=sigmas.get("sigma_min", model.config.denoiser.sigma_min),
                                      sigma_max=sigmas.get("sigma_max", model.config.denoiser.sigma_max),
                                      noise=genvs_sampler.ReplayNoise(t["input.sample.x_noise"],
                                                                      t["input.sample.step_noise"]),
                                      callback=calls.append, progress=silent_progress)
    return {"output.pipeline.unet_input": unet_input, "output.pipeline.volume": volume,
            "output.pipeline.features": features, "output.pipeline.depth": depth, "output.pipeline.opacity": opacity,
            "output.pipeline.cond": cond, "output.pipeline.denoised_at_sigma": denoised,
            "output.pipeline.denoised_steps": torch.stack([c["denoised"] for c in calls]),
            "output.pipeline.sample": sample}


def checkpoint_case(case: dict, method_dir: Path) -> None:
    structure = json.loads(_side_file(case, method_dir, ".json").read_text())
    t = _tensors(_side_file(case, method_dir, ".safetensors"))
    expected = _prefixed(t, "expected.state_dict.")
    ckpt = load_genvs_checkpoint(method_dir / case["file"])
    assert list(ckpt.state_dict) == structure["canonical_key_order"]
    assert len(ckpt.state_dict) == structure["canonical_num_entries"] == len(expected)
    for key, tensor in ckpt.state_dict.items():
        _assert_close(case, "expected.state_dict." + key, tensor, expected[key])
    assert ckpt.extras["step"] == structure["step"] and ckpt.extras["epoch"] == structure["epoch"]
    tiny = case["constructor_kwargs"]
    assert ckpt.config.resolution_z == tiny["nerf"]["resolution_z"]
    assert ckpt.config.nerf.hidden_dim == tiny["nerf"]["hidden_dim"]

    model = load_genvs(method_dir / case["file"])
    sigmas = tiny.get("ddpm_pipeline", {})  # the sigma limits are not in the file: the k-diffusion config's
    got = _pipeline_outputs(model, t, sigmas)
    for output in case["outputs"]:
        if output != "expected.state_dict.*":
            _assert_close(case, output, got[output], t[output])

    # The converter writes safetensors + JSON that load back to the same network.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "genvs_tiny.safetensors"
        convert(method_dir / case["file"], "genvs", out)
        assert out.with_suffix(".json").is_file()
        back = load_genvs_checkpoint(out)
        assert back.config.to_dict() == ckpt.config.to_dict()
        assert set(back.state_dict) == set(ckpt.state_dict)  # safetensors sorts its keys
        assert all(torch.equal(back.state_dict[k], v) for k, v in ckpt.state_dict.items())
        again = _pipeline_outputs(load_genvs(out), t, sigmas)
        assert all(torch.equal(again[k], got[k]) for k in got)


# --------------------------------------------------------------------------- f: SRN cameras

def _fake_srn(root: Path, view_order, c2w, K) -> None:
    from PIL import Image

    for sub in ("rgb", "pose", "intrinsics"):
        (root / sub).mkdir(parents=True)
    poses = {}
    for name, pose in zip(view_order, c2w):
        stem = Path(name).stem
        assert stem not in poses or torch.equal(poses[stem], pose)
        poses[stem] = pose
    for k, (stem, pose) in enumerate(sorted(poses.items())):
        Image.new("RGB", (8, 8), (255, 255, 255)).save(root / "rgb" / f"{stem}.png")
        (root / "pose" / f"{stem}.txt").write_text(" ".join(repr(float(v)) for v in pose.reshape(-1)))
        other = K if stem == Path(view_order[0]).stem else K * (1.1 + 0.1 * k)  # only the first view's K counts
        (root / "intrinsics" / f"{stem}.txt").write_text(" ".join(repr(float(v)) for v in other.reshape(-1)))


def srn_cameras_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    with tempfile.TemporaryDirectory() as tmp:
        _fake_srn(Path(tmp), case["view_order"], t["input.c2w_opencv"], t["input.K"])
        mv = load_srn(tmp, views=case["view_order"])
        per_view = load_srn(tmp, views=case["view_order"], intrinsics="per_view")
    assert not torch.equal(per_view.cameras.intrinsics, mv.cameras.intrinsics)
    g = genvs_cameras.to_genvs(mv.cameras, render_size=64)
    gn = genvs_cameras.to_genvs(mv.cameras, render_size=64, normalize=True)
    raw = genvs_cameras.srn_genvs_cameras(t["input.c2w_opencv"], t["input.K"])
    got = {"output.poses_opengl": g.poses, "output.poses_normalized": gn.poses, "output.intrinsics": g.intrinsics,
           "output.camera_k": g.camera_k.reshape(()), "output.camera_d": g.camera_d}
    for name, poses in (("", g.poses), ("normalized.", gn.poses)):
        rays_o, rays_d = get_rays(poses, g.intrinsics, 64, 64)
        got[f"output.{name}rays_o"], got[f"output.{name}rays_d"] = rays_o, rays_d
        if not name:
            near, far = near_far_from_bound(rays_o, rays_d, 1.0, 0.5)
            got["output.near"], got["output.far"] = near[..., 0], far[..., 0]
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])
    # The same values straight from the raw arrays, as the published dataset computes them.
    _assert_close(case, "output.poses_opengl", raw["poses"], t["output.poses_opengl"])
    _assert_close(case, "output.intrinsics", raw["intrinsics"], t["output.intrinsics"])
    _assert_close(case, "output.camera_k", raw["camera_k"], t["output.camera_k"])
    # and back: GeNVS -> NVS_CAMERA recovers the cameras
    back = genvs_cameras.from_genvs(g.poses, g.intrinsics, 64)
    assert torch.allclose(back.c2w, mv.cameras.c2w, atol=1e-6)
    assert torch.allclose(back.intrinsics, mv.cameras.intrinsics, atol=1e-7)


# --------------------------------------------------------------------------- g: autoregressive schedule

def ar_schedule_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    src = t["input.source_poses"]
    n_src = src.shape[1]
    circle = genvs_cameras.circle_path(src[0, 0], n_poses=t["output.circle_poses"].shape[0])
    schedule = genvs_orbit.ar_schedule(len(circle) - 1)
    index = torch.full((len(schedule), t["output.ar_conditioning_index"].shape[1]), -1, dtype=torch.int64)
    for q, entries in enumerate(schedule):
        index[q, :len(entries)] = torch.tensor(entries)
    got = {"output.circle_poses": circle, "output.ar_conditioning_index": index,
           "output.ar_num_source_views_seen": torch.tensor(genvs_orbit.views_seen(schedule, n_src)),
           "output.spherical_path": genvs_cameras.spherical_path(t["input.camera_d"][0],
                                                                   n_poses=t["output.spherical_path"].shape[0])}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


def module_forward(case: dict, method_dir: Path) -> None:
    module = case.get("module", "")
    for prefix, handler in (("dlv3.decoder", decoder_case), ("dlv3.model", input_unet_case),
                            ("nerf.", nerf_render_case), ("k_pipeline", denoiser_case)):
        if module.startswith(prefix):
            return handler(case, method_dir)
    raise AssertionError(f"{case['name']}: no GeNVS handler for module {module!r}")


def function_case(case: dict, method_dir: Path) -> None:
    function = case.get("function", "")
    for prefix, handler in (("NERFdataset_k", srn_cameras_case), ("sample_ar", ar_schedule_case)):
        if function.startswith(prefix):
            return handler(case, method_dir)
    raise AssertionError(f"{case['name']}: no GeNVS handler for function {function!r}")


HANDLERS = {
    "module_forward": module_forward,
    "function": function_case,
    "sampler": sampler_case,
    "checkpoint_load": checkpoint_case,
}
