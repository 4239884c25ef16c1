"""RealFusion renderer on tiny / analytic fields: training and evaluation paths, gradients, occupancy
skipping (samples per ray with and without the grid), background, NVS_CAMERA renders, cameras."""
import math

import pytest
import torch

from nvs_core.cameras import Cameras
from nvs_core.realfusion import cameras as rc
from nvs_core.realfusion.field import FieldConfig, RealFusionField
from nvs_core.realfusion.renderer import render_cameras, render_rays

TINY = dict(grid_levels=4, grid_resolution=64, hidden_dim=16, hidden_dim_bg=8, grid_size=32)


class Sphere(RealFusionField):
    """Analytic density: a ball of radius 0.3 (sigma 60 inside) with an x-dependent albedo."""

    def common_forward(self, x):
        r = x.norm(dim=-1)
        sigma = 60.0 * torch.sigmoid((0.3 - r) * 400)
        albedo = torch.stack([0.5 + x[:, 0], 0.5 - x[:, 1], 0.5 + 0 * x[:, 2]], -1).clamp(0, 1)
        return sigma, albedo


def _rays(n=12, fovy=40):
    pose, _ = rc.circle_poses(1.8, 75, 30)
    return rc.get_rays(pose, rc.intrinsics_for(n, n, fovy), n, n)


@pytest.fixture(scope="module")
def sphere():
    field = Sphere(FieldConfig(**{**TINY, "grid_size": 128}, grid_levels_mask=0))
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # jittered updates, as during training
        field.update_occupancy(generator=generator)
    return field


def test_occupancy_grid_skips_empty_space(sphere):
    rays = _rays(16)
    with_grid = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="eval", light_d=torch.tensor([0, 1.0, 0]))
    without = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="eval", light_d=torch.tensor([0, 1.0, 0]),
                          use_occupancy=False)
    # Skipping only drops samples in cells whose density is below the threshold: a thin shell at the
    # silhouette, so a few edge pixels differ a little.
    diff = (with_grid["image"] - without["image"]).abs()
    assert diff.mean() < 3e-3 and diff.max() < 0.1
    n_rays = 16 * 16
    per_ray = (with_grid["samples"] / n_rays, without["samples"] / n_rays)
    print(f"samples evaluated per ray: {per_ray[0]:.1f} with the occupancy grid, {per_ray[1]:.1f} without "
          f"(ratio {per_ray[0] / per_ray[1]:.3f})")
    assert per_ray[0] < 0.35 * per_ray[1]
    train_g = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="train", smooth_loss=False, normals=False)
    train_n = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="train", smooth_loss=False, normals=False,
                          use_occupancy=False)
    assert train_g["samples_marched"] < 0.35 * train_n["samples_marched"]


def test_eval_batches_do_not_change_the_render(sphere):
    rays = _rays(9)
    light = torch.tensor([0.0, 1.0, 0.0])
    one = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="eval", light_d=light, return_samples=True)
    many = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="eval", light_d=light, ray_batch=10,
                       return_samples=True)
    assert torch.allclose(one["image"], many["image"], atol=1e-4)
    assert torch.allclose(one["normals"], many["normals"], atol=1e-4)
    # Every compaction round queries at most ray_batch slots plus alignment padding.
    assert all(n_alive * n_step <= 10 for n_alive, n_step in many["trace"])
    assert many["samples"] <= 128 * len(many["trace"])


def test_train_and_eval_paths_agree(sphere):
    rays = _rays(10)
    light = torch.tensor([0.0, 1.0, 0.0])
    ev = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="eval", shading="lambertian", ambient_ratio=0.2,
                     light_d=light, bg_color=1.0)
    tr = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="train", shading="lambertian", ambient_ratio=0.2,
                     light_d=light, bg_color=1.0, smooth_loss=False)
    # The training path composites over the background net; compare premultiplied colour.
    a, b = ev["image"] - (1 - ev["weights_sum"][..., None]), tr["image"] - (1 - tr["weights_sum"][..., None]) * tr["bg"]
    assert torch.allclose(ev["weights_sum"], tr["weights_sum"], atol=1e-3)
    assert torch.allclose(a, b, atol=2e-3)
    assert torch.allclose(ev["normals"], tr["normals"].detach(), atol=2e-3)
    hit = ev["weights_sum"].reshape(-1) > 0.99
    assert hit.any() and (ev["depth"].reshape(-1)[hit] > 0).all()


def test_training_gradients_reach_every_network():
    torch.manual_seed(0)
    field = RealFusionField(FieldConfig(**TINY), grid_levels_mask=0)
    with torch.no_grad():
        field.encoder.embeddings.uniform_(-0.5, 0.5)
    field.update_occupancy(jitter=False)
    field.train(True)
    rays = _rays(8)
    g = torch.Generator().manual_seed(0)
    res = render_rays(field, rays["rays_o"], rays["rays_d"], shading="textureless", ambient_ratio=0.1,
                      perturb=True, generator=g)
    loss = res["image"].mean() + res["loss_orient"] + res["loss_smooth"] + res["weights_sum"].mean()
    loss.backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert res["image"].shape == (1, 64, 3) and res["normals"].shape == (1, 64, 3)
    assert field.local_step == 1 and int(field.step_counter[0, 1]) == 64
    assert res["samples"] % 128 == 0 and res["samples"] > res["samples_marched"]


def test_empty_field_shows_background():
    field = RealFusionField(FieldConfig(**TINY))
    rays = _rays(6)
    ev = render_rays(field, rays["rays_o"], rays["rays_d"], mode="eval", bg_color=torch.tensor([0.2, 0.4, 0.6]))
    assert ev["samples"] == 128  # one round of padding rows, then every ray is done
    assert torch.allclose(ev["image"], torch.tensor([0.2, 0.4, 0.6]).expand(1, 36, 3))
    tr = render_rays(field, rays["rays_o"], rays["rays_d"], mode="train")
    with torch.no_grad():
        assert torch.allclose(tr["image"].reshape(-1, 3), field.background(rays["rays_d"].reshape(-1, 3)))


def test_rays_missing_the_box():
    field = Sphere(FieldConfig(**TINY))
    o = torch.tensor([[[3.0, 3.0, 3.0], [0.0, 0.0, 2.0]]])
    d = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]]), dim=-1)
    res = render_rays(field, o, d, mode="eval")
    assert res["mask"].tolist() == [[False, True]] and torch.isnan(res["depth"][0, 0])  # published NaN depth
    assert torch.allclose(res["image"][0, 0], torch.ones(3))


def test_nvs_camera_render_matches_realfusion_rays(sphere):
    view = rc.InputView(size=12)
    cam = view.camera()
    out = render_cameras(sphere, cam, shading="albedo")
    rays = view.rays()
    ref = render_rays(sphere, rays["rays_o"], rays["rays_d"], mode="eval", light_d=torch.tensor([0.0, 1.0, 0.0]))
    assert out["image"].shape == (1, 12, 12, 3) and out["normals"].shape == (1, 12, 12, 3)
    assert torch.allclose(out["image"].reshape(-1, 3), ref["image"].reshape(-1, 3), atol=1e-5)
    assert torch.allclose(out["alpha"].reshape(-1), ref["weights_sum"].reshape(-1), atol=1e-5)
    # The x-mirror: a camera at NVS azimuth +90 (on +x) sees the RealFusion side at -x.
    side = Cameras.from_spherical(0.0, math.pi / 2, 1.8, math.radians(40), 8, 8)
    pose = rc.cameras_to_realfusion(side)
    assert pose[0, 0, 3] < -1.7 and torch.linalg.det(pose[0, :3, :3]) < 0


def test_cameras_are_seeded_and_mirror_handed():
    a = rc.sample_training_view(rc.RandomSource(7), 8, 8)
    b = rc.sample_training_view(rc.RandomSource(7), 8, 8)
    assert torch.equal(a["rays_d"], b["rays_d"]) and a["fovy"] == b["fovy"]
    poses, dirs = rc.rand_poses(64, rc.RandomSource(3))
    assert torch.allclose(torch.linalg.det(poses[:, :3, :3]), torch.tensor(-1.0), atol=1e-5)
    radius = poses[:, :3, 3].norm(dim=-1)
    assert (radius >= 1.0).all() and (radius <= 1.5).all() and set(dirs.tolist()) <= set(range(6))
    jittered, _ = rc.rand_poses(4, rc.RandomSource(3), jitter=True)
    assert torch.isfinite(jittered).all()
    assert rc.direction_prompts("a cat")[2] == "a cat, back view" and len(rc.direction_prompts("x")) == 6
    orbit, labels = rc.orbit_poses(8)
    assert orbit.shape == (8, 4, 4) and labels[0] == 0
    o, d = rc.jitter_rays(torch.zeros(1, 4, 3), torch.ones(1, 4, 3), 0.5, rc.RandomSource(0))
    assert torch.allclose(o[0, 0], o[0, 3]) and not torch.equal(o, torch.zeros_like(o))
    assert rc.real_camera_noise_scale(2500, 5000) == pytest.approx(0.0005)
