"""GeNVS training: objective, optimiser groups, augmentation, NaN guard, resumable checkpoints, CLI."""
import json
import math

import pytest
import torch

from nvs_core.checkpoints import CheckpointError, load_with_config
from nvs_core.genvs import tiny_config
from nvs_core.genvs import training as T
from nvs_core.genvs.loading import load_genvs, load_genvs_checkpoint
from nvs_core.genvs.pipeline import generate_views
from nvs_core.multiview import MultiView
from nvs_core.procedural import render_multiview
from nvs_core.cameras import Cameras
from nvs_core.progress import Interrupted, Progress


def tiny_network() -> dict:
    cfg = tiny_config(image_size=16, render_size=4, decoder_channels=32, color_feat_dim=4, mapping_out=16,
                      channels=(8, 16), self_attn=(False, True))
    cfg.nerf.hidden_dim, cfg.nerf.num_steps, cfg.nerf.upsample_steps = 8, 4, 4
    cfg.validate()
    return cfg.to_dict()


def tiny_train_config(**kw) -> T.TrainConfig:
    values = dict(network=tiny_network(), data={**T.DEMO_DATA, "samples_per_pixel": 1}, total_steps=3, batch_size=2,
                  lr=1e-3, lr_ratios={"input_unet": 1.0, "nerf": 2.0, "ddpm_pipeline": 1.0}, restart_steps=10,
                  ema_decay=0.9, checkpoint_every=0)
    values.update(kw)
    return T.TrainConfig(**values)


class FixedViews:
    """The same batch for every step."""

    def __init__(self, batch: T.ViewBatch):
        self.batch = batch

    def sample(self, count, generator):
        return self.batch


@pytest.fixture(scope="module")
def batch() -> T.ViewBatch:
    config = tiny_train_config()
    return T.views_from_config(config).sample(2, torch.Generator().manual_seed(0))


def test_procedural_samples_are_genvs_cameras(batch):
    assert batch.images.shape == (2, 3, 3, 8, 8)
    assert 0 <= float(batch.images.min()) and float(batch.images.max()) <= 1
    # normalize_first_view: view 0 is identity at (0, 0, |t0|) = (0, 0, 2.6)
    eye = torch.eye(4)
    eye[2, 3] = 2.6
    assert torch.allclose(batch.poses[:, 0], eye.expand(2, 4, 4), atol=1e-5)
    assert torch.allclose(batch.camera_d, torch.full((2,), 2.6, dtype=torch.float64))
    # 45-degree fov on a 4-px render grid: fy = 2 / tan(22.5 deg), centred principal point
    assert torch.allclose(batch.intrinsics[0], torch.tensor([4.8284, 4.8284, 2.0, 2.0]), atol=1e-3)


def test_loss_terms_finite_and_decreasing_on_fixed_batch(batch):
    torch.manual_seed(0)
    config = tiny_train_config(lr=3e-3)
    model = T.build_network(config.network, 0)
    optimizer = T.make_optimizer(model, config)
    draws = T.draw_step(config, model.config, batch, torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        out = T.train_step(model, optimizer, batch, draws, config)
        assert out["skipped"] == 0.0
        assert all(math.isfinite(v) for v in out.values())
        losses.append(out["loss"])
    assert set(out) == {"loss", "diffusion", "rgb", "opacity", "depth", "skipped"}
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_per_module_learning_rates_and_cosine_restarts():
    config = tiny_train_config(lr=1e-4, lr_ratios=dict(T.PUBLISHED_LR_RATIOS), restart_steps=4, warmup_steps=0)
    model = T.build_network(config.network, 0)
    optimizer = T.make_optimizer(model, config)
    assert [g["name"] for g in optimizer.param_groups] == list(T.MODULES)
    assert optimizer.defaults["weight_decay"] == 0.01 and optimizer.defaults["betas"] == (0.9, 0.99)
    assert T.set_learning_rates(optimizer, config, 0) == pytest.approx([1e-4, 2e-4, 1e-5])
    mid = T.set_learning_rates(optimizer, config, 2)     # half a period: (base + eta_min) / 2
    assert mid == pytest.approx([(b + 1e-8) / 2 for b in (1e-4, 2e-4, 1e-5)])
    assert T.set_learning_rates(optimizer, config, 4) == pytest.approx([1e-4, 2e-4, 1e-5])   # warm restart
    assert T.learning_rate_factor(0, 100, warmup_steps=10) == pytest.approx(0.1, rel=1e-6)


def test_augmentation_matches_flip_and_conditioning():
    g = torch.Generator().manual_seed(0)
    mat, cond = T.augmentation(64, 8, 8, g, a_prob=0.0)
    assert mat.shape == (64, 3, 3) and cond.shape == (64, 9)
    assert torch.all(cond[:, 1:] == 0)               # only the x-flip is drawn with a_prob 0
    flipped = cond[:, 0] == 1
    assert 0 < int(flipped.sum()) < 64
    images = torch.rand(64, 3, 8, 8)
    out = T.apply_augmentation(images, mat)
    assert torch.allclose(out[flipped], images[flipped].flip(-1), atol=1e-5)
    assert torch.allclose(out[~flipped], images[~flipped], atol=1e-5)
    mat2, cond2 = T.augmentation(64, 8, 8, g, a_prob=1.0)
    assert (cond2[:, 2:] != 0).any(dim=0).all()


def test_train_writes_checkpoints_the_loader_reads(tmp_path, batch):
    config = tiny_train_config(out_dir=str(tmp_path / "run"), total_steps=2)
    seen = []
    result = T.train(config, progress=lambda total, desc: Progress(total), callback=seen.append, data=FixedViews(batch))
    assert result.step == 2 and [s["step"] for s in seen] == [1, 2] and len(result.losses) == 2
    ckpt = load_genvs_checkpoint(result.ema_path)
    assert ckpt.config.to_dict() == config.network
    for key, value in result.ema.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value), key
    _, meta = load_with_config(result.ema_path)
    assert meta["method"] == "genvs" and meta["meta"]["step"] == 2
    model = load_genvs(result.ema_path)
    source = T.to_genvs(Cameras.from_spherical(0.3, torch.tensor([0.0, 0.5]), 2.6, math.radians(45), 8, 8), 4,
                        normalize=True)
    out = generate_views(model, batch.images[0, :1], source[0], source[1], steps=2, stochastic=False)
    assert out["images"].shape == (1, 3, 8, 8) and torch.isfinite(out["images"]).all()


def test_resume_equals_uninterrupted(tmp_path, batch):
    data = FixedViews(batch)
    full = T.train(tiny_train_config(out_dir=str(tmp_path / "a"), total_steps=4), data=data)
    T.train(tiny_train_config(out_dir=str(tmp_path / "b"), total_steps=2), data=data)
    resumed = T.train(tiny_train_config(out_dir=str(tmp_path / "b"), total_steps=4), data=data)
    assert resumed.step == 4 and resumed.losses == full.losses
    for (k, a), b in zip(full.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="different recipe"):
        T.train(tiny_train_config(out_dir=str(tmp_path / "b"), total_steps=5, lr=5e-4), data=data)


def test_interrupt_saves_state(tmp_path, batch):
    class StopAfterOne(Progress):
        def check(self):
            if self.done >= 1:
                raise Interrupted("stop")

    config = tiny_train_config(out_dir=str(tmp_path / "run"), total_steps=5)
    with pytest.raises(Interrupted):
        T.train(config, progress=lambda total, desc: StopAfterOne(total), data=FixedViews(batch))
    _, meta = load_with_config(tmp_path / "run" / T.STATE_FILE)
    assert meta["meta"]["step"] == 1


def test_nan_guard_skips_non_finite_steps(batch):
    config = tiny_train_config()
    model = T.build_network(config.network, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = T.make_optimizer(model, config)
    bad = T.ViewBatch(batch.images.clone(), batch.poses, batch.intrinsics, batch.camera_k, batch.camera_d)
    bad.images[0, -1, 0, 0, 0] = float("nan")
    draws = T.draw_step(config, model.config, bad, torch.Generator().manual_seed(0))
    out = T.train_step(model, optimizer, bad, draws, config)
    assert out["skipped"] == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    result = T.train(tiny_train_config(total_steps=2), data=FixedViews(bad))
    assert result.skipped == 2
    assert all(torch.isfinite(p).all() for p in result.ema.parameters())


def test_multiview_data_and_bad_input():
    cams = Cameras.from_spherical(0.3, torch.linspace(0, 1.5, 4), 2.6, math.radians(45), 12, 10)
    mv = render_multiview(5, cams, samples_per_pixel=1)
    source = T.view_source(mv, tiny_train_config())
    b = source.sample(2, torch.Generator().manual_seed(0))
    assert b.images.shape == (2, 3, 3, 8, 8)           # centre crop 10x10 -> 8 px
    result = T.train(tiny_train_config(total_steps=1, batch_size=1), data=mv)
    assert result.step == 1 and math.isfinite(result.losses[0])
    two = MultiView(mv.images[:2], mv.cameras[[0, 1]])
    assert T.MultiViewViews(two, 8, 4).views == 2        # one source + target
    with pytest.raises(ValueError, match="2 or more views"):
        T.MultiViewViews(MultiView(mv.images[:1], mv.cameras[[0]]), 8, 4)
    with pytest.raises(ValueError, match="lr_ratios"):
        tiny_train_config(lr_ratios={"input_unet": 1.0})
    with pytest.raises(ValueError, match="lr must be"):
        tiny_train_config(lr=float("nan"))
    with pytest.raises(ValueError, match="unknown data kind"):
        T.views_from_config(tiny_train_config(data={"kind": "video"}))
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_train_config(network={**tiny_network(), "image_size": 20})
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        T.train(tiny_train_config(total_steps=1))


def test_mask_term_pulls_opacity_to_the_object_mask(batch):
    """Ours, off by default: lambda_mask * MSE(opacity, mask) on both rendered views, masks area-averaged
    to the render grid; it trains the NeRF through the opacity and needs masks in the data."""
    import torch.nn.functional as F

    assert batch.masks.shape == (2, 3, 1, 8, 8) and 0 < float(batch.masks.mean()) < 1
    config = tiny_train_config(lambda_mask=2.0, lambda_diffusion=0.0)
    model = T.build_network(config.network, 0)
    draws = T.draw_step(config, model.config, batch, torch.Generator().manual_seed(1))
    terms = T.genvs_loss(model, batch, draws, config)
    assert "mask" not in T.genvs_loss(model, batch, draws, tiny_train_config(lambda_diffusion=0.0))
    # the same term by hand: render view 0 and the target with the same draws
    nv, size = draws.nv, model.config.image_size
    x = T.preprocess(T.fit_images(batch.images[:, :nv].flatten(0, 1), size)) + draws.input_noise
    src = T.SourceViews(model.input_unet(x).reshape(2, nv, -1, size, size), batch.poses[:, :nv], batch.camera_k)
    poses = torch.stack([batch.poses[:, 0], batch.poses[:, -1]], dim=1)
    _, _, opacity = model.render(src, poses, batch.intrinsics[0], draws=draws.render, random_importance=True)
    masks = F.adaptive_avg_pool2d(torch.stack([batch.masks[:, 0], batch.masks[:, -1]], 1).flatten(0, 1), 4)
    torch.testing.assert_close(terms["mask"], 2.0 * ((opacity - masks.reshape(opacity.shape)) ** 2).mean())
    model.zero_grad()
    terms["mask"].backward()
    assert model.nerf.sigma_color_net.net[-1].weight.grad.abs().sum() > 0
    unmasked = T.ViewBatch(batch.images, batch.poses, batch.intrinsics, batch.camera_k, batch.camera_d)
    assert T.ViewBatch.stack([batch, unmasked]).masks is None
    with pytest.raises(ValueError, match="masks"):
        T.genvs_loss(model, unmasked, draws, config)
    with pytest.raises(ValueError, match="lambda_mask"):
        tiny_train_config(lambda_mask=-1.0)
    cams = Cameras.from_spherical(0.3, torch.linspace(0, 1.5, 4), 2.6, math.radians(45), 12, 10)
    mv = render_multiview(5, cams, samples_per_pixel=1)
    with_masks = T.view_source(mv, tiny_train_config()).sample(1, torch.Generator().manual_seed(0))
    assert with_masks.masks.shape == (1, 3, 1, 8, 8)
    no_masks = MultiView(mv.images, mv.cameras)
    assert T.view_source(no_masks, tiny_train_config()).sample(1, torch.Generator().manual_seed(0)).masks is None


def test_source_reconstruction_steps_train_encoder_and_field_on_the_source_view_first(batch):
    """Ours, off by default: the first N steps use the source-view reconstruction objective (the first
    view's RGB render against that view; no diffusion, depth or novel-view term), so the denoiser does not
    move; the published objective takes over from step N. The steps count in total_steps and the schedule."""
    config = tiny_train_config(source_reconstruction_steps=2, total_steps=4, lambda_opacity=0.0)
    warm = T.source_reconstruction_objective(config)
    assert (warm.lambda_rgb_first, warm.lambda_rgb_other, warm.lambda_depth, warm.lambda_diffusion) == (1, 0, 0, 0)
    model = T.build_network(config.network, 0)
    draws = T.draw_step(config, model.config, batch, torch.Generator().manual_seed(1))
    terms = T.genvs_loss(model, batch, draws, warm)
    assert float(terms["diffusion"].detach()) == 0.0 and float(terms["depth"].detach()) == 0.0
    torch.testing.assert_close(terms["loss"], terms["rgb"])
    only_first = T.genvs_loss(model, batch, draws, T.TrainConfig.from_dict(
        {**config.to_dict(), "lambda_rgb_other": 0.0, "lambda_rgb_first": 1.0}))
    torch.testing.assert_close(terms["rgb"], only_first["rgb"])

    seen = []
    denoiser = list(T.build_network(config.network, config.seed).ddpm_pipeline.parameters())

    def snapshot(info):
        seen.append((info["terms"]["diffusion"], info["terms"]["depth"]))

    result = T.train(config, callback=snapshot, data=FixedViews(batch))
    assert [d for d, _ in seen[:2]] == [0.0, 0.0] and seen[2][0] != 0.0 and seen[3][0] != 0.0
    assert [depth for _, depth in seen[:2]] == [0.0, 0.0]
    # the raw network's denoiser moved only in the last two steps: train 2 steps and compare
    two = T.train(tiny_train_config(source_reconstruction_steps=2, total_steps=2, lambda_opacity=0.0),
                  data=FixedViews(batch))
    for start, after in zip(denoiser, two.net.ddpm_pipeline.parameters()):
        torch.testing.assert_close(start, after, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(denoiser, result.net.ddpm_pipeline.parameters()))
    with pytest.raises(ValueError, match="source_reconstruction_steps"):
        tiny_train_config(source_reconstruction_steps=-1)


def test_cli_trains_and_records_command(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--steps", "1", "--batch", "1", "--network", json.dumps(tiny_network()),
            "--procedural", json.dumps({"samples_per_pixel": 1}), "--threads", "1", "--lambda-mask", "0.5",
            "--source-reconstruction-steps", "1", "--lambda-rgb-first", "0.5"]
    assert T.main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 1 and line["skipped"] == 0
    _, meta = load_with_config(out / T.EMA_FILE)
    assert meta["meta"]["reproduce"].startswith("python -m nvs_core genvs-train --out ")
    assert meta["meta"]["training"]["data"]["samples_per_pixel"] == 1
    assert meta["meta"]["training"]["lambda_mask"] == 0.5
    assert meta["meta"]["training"]["source_reconstruction_steps"] == 1
    assert meta["meta"]["training"]["lambda_rgb_first"] == 0.5
