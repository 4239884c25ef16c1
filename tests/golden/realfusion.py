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
    corner_weight = torch.where(inside[:, None, None], torch.stack(corner_weights, 1), 0.0)

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


# ---------------------------------------------------------------------------- d: cameras

class _Replay:
    """A RandomSource that returns the fixture's supplied draws in call order."""

    def __init__(self, rands=(), randoms=(), randints=()):
        self.rands, self.randoms, self.randints = list(rands), list(randoms), list(randints)

    def rand(self, *size):
        draw = self.rands.pop(0)
        assert tuple(draw.shape) == tuple(size[0] if len(size) == 1 and isinstance(size[0], (tuple, list))
                                          else size), f"rand{size} draw shape {tuple(draw.shape)}"
        return draw

    def random(self):
        return self.randoms.pop(0)

    def randint(self, high, size):
        return self.randints.pop(0)

    def exhausted(self):
        return not (self.rands or self.randoms or self.randints)


def cameras_case(case: dict, method_dir: Path) -> None:
    import numpy as np

    from nvs_core.realfusion import cameras as rc

    t = _tensors(method_dir / case["file"])
    cfg = case["config"]
    got = {}
    for branch in ("sphere", "thetaphi"):
        p = f"input.rand_poses_{branch}."
        replay = _Replay([t[p + "radius_u"]] + [t[p + k] for k in ("u0", "u1", "u2") if p + k in t],
                         [float(t[p + "branch_u"])])
        poses, dirs = rc.rand_poses(cfg["rand_size"], replay, cfg["radius_range"], angle_overhead=cfg["angle_overhead"],
                                    angle_front=cfg["angle_front"], uniform_sphere_rate=cfg["uniform_sphere_rate"],
                                    jitter=cfg["jitter_pose"])
        assert replay.exhausted(), f"{branch}: not every supplied draw was used"
        got[f"output.rand_poses_{branch}.poses"], got[f"output.rand_poses_{branch}.dirs"] = poses, dirs
        assert torch.allclose(torch.linalg.det(poses[:, :3, :3]), torch.tensor(-1.0), atol=1e-5), "mirror-handed"
    got["output.dirgrid.label"] = rc.view_direction(t["input.dirgrid.theta"], t["input.dirgrid.phi"],
                                                    np.deg2rad(cfg["angle_overhead"]), np.deg2rad(cfg["angle_front"]))
    iv_cfg = cfg["input_view"]
    view = rc.InputView(iv_cfg["HW"], iv_cfg["radius"], iv_cfg["theta"], iv_cfg["phi"], iv_cfg["fovy"])
    got["output.input_view.pose"], got["output.input_view.dir"] = view.pose(), view.direction()
    got["output.input_view.intrinsics"] = torch.tensor(view.intrinsics())
    full = view.rays()
    got["output.input_view.rays_o"], got["output.input_view.rays_d"] = full["rays_o"], full["rays_d"]
    sampled = view.rays(16, _Replay(randints=[t["input.input_view.sample_inds"]]))
    got["output.input_view.sampled_rays_o"], got["output.input_view.sampled_rays_d"] = sampled["rays_o"], sampled["rays_d"]
    got["output.input_view.sampled_inds"] = sampled["inds"]
    orbit = [rc.circle_poses(cfg["radius_rot"], cfg["pose_angle"], i / cfg["orbit_size"] * 360,
                             cfg["angle_overhead"], cfg["angle_front"]) for i in t["input.orbit_index"].tolist()]
    got["output.orbit.poses"] = torch.cat([p for p, _ in orbit])
    got["output.orbit.dirs"] = torch.cat([d for _, d in orbit])
    p = "input.synth_collate."
    replay = _Replay([t[p + "radius_u"], t[p + "u0"], t[p + "u1"]], [float(t[p + "branch_u"]), float(t[p + "fov_u"])])
    view_s = rc.sample_training_view(replay, cfg["synth_HW"], cfg["synth_HW"], cfg["radius_range"], cfg["fovy_range"],
                                     cfg["angle_overhead"], cfg["angle_front"], cfg["uniform_sphere_rate"])
    assert replay.exhausted()
    got["output.synth_collate.rays_o"], got["output.synth_collate.rays_d"] = view_s["rays_o"], view_s["rays_d"]
    got["output.synth_collate.dir"] = view_s["dir"]
    image = rc.prepare_rgba(t["input.real.rgba_uint8"], cfg["real_HW"])
    got["output.real.image_resized"] = image
    real_view = rc.InputView(cfg["real_HW"], iv_cfg["radius"], iv_cfg["theta"], iv_cfg["phi"], iv_cfg["fovy"])
    real = real_view.rays(cfg["num_rays"], _Replay(randints=[t["input.real.sample_inds"]]))
    got["output.real.rays_o"], got["output.real.rays_d"] = real["rays_o"], real["rays_d"]
    got["output.real.images"] = rc.gather_pixels(image, real["inds"])
    real_full = real_view.rays()
    got["output.real_full.rays_o"], got["output.real_full.rays_d"] = real_full["rays_o"], real_full["rays_d"]
    got["output.real_full.images"] = image
    _check_all(case, got, t)
    # The NVS_CAMERA of the input view gives the same rays in the x-mirrored world, with a proper rotation.
    cam = view.camera()
    assert torch.allclose(torch.linalg.det(cam.c2w[:, :3, :3]), torch.ones(1, dtype=torch.float64))
    o, d = cam.rays()
    o, d = rc.nvs_rays_to_realfusion(o.reshape(1, -1, 3), d.reshape(1, -1, 3))
    assert_close(case, "output.input_view.rays_d", d, t["output.input_view.rays_d"], (1e-6, 0))
    assert_close(case, "output.input_view.rays_o", o, t["output.input_view.rays_o"], (1e-6, 0))


# -------------------------------------------------------------- e: ray marching, compositing

def _analytic_field(config: dict):
    """A RealFusionField whose density / albedo / background are the fixture's analytic functions."""
    from nvs_core.realfusion.field import RealFusionField

    class AnalyticField(RealFusionField):
        centre = torch.tensor(config["fieldA"]["center"])

        def use(self, name):
            spec = config[name]
            self.centre = torch.tensor(spec["center"], dtype=torch.float32)
            self.amp, self.radius = spec["amp"], spec["radius"]

        def common_forward(self, x):
            r2 = ((x - self.centre) ** 2).sum(-1)
            sigma = self.amp * torch.clamp(1 - r2 / self.radius ** 2, min=0) ** 2
            albedo = torch.clamp(0.5 + config["albedo_gain"] * (x - self.centre), 0, 1)
            return sigma, albedo

        @property
        def has_background(self):
            return True

        def background(self, d):
            return 0.5 + 0.5 * d

    field = AnalyticField(bound=config["bound"], grid_levels=1, grid_resolution=16, base_resolution=4,
                          log2_hashmap_size=4, hidden_dim=4, bg_radius=0, grid_size=config["grid_size"],
                          density_thresh=config["density_thresh"])
    return field


def _sparse_grid(field):
    grid = field.density_grid[0]
    index = torch.nonzero(grid).squeeze(1)
    return index, grid[index]


def raymarch_case(case: dict, method_dir: Path) -> None:
    from nvs_core.realfusion.field import morton3d, morton3d_invert, safe_normalize
    from nvs_core.realfusion.renderer import default_light, render_rays

    t = _tensors(method_dir / case["file"])
    cfg = case["config"]
    assert cfg["cascade"] == 1 and cfg["dt_gamma"] == 0 and cfg["align"] == 128
    field = _analytic_field(cfg)
    got = {}
    # Occupancy grid: two updates (field A, then field B), cell jitter fixed at 0.
    field.use("fieldA")
    field.update_occupancy(jitter=False)
    got["output.grid_update1.density_grid.nonzero_index"], got["output.grid_update1.density_grid.nonzero_value"] = \
        _sparse_grid(field)
    got["output.grid_update1.mean_density"] = torch.tensor(field.mean_density, dtype=torch.float64)
    got["output.grid_update1.bitfield_popcount"] = torch.tensor(field.occupied_cells())
    field.use("fieldB")
    field.update_occupancy(jitter=False)
    got["output.grid_update2.density_grid.nonzero_index"], got["output.grid_update2.density_grid.nonzero_value"] = \
        _sparse_grid(field)
    got["output.grid_update2.mean_density"] = torch.tensor(field.mean_density, dtype=torch.float64)
    got["output.grid_update2.thresh"] = torch.tensor(field.occupancy_threshold, dtype=torch.float64)
    got["output.grid_update2.density_bitfield"] = field.density_bitfield.clone()

    rays_o, rays_d = t["input.rays_o"], t["input.rays_d"]
    common = dict(max_steps=cfg["max_steps"], T_thresh=cfg["T_thresh"], min_near=cfg["min_near"])
    # Training render (synthetic-view settings).
    field.train(True)
    light = default_light(rays_o, t["input.train.light_draw"])
    got["output.train.light_d"] = light
    res = render_rays(field, rays_o, rays_d, mode="train", shading="lambertian", ambient_ratio=cfg["ratio_train"],
                      light_d=light, perturb=True, force_all_rays=True, march_noise=t["input.train.march_noise"],
                      smooth_noise=t["input.train.smooth_noise"], return_samples=True, **common)
    for key in ("nears", "fars", "xyzs", "dirs", "deltas", "rays", "sigmas", "rgbs", "sample_normals", "image",
                "depth", "weights_sum", "normals", "loss_orient", "loss_smooth", "mask", "bg"):
        got[f"output.train.{key}"] = res[key]
    got["output.train.composite.image"] = res["composite_image"]
    got["output.train.composite.depth"] = res["composite_depth"]
    got["output.train.composite.weights_sum"] = res["weights_sum"].reshape(-1)
    got["output.train.normals"] = res["normals"].reshape(-1, 3)
    got["output.train.step_counter_row0"] = field.step_counter[0].clone()
    # Backward of the compositing for the supplied upstream gradients.
    from nvs_core.realfusion.raymarch import composite_rays_train
    sig = res["sigmas"].detach().clone().requires_grad_(True)
    rgb = res["rgbs"].detach().clone().requires_grad_(True)
    ws, _, (img,) = composite_rays_train(sig, [rgb], res["deltas"], res["rays"], cfg["T_thresh"])
    torch.autograd.backward([ws, img], [t["input.train.grad_weights_sum"], t["input.train.grad_image"]])
    got["output.train.grad_sigmas"], got["output.train.grad_rgbs"] = sig.grad, rgb.grad

    # Evaluation renders: white background, light from the first ray's origin.
    field.train(False)
    light = safe_normalize(rays_o[0][0])
    got["output.eval.light_d"] = light
    for shading, ratio in (("albedo", 1.0), ("textureless", 0.1)):
        res = render_rays(field, rays_o, rays_d, mode="eval", shading=shading, ambient_ratio=ratio, light_d=light,
                          bg_color=torch.ones(3), perturb=False, return_samples=True, ray_batch=1 << 20, **common)
        for key in ("image", "depth", "weights_sum", "mask"):
            got[f"output.eval_{shading}.{key}"] = res[key]
        got[f"output.eval_{shading}.normals"] = res["normals"].reshape(-1, 3)
        got[f"output.eval_{shading}.compaction_trace"] = torch.tensor(res["trace"], dtype=torch.int64)
        if shading == "albedo":
            xyzs, deltas = res["trace_first_march"]
            got["output.eval_albedo.first_march.xyzs"], got["output.eval_albedo.first_march.deltas"] = xyzs, deltas

    # Capped render (real-image settings): the sample list is cut at mean_count rounded up to 128.
    field.train(True)
    field.mean_count = int(t["input.capped.mean_count"])
    res = render_rays(field, rays_o, rays_d, mode="train", shading="albedo", light_d=light, bg_color=1,
                      perturb=True, force_all_rays=False, march_noise=t["input.capped.march_noise"],
                      smooth_loss=False, return_samples=True, **common)
    got["output.capped.M"] = torch.tensor(res["xyzs"].shape[0])
    got["output.capped.rays"] = res["rays"]
    got["output.capped.image"], got["output.capped.depth"] = res["image"], res["depth"]
    got["output.capped.weights_sum"] = res["weights_sum"]

    # Update 3: mean step count of the two training renders.
    got["output.update3.step_counter_before"] = field.step_counter.clone()
    got["output.update3.local_step_before"] = torch.tensor(field.local_step)
    field.update_occupancy(jitter=False)
    got["output.update3.mean_count"] = torch.tensor(field.mean_count)
    got["output.update3.mean_density"] = torch.tensor(field.mean_density, dtype=torch.float64)

    coords = t["input.morton.coords"]
    got["output.morton.index"] = morton3d(coords).to(torch.int32)
    got["output.morton.inverse"] = morton3d_invert(got["output.morton.index"]).to(torch.int32)
    _check_all(case, got, t)


# ------------------------------------------------------------------------------ f: losses

def losses_case(case: dict, method_dir: Path) -> None:
    import torch.nn.functional as F

    from nvs_core.realfusion import losses as L
    from nvs_core.realfusion.cameras import jitter_rays, real_camera_noise_scale

    t = _tensors(method_dir / case["file"])
    cfg = case["config"]
    sched = cfg["scheduler"]
    assert sched["beta_schedule"] == "scaled_linear"
    alphas = L.scaled_linear_alphas_cumprod(sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"])
    got = {"const.sds.alphas_cumprod": alphas}
    W, b = t["input.sds.stub_vae_W"], t["input.sds.stub_vae_b"]
    assert L.SDS_T_RANGE == (20, 980)
    for tag in ("t20", "t500", "t980", "tnan"):
        p = f"input.sds.{tag}."
        step = t[p + "t"].reshape(1)
        assert L.SDS_T_RANGE[0] <= int(step) <= L.SDS_T_RANGE[1]
        if p + "pred_rgb" in t:
            pred = t[p + "pred_rgb"].clone().requires_grad_(True)
            x512 = F.interpolate(pred, (512, 512), mode="bilinear", align_corners=False)
            pooled = F.avg_pool2d(2 * x512 - 1, 8)
            sample = torch.einsum("oc,bchw->bohw", W, pooled) + b[None, :, None, None]
            latents = sample * L.SD_LATENT_SCALE
            noisy = L.add_noise(latents.detach(), t[p + "noise"], alphas, step)
            got[f"output.sds.{tag}.latents"], got[f"output.sds.{tag}.latents_noisy"] = latents.detach(), noisy
        grad = L.sds_latent_gradient(t[p + "eps_uncond"], t[p + "eps_cond"], t[p + "noise"], alphas, step,
                                     cfg["guidance_scale"], cfg["lambda_grad"])
        got[f"output.sds.{tag}.grad"] = grad
        got[f"output.sds.{tag}.w"] = (1 - alphas[step]).reshape(())
        got[f"output.sds.{tag}.pseudo_loss"] = grad.abs().mean()
        if p + "pred_rgb" in t:
            latents.backward(gradient=grad)
            got[f"output.sds.{tag}.pred_rgb_grad"] = pred.grad

    # Synthetic-view regularisers at the default weights (and opacity / 3-D smoothness at weight 1).
    H = W_ = cfg["HW_syn"]
    B = 1
    ws, normals = t["input.syn.weights_sum"], t["input.syn.normals"]
    defaults = L.synthetic_view_losses(ws, normals, t["input.syn.loss_orient"], t["input.syn.loss_smooth"], B, H, W_)
    assert set(defaults) == {"entropy", "orient", "smooth_2d"}
    ones = L.LossWeights(opacity=1.0, smooth=1.0)
    extra = L.synthetic_view_losses(ws, normals, t["input.syn.loss_orient"], t["input.syn.loss_smooth"], B, H, W_, ones)
    got["output.syn.loss_entropy_weighted"] = defaults["entropy"]
    got["output.syn.loss_orient_weighted"] = defaults["orient"]
    got["output.syn.loss_smooth_2d_weighted"] = defaults["smooth_2d"]
    got["output.syn.loss_opacity_weighted"] = extra["opacity"]
    got["output.syn.loss_smooth_weighted"] = extra["smooth"]
    got["output.syn.loss_total_defaults"] = defaults["entropy"] + defaults["orient"] + defaults["smooth_2d"]
    n_img = normals.reshape(B, H, W_, 3).permute(0, 3, 1, 2).contiguous()
    got["output.syn.normals_blur"] = L.gaussian_blur(n_img, 9)
    got["output.syn.guidance_pred"] = t["input.syn.image"].reshape(B, H, W_, 3).permute(0, 3, 1, 2).contiguous()
    step = int(t["input.syn.global_step"])
    assert L.replaces_camera(step)
    got["output.syn.render_rays_o"], got["output.syn.render_rays_d"] = jitter_rays(
        t["input.syn.rays_o"], t["input.syn.rays_d"], 0.02, noise_o=t["input.syn.camera_noise_o"],
        noise_d=t["input.syn.camera_noise_d"])
    got["output.syn.render_bg_color"] = t["input.syn.bg_color"]

    # Input-view losses with the annealed camera noise.
    step = int(t["input.real.global_step"])
    scale = real_camera_noise_scale(step, cfg["iters"])
    got["output.real.render_rays_o"], got["output.real.render_rays_d"] = jitter_rays(
        t["input.real.rays_o"], t["input.real.rays_d"], scale, noise_o=t["input.real.noise_o"],
        noise_d=t["input.real.noise_d"])
    real = L.input_view_losses(t["input.real.pred_rgb"], t["input.real.pred_weights_sum"], t["input.real.images"])
    got["output.real.loss_real_image"], got["output.real.loss_real_mask"] = real["real_image"], real["real_mask"]
    got["output.real.loss"] = real["real_image"] + real["real_mask"]

    # EMA (torch_ema, use_num_updates).
    params = [t["input.ema.p0.0"].clone(), t["input.ema.p0.1"].clone()]
    ema = L.EMA(params, decay=0.95)
    for i in range(1, 7):
        if f"input.ema.p{i}.0" not in t:
            break
        params[0].copy_(t[f"input.ema.p{i}.0"])
        params[1].copy_(t[f"input.ema.p{i}.1"])
        ema.update()
        got[f"output.ema.shadow{i}.0"], got[f"output.ema.shadow{i}.1"] = ema.shadow[0].clone(), ema.shadow[1].clone()
    _check_all(case, got, t)
    assert_close(case, "const.sds.alphas_cumprod", alphas, t["const.sds.alphas_cumprod"])

    for row in case["tables"]["annealed_value"]:
        value = L.annealed_value(row["value"], row["global_step"], row["iters"])
        assert math.isclose(value, row["result"], rel_tol=1e-9, abs_tol=1e-12), (row, value)
    for row in case["tables"]["synthetic_step_schedule"]:
        shading, ratio = L.shading_for_step(row["global_step"], row["random_u"])
        assert (shading, ratio) == (row["shading"], row["ambient_ratio"]), row
        assert L.replaces_camera(row["global_step"]) == row["replaced_camera"], row


# ------------------------------------------------------------------------------ g: df.pth

def checkpoint_case(case: dict, method_dir: Path) -> None:
    from nvs_core.realfusion.loading import field_from_checkpoint, load_field, read_field_checkpoint

    path = method_dir / case["file"]
    t = _tensors(method_dir / case["expected_file"])
    structure = json.loads((method_dir / case["structure_file"]).read_text())
    ckpt = read_field_checkpoint(path)
    kw = case["constructor_kwargs"]
    for key in ("bound", "grid_levels", "grid_resolution", "blob_density", "blob_radius"):
        assert getattr(ckpt.config, key) == kw[key], (key, getattr(ckpt.config, key), kw[key])
    assert list(ckpt.state_dict) == structure["model_keys_in_order"]
    got = {f"expected.model.{k}": v for k, v in ckpt.state_dict.items()}
    got["expected.mean_density"] = torch.tensor(ckpt.mean_density, dtype=torch.float64)
    got["expected.mean_count"] = torch.tensor(ckpt.mean_count)
    field = load_field(path)
    assert field.grid_levels_mask == 0, "a loaded field uses every grid level"
    assert not field.training
    got["expected.bitfield_popcount"] = torch.tensor(field.occupied_cells())
    with torch.no_grad():
        sigma, albedo = field.common_forward(t["input.x"])
        got["expected.forward.mask0.sigma"], got["expected.forward.mask0.albedo"] = sigma, albedo
        got["expected.forward.bg_rgb"] = field.background(t["input.d"])
        masked = field_from_checkpoint(ckpt, path)
        masked.grid_levels_mask = kw["grid_levels_mask"]
        sigma, albedo = masked.common_forward(t["input.x"])
        got[f"expected.forward.mask{kw['grid_levels_mask']}.sigma"] = sigma
        got[f"expected.forward.mask{kw['grid_levels_mask']}.albedo"] = albedo
    _check_all(case, got, t)
    # The stored weights are the live ones, not the EMA shadow.
    for key, ema in _state_dict(t, "reference.ema_weights.").items():
        assert not torch.equal(field.state_dict()[key], ema), f"{key} equals the EMA weights"


HANDLERS = {
    "checkpoint_load": checkpoint_case,
    "loss": losses_case,
    "renderer_transcribed": raymarch_case,
    "function": cameras_case,
    "function_transcribed": grid_case,
    "name:b_field_mlp_freq": field_case,
    "name:c_normals_shading": shading_case,
}
