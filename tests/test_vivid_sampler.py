"""VIVID sampler and driver on tiny random networks: seeds, batching, SR stage, progress, interruption."""
import numpy as np
import pytest
import torch

from nvs_core.progress import Interrupted, Progress, silent_progress
from nvs_core.vivid import sampler as vs
from nvs_core.vivid.geometry import compose_geometry
from nvs_core.vivid.loading import build_vivid_network

BASE = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8,
            img_resolution=8, img_channels=3, label_dim=20, use_fp16=False, extra_attn=None)
# The SR denoiser uses 32 channels per head and its encoder 64: 64 channels at the deepest level.
SR = dict(model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[], img_resolution=16,
          img_channels=3, label_dim=20, use_fp16=False, super_res=True, noisy_sr=0.25)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return (build_vivid_network(BASE), build_vivid_network(dict(BASE, uncond=True)), build_vivid_network(SR))


def _inputs(n, size):
    g = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=g).float()
    angle = torch.linspace(-0.2, 0.2, n)
    tgt2src = torch.zeros(n, 3, 4)
    tgt2src[:, 0, 0] = tgt2src[:, 2, 2] = angle.cos()
    tgt2src[:, 0, 2], tgt2src[:, 2, 0] = angle.sin(), -angle.sin()
    tgt2src[:, 1, 1] = 1
    tgt2src[:, 0, 3] = 0.3
    K = torch.tensor([[0.9 * size, 0, size / 2], [0, 0.9 * size, size / 2], [0, 0, 1]]).expand(n, 3, 3)
    return pixels, compose_geometry(tgt2src, K, K, size)


def test_per_seed_noise_is_batch_independent():
    both = vs.seeded_noise([7, 2024], [3, 4, 4])
    assert torch.equal(both[1], vs.seeded_noise([2024], [3, 4, 4])[0])
    assert torch.equal(both[0], vs.seeded_noise([7 + 2 ** 32], [3, 4, 4])[0])  # seed mod 2^32
    batched = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(7))
    assert not torch.equal(batched[1], both[1])


@pytest.mark.parametrize("n,max_batch", [(5, 2), (7, 3), (1, 4), (8, 8)])
def test_seed_batches_match_the_original_split(n, max_batch):
    num_batches = max((n - 1) // max_batch + 1, 1)
    expected = [list(a) for a in np.array_split(np.arange(n), num_batches)]
    assert [list(r) for r in vs.split_seed_batches(n, max_batch)] == expected


def test_time_steps():
    t = vs.edm_time_steps(32)
    assert t.dtype == torch.float32 and t.shape == (33,) and t[-1] == 0 and torch.all(t[:-1] > t[1:])
    assert abs(t[0].item() - 80) < 1e-4 and abs(t[-2].item() - 0.002) < 1e-8


def test_pixels_round_trip():
    pixels = torch.arange(256.0).reshape(1, 1, 16, 16)
    assert torch.equal(vs.decode_pixels(vs.encode_pixels(pixels)).float(), torch.clamp(pixels + 0.5, max=255).floor())


def test_generate_views_with_sr_stage(nets):
    net, gnet, sr_net = nets
    seeds = [3, 11, 12]
    pixels, labels = _inputs(3, 8)
    sr_pixels, sr_labels = _inputs(3, 16)
    counts = []

    def progress(total, desc):
        counts.append(total)
        return Progress(total, desc, on_update=lambda done, total: counts.append(("step", done)))

    kwargs = dict(gnet=gnet, guidance=1.5, num_steps=3, max_batch_size=2, sr_net=sr_net, sr_src_pixels=sr_pixels,
                  sr_labels=sr_labels, sr_num_steps=2)
    with torch.no_grad():
        torch.manual_seed(1)  # the SR conditioning noise comes from the global RNG, as upstream
        out = vs.generate_views(net, pixels, labels, seeds, progress=progress, **kwargs)
        torch.manual_seed(1)
        again = vs.generate_views(net, pixels, labels, seeds, progress=silent_progress, **kwargs)
    assert out["latents"].shape == (3, 3, 8, 8) and out["sr_latents"].shape == (3, 3, 16, 16)
    assert out["images"].dtype == torch.uint8 and out["images"].shape == (3, 3, 16, 16)
    assert torch.equal(out["images"], vs.decode_pixels(out["sr_latents"]))
    assert all(torch.equal(out[k], again[k]) for k in out)
    # One overall bar: 2 batches x (3 + 2) steps.
    assert counts[0] == 10 and counts[-1] == ("step", 10) and len(counts) == 11


def test_sr_net_sees_the_upsampled_sample(nets):
    _, _, sr_net = nets
    seen = {}

    def recording(src, x, sigma, geometry=None, conditioning_image=None, **kw):
        seen["cond"] = conditioning_image
        seen["noise"] = kw.get("conditioning_noise")
        return sr_net(src, x, sigma, geometry, conditioning_image, **kw)

    recording.super_res = True
    low = torch.randn(1, 3, 8, 8)
    cond = vs.resize_bilinear_antialias(low, 16)
    src = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        vs.edm_sampler(recording, src, torch.randn(1, 3, 16, 16), torch.zeros(1, 20), conditioning_image=cond,
                       num_steps=2, conditioning_randn_like=torch.zeros_like, progress=silent_progress)
    assert seen["cond"] is cond and torch.equal(seen["noise"], torch.zeros_like(cond))


def test_churn_uses_the_given_noise_stream(nets):
    net, gnet, _ = nets
    pixels, labels = _inputs(2, 8)
    src = vs.encode_pixels(pixels)

    def run(churn):
        rnd = vs.SeededNoise([1, 2])
        noise = rnd.randn([3, 8, 8])
        with torch.no_grad():
            return vs.edm_sampler(net, src, noise, labels, gnet, num_steps=3, guidance=2.0, S_churn=churn,
                                  randn_like=rnd.randn_like, progress=silent_progress)

    assert torch.equal(run(5.0), run(5.0))
    assert not torch.equal(run(5.0), run(0.0))


def test_interrupt_stops_the_loop(nets):
    net, _, _ = nets
    pixels, labels = _inputs(1, 8)
    calls = []

    def progress(total, desc):
        return Progress(total, desc, should_stop=lambda: len(calls) >= 2,
                        on_update=lambda done, total: calls.append(done))

    with pytest.raises(Interrupted), torch.no_grad():
        vs.edm_sampler(net, vs.encode_pixels(pixels), torch.randn(1, 3, 8, 8), labels, num_steps=5,
                       progress=progress)
    assert calls == [1, 2]


def test_guidance_needs_a_guidance_net(nets):
    net, _, _ = nets
    with pytest.raises(ValueError, match="gnet"):
        vs.edm_sampler(net, torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), guidance=1.5)


def test_time_independent_encoder_features_are_computed_once():
    torch.manual_seed(2)
    net = build_vivid_network(dict(BASE, no_time_enc=True))
    pixels, labels = _inputs(2, 8)
    src, noise = vs.encode_pixels(pixels), vs.seeded_noise([4, 5], [3, 8, 8])
    encoder_calls = []
    hook = net.encoder.register_forward_hook(lambda *args: encoder_calls.append(1))

    def without_reuse(*args, **kwargs):  # same net, but the sampler cannot see no_time_enc
        return net(*args, **kwargs)

    with torch.no_grad():
        once = vs.edm_sampler(net, src, noise, labels, num_steps=3, progress=silent_progress)
        assert len(encoder_calls) == 1
        every_call = vs.edm_sampler(without_reuse, src, noise, labels, num_steps=3, progress=silent_progress)
    hook.remove()
    assert torch.equal(once, every_call)
