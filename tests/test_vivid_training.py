"""VIVID training on tiny networks: forced weight norm, loss, schedule, EMA, NaN guard, resume, pairs, CLI."""
import argparse
import json
import math
import shlex

import pytest
import torch

from nvs_core.cameras import Cameras, orbit
from nvs_core.procedural import make_scene, render, render_multiview
from nvs_core.progress import Interrupted, Progress, silent_progress
from nvs_core.vivid import data as vd
from nvs_core.vivid import geometry as vg
from nvs_core.vivid import training as vt
from nvs_core.vivid.geometry import decompose_geometry, geometry_from_cameras
from nvs_core.vivid.layers import MPConv
from nvs_core.vivid.loading import load_vivid

TINY = dict(img_resolution=8, img_channels=3, label_dim=20, use_fp16=False, model_channels=8, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], channels_per_head=8, extra_attn=None)




@pytest.fixture(scope="module")
def scenes():
    """Two procedural scenes, four 8-px views each."""
    cams = orbit(4, math.radians(20), 0.0, math.radians(90), 2.6, math.radians(45), 8, 8)
    return [render_multiview(seed, cams, samples_per_pixel=4) for seed in (1, 2)]


def _config(tmp_path=None, **kw):
    base = dict(network=dict(TINY), total_steps=4, batch_size=4, ref_lr=0.01, lr_ref_steps=100, lr_rampup_steps=2,
                checkpoint_every=0, out_dir=str(tmp_path) if tmp_path else None)
    base.update(kw)
    return vt.TrainConfig(**base)


# ------------------------------------------------------------------------------------------ layers
def test_forced_weight_normalisation_keeps_unit_magnitude_and_eval_outputs():
    torch.manual_seed(0)
    conv = MPConv(6, 5, kernel=[3, 3])
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.2, 7, 5)[:, None, None, None])
    x = torch.randn(2, 6, 7, 7)
    before = conv.train(False)(x)
    assert not torch.allclose(conv.weight.pow(2).mean(dim=(1, 2, 3)), torch.ones(5), atol=1e-2)
    conv.train(True)(x)
    rms = conv.weight.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.ones(5), atol=1e-3)
    after = conv.train(False)(x)
    assert torch.allclose(before, after, rtol=1e-3, atol=1e-4)
    # eval mode never touches the stored weight
    stored = conv.weight.detach().clone()
    conv(x)
    assert torch.equal(conv.weight, stored)


# ------------------------------------------------------------------------------------------ recipe
def test_learning_rate_schedule():
    assert vt.learning_rate(0, 0.01, 100, 10) == 0.0
    assert vt.learning_rate(5, 0.01, 100, 10) == pytest.approx(0.005)
    assert vt.learning_rate(50, 0.01, 100, 10) == pytest.approx(0.01)
    assert vt.learning_rate(400, 0.01, 100, 10) == pytest.approx(0.005)
    assert vt.learning_rate(0, 0.01, 100, 0) == pytest.approx(0.01)


def test_power_function_ema_weights():
    assert vt.std_to_exp(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's published pairs
    assert vt.std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)
    assert vt.exp_to_std(vt.std_to_exp(0.07)) == pytest.approx(0.07)
    assert vt.power_ema_beta(0.1, 1) == 0.0  # the first update copies the net
    # After T updates, weight of step s is (s^(g+1) - (s-1)^(g+1)) / T^(g+1).
    net = torch.nn.Linear(1, 1, bias=False)
    ema = vt.PowerFunctionEMA(net, [0.1])
    values = torch.randn(12, dtype=torch.float64)
    for step, v in enumerate(values, 1):
        net.weight.data.fill_(float(v))
        ema.update(step)
    g = vt.std_to_exp(0.1)
    s = torch.arange(1, 13, dtype=torch.float64)
    weights = (s ** (g + 1) - (s - 1) ** (g + 1)) / 12 ** (g + 1)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(ema.get(0.1).weight) == pytest.approx(float((weights * values).sum()), abs=1e-6)


def test_edm2_loss_matches_formula():
    torch.manual_seed(0)
    net = vt.build_network(TINY, 0)
    src, dst = torch.rand(3, 3, 8, 8) * 2 - 1, torch.rand(3, 3, 8, 8) * 2 - 1
    normal, noise = torch.randn(3), torch.randn(3, 3, 8, 8)
    loss = vt.edm2_loss(net, src, dst, None, P_mean=-0.8, P_std=1.6, normal=normal, noise=noise)
    sigma = (normal * 1.6 - 0.8).exp()
    D, u = net(src, dst + noise * sigma[:, None, None, None], sigma, None, return_logvar=True)
    weight = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)[:, None, None, None]
    assert torch.allclose(loss, weight / u.exp() * (D - dst) ** 2 + u, rtol=1e-5, atol=1e-6)


def test_nan_gradients_are_zeroed_and_training_stays_finite(scenes):
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.tensor([1.0, math.nan, math.inf, -math.inf])
    vt.force_finite_([p])
    assert torch.equal(p.grad, torch.tensor([1.0, 0.0, 0.0, 0.0]))

    class PoisonedPairs:
        imsize = 8

        def __init__(self):
            self.inner = vd.MultiViewPairs(scenes, 8)

        def sample(self, count, generator):
            batch = self.inner.sample(count, generator)
            batch.dst[0, 0, 0, 0] = math.nan
            return batch

    result = vt.train(_config(total_steps=3), progress=silent_progress, data=PoisonedPairs())
    assert math.isnan(result.losses[-1])
    assert all(torch.isfinite(p).all() for p in result.net.parameters())
    assert all(torch.isfinite(p).all() for p in result.ema.parameters())


def test_denoising_error_decreases_on_a_tiny_overfit_problem(scenes):
    pairs = vd.MultiViewPairs(scenes[:1], 8)
    fixed = pairs.sample(4, torch.Generator().manual_seed(0))

    class FixedPairs:
        imsize = 8

        def sample(self, count, generator):
            return fixed[torch.arange(count) % len(fixed)]

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 3, 8, 8, generator=g)  # sigma = exp(-0.8)

    def denoising_error(net):
        with torch.no_grad():
            sigma = torch.full([4], math.exp(-0.8))
            D = net(fixed.src, fixed.dst + noise * sigma[:, None, None, None], sigma, fixed.geometry)
            return float(((D - fixed.dst) ** 2).mean())

    before = denoising_error(vt.build_network(TINY, 0).train(False))
    # Published label statistics: the same labels reach the untrained and the trained net.
    result = vt.train(_config(total_steps=40, batch_size=4, lr_rampup_steps=0, ema_stds=[0.05, 0.1],
                              label_statistics="published"), progress=silent_progress, data=FixedPairs())
    assert denoising_error(result.net.train(False)) < 0.5 * before
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


# ------------------------------------------------------------------------------------------ checkpoints
def test_resume_continues_identically(tmp_path, scenes):
    straight = vt.train(_config(tmp_path / "a", total_steps=4), progress=silent_progress, data=scenes)
    vt.train(_config(tmp_path / "b", total_steps=2), progress=silent_progress, data=scenes)
    resumed = vt.train(_config(tmp_path / "b", total_steps=4), progress=silent_progress, data=scenes)
    assert resumed.step == 4 and resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for a, b in ((straight.net, resumed.net), (straight.ema, resumed.ema)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), name


def test_interrupted_run_saves_and_resumes(tmp_path, scenes):
    def stop_after_two(total, desc):
        bar = Progress(total, desc)
        bar._should_stop = lambda: bar.done >= 2
        return bar

    with pytest.raises(Interrupted):
        vt.train(_config(tmp_path, total_steps=4), progress=stop_after_two, data=scenes)
    state = json.loads((tmp_path / "training-state.json").read_text())
    assert state["meta"]["step"] == 2 == vt.saved_step(tmp_path)
    assert vt.saved_step(tmp_path / "absent") == 0
    assert vt.train(_config(tmp_path, total_steps=4), progress=silent_progress, data=scenes).step == 4


def test_gradient_accumulation_splits_the_same_batch(scenes):
    one = vt.train(_config(total_steps=2), progress=silent_progress, data=scenes)
    two = vt.train(_config(total_steps=2, accumulation_rounds=2), progress=silent_progress, data=scenes)
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    for x, y in zip(one.net.parameters(), two.net.parameters()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)


def test_checkpoint_loads_with_load_vivid(tmp_path, scenes):
    result = vt.train(_config(tmp_path, total_steps=2), progress=silent_progress, data=scenes)
    net = load_vivid(result.ema_path)
    assert not net.training
    config = json.loads(result.ema_path.with_suffix(".json").read_text())
    assert config["method"] == "vivid" and config["constructor"]["model_channels"] == 8
    assert config["meta"]["step"] == 2 and config["meta"]["ema_std"] == 0.1
    src, dst = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    sigma, label = torch.tensor([0.5, 2.0]), torch.randn(2, 20)
    with torch.no_grad():
        assert torch.allclose(net(src, dst, sigma, label), result.ema(src, dst, sigma, label), atol=1e-6)


def test_state_from_another_network_is_refused(tmp_path, scenes):
    vt.train(_config(tmp_path, total_steps=1), progress=silent_progress, data=scenes)
    other = dict(TINY, model_channels=16)
    with pytest.raises(ValueError, match="network kwargs differ"):
        vt.train(_config(tmp_path, total_steps=2, network=other), progress=silent_progress, data=scenes)
    with pytest.raises(ValueError, match="different recipe.*ref_lr"):
        vt.train(_config(tmp_path, total_steps=2, ref_lr=0.02), progress=silent_progress, data=scenes)
    # Exporting the other tracked EMA is not a change of recipe.
    assert vt.train(_config(tmp_path, total_steps=1, ema_export_std=0.05), progress=silent_progress,
                    data=scenes).step == 1


def test_fine_tuning_starts_from_the_given_network(tmp_path, scenes):
    first = vt.train(_config(tmp_path / "a", total_steps=2), progress=silent_progress, data=scenes)
    start = load_vivid(first.ema_path)
    tuned = vt.train(_config(tmp_path / "b", total_steps=0, init_from=str(first.ema_path), seed=5),
                     progress=silent_progress, data=scenes)
    for (name, a), b in zip(start.state_dict().items(), tuned.net.state_dict().values()):
        assert torch.equal(a, b), name
    meta = json.loads((tmp_path / "b" / "network-ema.json").read_text())["meta"]
    assert meta["init_from"]["path"] == str(first.ema_path) and meta["init_from"]["step"] == 2
    assert len(meta["init_from"]["sha256"]) == 64
    # Training on from there changes the weights; a random start (same seed) differs from the loaded one.
    moved = vt.train(_config(tmp_path / "c", total_steps=2, init_from=str(first.ema_path)), progress=silent_progress,
                     data=scenes)
    assert not torch.equal(moved.net.unet.out_conv.weight, start.unet.out_conv.weight)
    fresh = vt.build_network(TINY, 5)
    assert not torch.equal(fresh.unet.out_conv.weight, start.unet.out_conv.weight)
    with pytest.raises(ValueError, match="init_from must be a VIVID network with this run's constructor"):
        vt.train(_config(tmp_path / "d", total_steps=1, init_from=str(first.ema_path),
                         network=dict(TINY, model_channels=16)), progress=silent_progress, data=scenes)


def test_fitted_label_statistics_standardise_the_training_labels(tmp_path, scenes):
    result = vt.train(_config(tmp_path / "a", total_steps=1), progress=silent_progress, data=scenes)
    stats = result.net.label_standardization
    assert stats is not None and stats == result.ema.label_standardization
    labels = vd.MultiViewPairs(scenes, 8, vt.DEMO_TRANSLATION_SCALE).sample(512, torch.Generator().manual_seed(3)).geometry
    seen = result.net.restandardize(labels)
    informative = torch.tensor(stats["std"]) > 0
    assert int(informative.sum()) >= 9  # rotation and translation entries vary; intrinsics are constant here
    assert seen[:, informative].mean(0).abs().max() < 0.25
    assert seen[:, informative].std(0).sub(1).abs().max() < 0.25
    assert torch.equal(seen[:, ~informative], torch.zeros_like(seen[:, ~informative]))
    # The published constants give this data entries far from unit scale (why "fitted" is the default).
    assert labels[:, informative].std(0).max() > 2
    # Stored in the constructor: the file loads into a net that standardises the same way.
    config = json.loads(result.ema_path.with_suffix(".json").read_text())
    assert config["constructor"]["label_standardization"] == stats
    loaded = load_vivid(result.ema_path)
    assert torch.equal(loaded.restandardize(labels), seen)
    # Deterministic, so resuming fits the same statistics; fine-tuning keeps the start network's.
    assert vt.train(_config(tmp_path / "a", total_steps=2), progress=silent_progress, data=scenes).step == 2
    tuned = vt.train(_config(tmp_path / "b", total_steps=0, init_from=str(result.ema_path), seed=4,
                             label_statistics="published"), progress=silent_progress, data=scenes)
    assert tuned.net.label_standardization == stats
    published = vt.train(_config(total_steps=0, label_statistics="published"), progress=silent_progress, data=scenes)
    assert published.net.label_standardization is None and torch.equal(published.net.restandardize(labels), labels)
    with pytest.raises(ValueError, match="label_statistics must be one of"):
        _config(label_statistics="imagenet")


def test_label_standardization_is_validated():
    with pytest.raises(ValueError, match="'mean' and 'std' lists of 20"):
        vt.build_network(dict(TINY, label_standardization={"mean": [0.0] * 19, "std": [1.0] * 19}), 0)
    with pytest.raises(ValueError, match="std >= 0"):
        vt.build_network(dict(TINY, label_standardization={"mean": [0.0] * 20, "std": [-1.0] * 20}), 0)
    with pytest.raises(ValueError, match="not label_dim 4"):
        vt.build_network(dict(TINY, label_dim=4, label_standardization={"mean": [0.0] * 4, "std": [1.0] * 4}), 0)
    # A missing label is zeros as the net sees it, with or without its own statistics.
    own = vt.build_network(dict(TINY, label_standardization={"mean": [0.5] * 20, "std": [2.0] * 20}), 0).train(False)
    plain = vt.build_network(TINY, 0).train(False)
    src, dst, sigma, label = torch.rand(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.randn(1, 20)
    with torch.no_grad():
        assert torch.equal(own(src, dst, sigma, None), plain(src, dst, sigma, None))
    pub_mean, pub_std = vg.label_statistics(8)
    expected = (label * pub_std + pub_mean - 0.5) / 2
    assert torch.allclose(own.restandardize(label), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ pairs
def test_multiview_pairs_shapes_and_identity_label(scenes):
    pairs = vd.MultiViewPairs(scenes, 8, translation_scale=0.5)
    batch = pairs.sample(5, torch.Generator().manual_seed(0))
    assert batch.src.shape == batch.dst.shape == (5, 3, 8, 8) and batch.geometry.shape == (5, 20)
    assert batch.src.min() >= -1 and batch.src.max() <= 1
    single = vd.MultiViewPairs(scenes[0][[2]], 8, allow_same=True)
    same = single.sample(2, torch.Generator().manual_seed(0))
    assert torch.equal(same.src, same.dst)
    tgt2src, _, _ = decompose_geometry(same.geometry, 8)
    assert torch.allclose(tgt2src, torch.eye(3, 4).expand(2, 3, 4), atol=1e-5)


def test_pairs_crop_non_square_views_like_the_label():
    cams = orbit(2, 0.3, 0.0, 0.5, 2.6, math.radians(45), 24, 16)
    mv = render_multiview(4, cams)
    batch = vd.MultiViewPairs(mv, 8).sample(1, torch.Generator().manual_seed(3))
    assert batch.src.shape == (1, 3, 8, 8)
    # The centre 16x16 square of a 24x16 view is a 16x16 camera whose fx is fx_px / 16 * 8.
    _, src_K, _ = decompose_geometry(batch.geometry, 8)
    assert float(src_K[0, 0, 0]) == pytest.approx(float(cams.K()[0, 0, 0]) / 2, rel=1e-3)


def test_rotation_warp_matches_a_rotated_render():
    size, focal_fraction = 48, 0.6
    fov = 2 * math.atan(0.5 / focal_fraction)
    base = Cameras.from_spherical(0.2, 0.4, 2.6, fov, size, size)
    R = vd.rotation_matrix(torch.tensor([0.08]), torch.tensor([-0.05]), torch.tensor([0.03]))[0]
    turned = torch.eye(4, dtype=torch.float64)
    turned[:3, :3] = R
    rotated = Cameras(base.c2w @ turned, base.intrinsics, size, size)
    scene = make_scene(11)
    image = render(scene, base, background=(1, 1, 1), samples_per_pixel=4).rgb[0].permute(2, 0, 1)
    expected = render(scene, rotated, background=(1, 1, 1), samples_per_pixel=4).rgb[0].permute(2, 0, 1)
    warped = vd.warp_by_rotation(image, R, focal_fraction * size)
    centre = slice(8, 40)
    assert (warped - expected)[:, centre, centre].abs().mean() < 0.03
    assert torch.allclose(vd.warp_by_rotation(image, torch.eye(3), focal_fraction * size), image, atol=1e-5)


def test_homography_pairs_label_is_the_relative_rotation():
    images = torch.rand(2, 40, 50, 3)
    pairs = vd.HomographyPairs(images, 16)
    batch = pairs.sample(3, torch.Generator().manual_seed(0))
    assert batch.src.shape == (3, 3, 16, 16) and batch.geometry.shape == (3, 20)
    tgt2src, src_K, _ = decompose_geometry(batch.geometry, 16)
    assert torch.allclose(tgt2src[..., 3], torch.zeros(3, 3), atol=1e-5)
    rot = tgt2src[..., :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-4)
    angle = torch.arccos(((rot.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
    assert (angle > 0).all() and (angle < math.radians(2 * 8.3 * 1.5 + 7)).all()
    # focal 0.6 x the 32-px warped square, seen through its 0.8 centre crop (26 px), resized to 16 px
    assert pairs.crop == 26 and float(src_K[0, 0, 0]) == pytest.approx(0.6 * 32 / 26 * 16, rel=1e-3)


def test_procedural_pairs_and_disjoint_eval_seeds():
    assert set(vd.TRAIN_SEEDS).isdisjoint(vd.EVAL_SEEDS)
    pairs = vd.ProceduralPairs(8, samples_per_pixel=1)
    g = torch.Generator().manual_seed(0)
    a = pairs.sample(2, g)
    assert a.src.shape == (2, 3, 8, 8) and torch.isfinite(a.geometry).all()
    assert torch.equal(pairs.sample(2, torch.Generator().manual_seed(0)).dst, a.dst)
    ev = vd.procedural_eval_set(2, 8, views=4, samples_per_pixel=1)
    assert len(ev.pairs) == 8 and ev.masks.shape == (8, 8, 8) and ev.seeds == list(vd.EVAL_SEEDS[:2])
    assert vd.eval_azimuth_offsets(8) == pytest.approx([-90, -65, -40, -15, 15, 40, 65, 90])
    assert torch.allclose(ev.pairs.geometry[:4],
                          geometry_from_cameras(ev.sources[[0]], ev.targets[list(range(4))], 8, 1.0))


def test_procedural_pairs_with_elevation_change_orbit_at_one_height():
    ranges = vd.OrbitRanges(elevation=(math.radians(10), math.radians(30)), elevation_change=(0.0, 0.0),
                            azimuth_offset=(math.radians(20), math.radians(20)))
    pairs = vd.ProceduralPairs(8, ranges=ranges, samples_per_pixel=1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        cams = pairs.cameras(g)
        height = cams.c2w[:, 1, 3] / 2.6
        assert float(height[0]) == pytest.approx(float(height[1]), abs=1e-12)
        assert math.sin(math.radians(10)) - 1e-9 <= float(height[0]) <= math.sin(math.radians(30)) + 1e-9
        azimuths = torch.atan2(cams.c2w[:, 0, 3], cams.c2w[:, 2, 3])
        assert float(torch.remainder(azimuths[1] - azimuths[0], 2 * math.pi)) == pytest.approx(math.radians(20))
    # Independent elevations without the option (the original behaviour).
    free = vd.ProceduralPairs(8, ranges=vd.OrbitRanges(), samples_per_pixel=1).cameras(torch.Generator().manual_seed(1))
    assert abs(float(free.c2w[0, 1, 3] - free.c2w[1, 1, 3])) > 1e-6


def test_demo_recipe_is_one_matched_run_with_fitted_labels(tmp_path):
    config = vt.demo_recipe(tmp_path)
    assert config.data == vt.DEMO_DATA == vt.TrainConfig().data and config.init_from is None
    assert config.label_statistics == "fitted" and config.out_dir == str(tmp_path)
    matched = vt.pairs_from_config(config, 8).ranges
    spec = vt.DEMO_DATA
    assert matched.elevation_change == pytest.approx(tuple(math.radians(v) for v in spec["elevation_change_deg"]))
    assert matched.azimuth_offset == pytest.approx(tuple(math.radians(v) for v in spec["azimuth_offset_deg"]))
    low, high = spec["azimuth_offset_deg"]
    assert low <= -90 and high >= 90  # covers the evaluation offsets (+-15..90 degrees)
    # The recorded command line parses back into the same config.
    parser = argparse.ArgumentParser()
    vt.configure_parser(parser)
    parsed = vt.config_from_args(parser.parse_args(shlex.split(vt.demo_command())[3:]))
    reference = vt.demo_recipe()
    for key in vt.RECIPE_FIELDS + ("total_steps", "network", "translation_scale", "out_dir"):
        assert getattr(parsed, key) == getattr(reference, key), key
    assert vt.demo_recipe(tmp_path, steps=3).total_steps == 3


def test_cli_procedural_options_merge_over_the_matched_data():
    parser = argparse.ArgumentParser()
    vt.configure_parser(parser)
    assert vt.config_from_args(parser.parse_args(["--out", "x"])).data == vt.DEMO_DATA
    parsed = vt.config_from_args(parser.parse_args(["--out", "x", "--procedural", '{"elevation_change_deg": null}']))
    assert parsed.data["elevation_change_deg"] is None and parsed.data["kind"] == "procedural"
    assert parsed.data["azimuth_offset_deg"] == vt.DEMO_DATA["azimuth_offset_deg"]


def test_mixed_pairs_draw_from_every_source(scenes):
    mixed = vd.pair_source(scenes, 8, homography_fraction=0.5)
    batch = mixed.sample(16, torch.Generator().manual_seed(0))
    tgt2src, _, _ = decompose_geometry(batch.geometry, 8)
    zero_translation = tgt2src[..., 3].abs().amax(-1) < 1e-5
    assert 0 < int(zero_translation.sum()) < 16


# ------------------------------------------------------------------------------------------ CLI
def test_cli_trains_and_writes_a_loadable_network(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    vt.add_cli(sub)
    args = parser.parse_args(["vivid-train", "--out", str(tmp_path), "--steps", "2", "--batch", "2",
                              "--network", json.dumps(TINY), "--log-every", "0"])
    assert args.func is vt.run_cli
    assert vt.main(["--out", str(tmp_path), "--steps", "2", "--batch", "2", "--network", json.dumps(TINY),
                    "--log-every", "0", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    config = json.loads((tmp_path / "network-ema.json").read_text())
    assert config["meta"]["reproduce"].startswith("python -m nvs_core.vivid.training --out")
    load_vivid(tmp_path / "network-ema.safetensors")
