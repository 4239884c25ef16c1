"""GeNVS sampler (Karras sigmas, Euler with churn, CFG, batching, progress) and the autoregressive orbit."""
import pytest
import torch

from nvs_core.cameras import orbit
from nvs_core.genvs import build_genvs, tiny_config
from nvs_core.genvs import sampler as S
from nvs_core.genvs.cameras import GeNVSCameras, circle_path, to_genvs
from nvs_core.genvs.orbit import VolumeCache, ar_schedule, autoregressive_orbit, views_seen
from nvs_core.genvs.pipeline import generate_views
from nvs_core.progress import Interrupted, Progress, silent_progress


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_genvs(tiny_config(image_size=32, render_size=4, decoder_channels=32, color_feat_dim=8,
                                   mapping_out=32, channels=(16, 32)))


@pytest.fixture(scope="module")
def cams():
    return to_genvs(orbit(4, 0.3, 0.0, 6.283, 1.3, 0.8, 32, 32), render_size=4)


def test_karras_sigmas_any_step_count():
    for n in (1, 2, 7, 250):
        s = S.karras_sigmas(n, 0.03, 50)
        assert s.shape == (n + 1,) and s.dtype == torch.float32 and s[-1] == 0
        assert abs(float(s[0]) - 50) < 1e-4 and torch.all(s[:-1][1:] < s[:-1][:-1])
    assert abs(float(S.karras_sigmas(10, 0.03, 50)[9]) - 0.03) < 1e-6
    with pytest.raises(ValueError):
        S.karras_sigmas(0, 0.03, 50)


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conds = []

    def forward(self, x, sigma, unet_cond):
        self.conds.append(unet_cond.clone())
        return x * 0.5 + unet_cond[:, :3] * 0.1


def test_noise_drawn_every_step_even_deterministic():
    cond = torch.rand(2, 8, 4, 4)
    noise = S.BatchNoise(3)
    S.sample(_Recorder(), cond, steps=5, stochastic=False, noise=noise, progress=silent_progress)
    ref = torch.Generator().manual_seed(3)
    for _ in range(6):
        torch.randn(2, 3, 4, 4, generator=ref)
    assert torch.equal(noise.generator.get_state(), ref.get_state())


def test_seeds_modes_cfg_and_batching():
    rec = _Recorder()
    cond = torch.rand(3, 8, 4, 4)
    a = S.sample(rec, cond, steps=4, seed=1, progress=silent_progress)
    b = S.sample(rec, cond, steps=4, seed=1, batch_size=1, progress=silent_progress)
    assert torch.equal(a, b)
    assert not torch.equal(a, S.sample(rec, cond, steps=4, seed=2, progress=silent_progress))
    assert not torch.equal(a, S.sample(rec, cond, steps=4, seed=1, stochastic=False, progress=silent_progress))
    rec.conds.clear()
    g = S.sample(rec, cond, steps=2, seed=1, cfg=2.0, progress=silent_progress)
    assert rec.conds[0].shape[0] == 6                     # conditional and unconditional rows together
    uncond = rec.conds[0][3:]
    assert not torch.equal(uncond, cond) and uncond.min() >= 0 and uncond.max() < 1
    assert torch.equal(rec.conds[0][3:], rec.conds[1][3:])  # one uniform draw for the whole sampling
    assert not torch.equal(g, S.sample(rec, cond, steps=2, seed=1, progress=silent_progress))
    # per-target noise: a target's sample does not depend on its batch
    pt = S.sample(rec, cond, steps=3, noise=S.PerTargetNoise([5, 6, 7]), progress=silent_progress)
    one = S.sample(rec, cond[1:2], steps=3, noise=S.PerTargetNoise([6]), progress=silent_progress)
    assert torch.equal(pt[1:2], one)
    with pytest.raises(ValueError, match="non-empty"):
        S.sample(rec, cond[:0], steps=2, progress=silent_progress)


def test_progress_per_step_and_interrupt():
    seen = []
    S.sample(_Recorder(), torch.rand(1, 8, 4, 4), steps=6,
             progress=lambda total, desc="": Progress(total, desc, on_update=lambda d, t: seen.append((d, t))))
    assert seen == [(i, 6) for i in range(1, 7)]
    with pytest.raises(Interrupted):
        S.sample(_Recorder(), torch.rand(1, 8, 4, 4), steps=6,
                 progress=lambda total, desc="": Progress(total, desc, should_stop=lambda: True))


def test_generate_views_eval_and_published_train_mode(model, cams):
    imgs = torch.rand(1, 3, 32, 32)
    kw = dict(steps=2, seed=4, progress=silent_progress)
    a = generate_views(model, imgs, cams[[0]], cams[[1, 2]], **kw)
    assert a["images"].shape == (2, 3, 8, 8) and a["features"].shape == (2, 8, 4, 4)
    assert a["images"].min() >= 0 and a["images"].max() <= 1
    assert torch.equal(a["images"], generate_views(model, imgs, cams[[0]], cams[[1, 2]], **kw)["images"])
    t = generate_views(model, imgs, cams[[0]], cams[[1, 2]], published_train_mode=True, **kw)
    assert not torch.equal(t["depth"], a["depth"])        # random importance samples
    assert not model.training and not any(m.training for m in model.modules())


def test_schedule_and_cache_bounds(model, cams):
    sched = ar_schedule(30)
    assert sched[:3] == [[0], [0, 1], [0, 1, 2]]
    assert all(len(e) <= 6 and e[-1] == q - 1 for q, e in enumerate(sched[1:], start=2))
    assert views_seen(sched[:3], 2) == [2, 3, 4]
    imgs = torch.rand(1, 3, 32, 32)
    path = GeNVSCameras(circle_path(cams.poses[0], 10)[1:], cams.intrinsics, cams.camera_k, 4)
    sizes = []
    enc = []

    def watch(q, info):
        enc.append(info["stats"].encoded)

    kw = dict(steps=1, seed=0, progress=silent_progress)
    a = autoregressive_orbit(model, imgs, cams[[0]], path, max_cached_volumes=3, callback=watch, **kw)
    assert a["images"].shape == (9, 3, 8, 8)
    # every view is encoded once: cost per generated view does not grow with the orbit
    assert [y - x for x, y in zip([0] + enc, enc)] == [1] * 9
    b = autoregressive_orbit(model, imgs, cams[[0]], path, max_cached_volumes=3, offload=False, **kw)
    assert torch.equal(a["images"], b["images"])
    assert b["stats"].encoded > a["stats"].encoded
    c = autoregressive_orbit(model, imgs, cams[[0]], path, max_cached_volumes=2, offload_dtype=torch.float16, **kw)
    assert torch.allclose(a["images"], c["images"], atol=0.05)
    d = autoregressive_orbit(model, imgs, cams[[0]], path, max_cached_volumes=2, max_offloaded_volumes=1, **kw)
    assert torch.equal(a["images"], d["images"]) and d["stats"].encoded > a["stats"].encoded
    assert d["stats"].encoded <= 1 + 5 * 9     # bounded work per view whatever the memory bound

    cache = VolumeCache(lambda x: x * 2, max_device_entries=2)
    for e in range(5):
        cache.add(e, torch.full((1, 1), float(e)))
        cache.get(e, now=e)
        sizes.append(len(cache.device))
    assert max(sizes) <= 2 and cache.stats.offloaded == 3
    victim = next(iter(cache.host))
    assert torch.equal(cache.get(victim, now=6), torch.full((1, 1), 2.0 * victim)) and cache.stats.uploaded == 1
    assert cache.stats.encoded == 5
    with pytest.raises(ValueError):
        autoregressive_orbit(model, imgs, cams[[0]], path[[]], **kw)
