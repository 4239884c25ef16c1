"""RealFusion training loop: presets and their quirks, loss terms, EMA, level mask, occupancy, resumable
checkpoints, interrupt, NaN/inf handling, multi-view supervision, bad inputs (tiny field, stub SDS; fast)."""
import pytest
import torch

from nvs_core.progress import Interrupted, Progress
from nvs_core.realfusion import FieldConfig, RealFusionField
from nvs_core.realfusion.losses import LossWeights
from nvs_core.realfusion.sds import SDSStep
from nvs_core.realfusion.training import (GRADSCALER_GROWTH_INTERVAL, STATE_FILE, TrainConfig, _LossScale,
                                          _autocast_dtype, input_rgba, train)

TINY = dict(grid_levels=4, grid_resolution=64, log2_hashmap_size=10, hidden_dim=16, hidden_dim_bg=16, grid_size=32)
FAST = dict(synthetic_size=12, input_size=24, num_rays=128, max_steps=48, occupancy_every=2, preview_every=0,
            checkpoint_every=0, albedo_iters=2, grid_levels_mask=2)


def field(seed=0):
    torch.manual_seed(seed)
    return RealFusionField(FieldConfig(**TINY))


def photo():
    img = torch.rand(24, 24, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(24, 24)
    mask[6:18, 8:16] = 1
    return input_rgba(img, mask)


class StubGuidance:
    """Records each SDS call; the surrogate's gradient at the render is ``scale`` everywhere."""

    def __init__(self, scale=1.0, nonfinite=0):
        self.calls, self.scale, self.nonfinite = [], scale, nonfinite

    def step(self, image, direction=0, lambda_grad=1.0, generator=None, **kwargs):
        self.calls.append((int(direction), image.shape, lambda_grad))
        grad = torch.full_like(image, self.scale)
        return SDSStep((image * grad).sum(), image, grad, 500, self.nonfinite, float(abs(self.scale)))


def quiet(total, desc=""):
    return Progress(total, desc)


def test_presets():
    pub, fixed = TrainConfig(), TrainConfig(preset="fixed")
    assert (pub.replace_camera, pub.fp16_sds_weighting, pub.annealed_published, pub.capped_input_rays) == (True,) * 4
    assert (fixed.replace_camera, fixed.fp16_sds_weighting, fixed.annealed_published,
            fixed.capped_input_rays) == (False,) * 4
    assert TrainConfig(preset="fixed", replace_camera=True).replace_camera
    assert (pub.iters, pub.lr, pub.seed, pub.synthetic_size, pub.input_size, pub.num_rays) == (5000, 1e-3, 101, 96,
                                                                                               128, 4096)
    assert (pub.ema_decay, pub.ema_every, pub.occupancy_every, pub.grid_levels_mask_iters) == (0.95, 100, 16, 3000)
    w = pub.weights
    assert (w.image, w.mask, w.prior, w.entropy, w.orient, w.smooth_2d) == (5.0, 0.5, 1.0, 1e-4, 1e-2, 0.5)
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(preset="mine")


def test_published_camera_replacement_uses_front_prompt():
    g_pub, g_fix = StubGuidance(), StubGuidance()
    train(field(), rgba=photo(), guidance=g_pub, config=TrainConfig(iters=11, **FAST), progress=quiet)
    train(field(), rgba=photo(), guidance=g_fix, config=TrainConfig(preset="fixed", iters=11, **FAST), progress=quiet)
    labels = [c[0] for c in g_pub.calls]
    assert all(label == 0 for step, label in enumerate(labels, 1) if step % 10)
    assert len({c[0] for c in g_fix.calls}) > 1
    assert g_pub.calls[0][1] == (1, 3, 12, 12)


def test_fp16_weighting_of_sds():
    """Published: SDS enters unscaled, the rest is scaled by S then unscaled, so SDS counts 1/S."""
    grads = {preset: sds_only_step(preset, "fp32")[0] for preset in ("published", "fixed")}
    assert grads["fixed"].abs().sum() > 0
    torch.testing.assert_close(grads["published"] * 65536, grads["fixed"], rtol=1e-4, atol=1e-12)


def test_loss_scale_emulation():
    s = _LossScale(None)
    assert s.value == 65536
    for _ in range(GRADSCALER_GROWTH_INTERVAL):
        s.finite_step()
    assert s.value == 131072
    s.overflow()
    assert s.value == 65536
    assert _autocast_dtype("auto", torch.device("cpu")) is None
    assert _autocast_dtype("auto", torch.device("cuda")) == torch.float16
    assert _autocast_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert _autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    assert _autocast_dtype("fp32", torch.device("cuda")) is None


def sds_only_step(preset, autocast):
    """One step with SDS alone (a stub whose gradient is 1 at every pixel): the last density bias's gradient."""
    f = field()
    cfg = TrainConfig(preset=preset, iters=1, autocast=autocast, replace_camera=False, weights=LossWeights(
        image=0, mask=0, entropy=0, orient=0, smooth_2d=0), **{**FAST, "occupancy_every": 1})
    result = train(f, rgba=photo(), guidance=StubGuidance(), config=cfg, progress=quiet)
    return f.sigma_net.net[-1].bias.grad.clone(), result


def test_fp16_autocast_runs_the_gradscaler_path():
    """The CUDA mixed-precision path, run on CPU: autocast fp16 with a real GradScaler. Published: SDS bypasses
    the scaler and ends up weighted 1/S as in float32's emulation; fixed: SDS is scaled with the rest, so
    S = 65536 overflows fp16 on the first step and the scaler skips it, as it would on CUDA."""
    reference, _ = sds_only_step("published", "fp32")
    published, result = sds_only_step("published", "fp16")
    assert result.skipped_steps == 0
    torch.testing.assert_close(published, reference, rtol=2e-2, atol=1e-9)
    fixed, result = sds_only_step("fixed", "fp16")
    assert result.skipped_steps == 1 and not torch.isfinite(fixed).all()
    bf16, result = sds_only_step("fixed", "bf16")  # bf16 has float32's range: no scaler, no overflow
    assert result.skipped_steps == 0
    torch.testing.assert_close(bf16, reference * 65536, rtol=0.1, atol=1e-6)  # bf16 keeps 8 mantissa bits


@pytest.mark.parametrize("autocast", ["fp16", "bf16"])
def test_tiny_sd_backend_steps_under_autocast(autocast):
    from nvs_core.realfusion.sds import SDSConfig, SDSGuidance, encode_direction_prompts
    from nvs_core.sd.tiny import tiny_backend_with_tokenizer

    backend = tiny_backend_with_tokenizer()
    guidance = SDSGuidance(backend, encode_direction_prompts(backend, "a photo of a cat"), SDSConfig(resolution=32))
    f = field()
    before = f.sigma_net.net[-1].bias.detach().clone()
    r = train(f, rgba=photo(), guidance=guidance, config=TrainConfig(iters=4, autocast=autocast, **FAST),
              progress=quiet)
    assert r.global_step == 4 and r.skipped_steps == 0 and r.sds_nonfinite == 0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in r.history)
    assert f.sigma_net.net[-1].bias.dtype == torch.float32 and not torch.equal(f.sigma_net.net[-1].bias, before)


def test_schedule_ema_level_mask_occupancy_and_losses():
    f, seen = field(), []
    cfg = TrainConfig(iters=6, ema_every=2, grid_levels_mask_iters=3, preview_size=8, **{**FAST, "preview_every": 1})
    result = train(f, rgba=photo(), guidance=StubGuidance(), config=cfg, progress=quiet,
                   on_preview=lambda step, img: seen.append((step, f.grid_levels_mask, tuple(img.shape))))
    assert [s[1] for s in seen] == [2, 2, 2, 0, 0, 0] and seen[0][2] == (8, 8, 3)
    assert result.ema.num_updates == 3 and result.global_step == 6
    assert f.density_grid.abs().sum() > 0 and f.grid_levels_mask == 0 and not f.training
    keys = set(result.history[-1])
    assert {"real_image", "real_mask", "entropy", "orient", "smooth_2d", "sds"} <= keys
    assert all(torch.isfinite(p).all() for p in f.parameters())


def test_resume_continues_exactly(tmp_path):
    cfg = TrainConfig(preset="fixed", iters=6, **{**FAST, "checkpoint_every": 3})
    a = field()
    train(a, rgba=photo(), guidance=StubGuidance(), config=cfg, progress=quiet)
    b = field()
    stops = iter([False, False, True])  # interrupted after step 3 (the state is saved then)
    first = train(b, rgba=photo(), guidance=StubGuidance(), config=cfg, run_dir=tmp_path,
                  progress=lambda total, desc="": Progress(total, desc, should_stop=lambda: next(stops)))
    assert first.interrupted and first.global_step == 3
    assert (tmp_path / STATE_FILE).is_file() and (tmp_path / "field.safetensors").is_file()
    c = field(seed=5)  # other initial weights: everything comes from the run folder
    r = train(c, rgba=photo(), guidance=StubGuidance(), config=cfg, progress=quiet, run_dir=tmp_path)
    assert r.history[0]["step"] == 4 and r.global_step == 6
    for pa, pc in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pc, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="preset"):
        train(field(), rgba=photo(), config=TrainConfig(iters=8, **FAST), progress=quiet, run_dir=tmp_path)


def test_interrupt_keeps_the_field(tmp_path):
    calls = {"n": 0}

    def stop_at_3(total, desc=""):
        def should_stop():
            calls["n"] += 1
            return calls["n"] >= 3
        return Progress(total, desc, should_stop=should_stop)

    f = field()
    r = train(f, rgba=photo(), guidance=StubGuidance(), config=TrainConfig(iters=10, **FAST), progress=stop_at_3,
              run_dir=tmp_path)
    assert r.interrupted and isinstance(r.interrupt, Interrupted) and r.global_step == 3
    assert not f.training and (tmp_path / STATE_FILE).is_file()
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["global_step"] == 3


def test_nonfinite_sds_is_counted_and_inf_steps_skipped():
    r = train(field(), rgba=photo(), guidance=StubGuidance(nonfinite=7), config=TrainConfig(iters=2, **FAST),
              progress=quiet)
    assert r.sds_nonfinite == 14 and r.sds_nonfinite_steps == 2 and "14" in r.summary()
    f = field()
    before = [p.detach().clone() for p in f.parameters()]
    r = train(f, rgba=photo(), guidance=StubGuidance(scale=float("inf")),
              config=TrainConfig(preset="fixed", iters=2, **{**FAST, "occupancy_every": 1}), progress=quiet)
    assert r.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, f.parameters()))


def test_multiview_only_fit_reduces_loss():
    from nvs_core.cameras import orbit
    from nvs_core.procedural import Scene, render_multiview

    scene = Scene.from_objects([{"kind": "sphere", "size": [0.4], "colors": ((0.9, 0.2, 0.1), (0.9, 0.2, 0.1))}])
    views = render_multiview(scene, orbit(6, 0.3, 0.0, 6.28, 1.8, 0.8, 16, 16))
    cfg = TrainConfig(preset="fixed", iters=30, lr=1e-2, multiview_rays=256, **{**FAST, "grid_levels_mask": 0})
    r = train(field(), multiview=views, config=cfg, progress=quiet)
    first = sum(v for k, v in r.history[0].items() if k.startswith("multiview"))
    last = sum(v for k, v in r.history[-1].items() if k.startswith("multiview"))
    assert "sds" not in r.history[-1] and last < 0.5 * first


@pytest.mark.parametrize("mask, message", [(None, "no alpha"), (torch.zeros(8, 8), "empty"),
                                           (torch.ones(8, 8), "whole image")])
def test_bad_photos(mask, message):
    with pytest.raises(ValueError, match=message):
        input_rgba(torch.rand(8, 8, 3), mask)


def test_nothing_to_fit():
    with pytest.raises(ValueError, match="nothing to fit"):
        train(field(), config=TrainConfig(iters=1))


def test_tiny_sd_backend_steps():
    from nvs_core.realfusion.sds import SDSConfig, SDSGuidance, encode_direction_prompts
    from nvs_core.sd.tiny import tiny_backend_with_tokenizer

    backend = tiny_backend_with_tokenizer()
    guidance = SDSGuidance(backend, encode_direction_prompts(backend, "a photo of a cat"), SDSConfig(resolution=32))
    r = train(field(), rgba=photo(), guidance=guidance, config=TrainConfig(iters=3, **FAST), progress=quiet)
    assert r.global_step == 3 and all(20 <= h["t"] <= 980 for h in r.history)
