"""VIVID nodes on tiny random nets: loader roles and errors, sampler outputs, seeds, SR, crop, bad inputs."""
import math
import os
from importlib import import_module

import pytest
import torch

from tests.conftest import load_pack
from tests.train_nodes import COMMON_BAD_INPUTS, check_resume_rules, run_train_node, use_train_dirs

pack = load_pack()
nv = import_module(f"{pack.__name__}.nodes.nodes_vivid")
loading = import_module(f"{pack.__name__}.nvs_core.vivid.loading")
checkpoints = import_module(f"{pack.__name__}.nvs_core.checkpoints")
cam = import_module(f"{pack.__name__}.nvs_core.cameras")
progress_mod = import_module(f"{pack.__name__}.nvs_core.progress")
host = import_module(f"{pack.__name__}.nodes.host")

BASE = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8,
            img_resolution=8, img_channels=3, label_dim=20, use_fp16=False, extra_attn=None)
# The SR denoiser uses 32 channels per head and its encoder 64: 64 channels at the deepest level.
SR = dict(model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[], img_resolution=16,
          img_channels=3, label_dim=20, use_fp16=False, super_res=True, noisy_sr=0.25)


def _tiny_net(kwargs, seed=0):
    torch.manual_seed(seed)
    net = loading.build_vivid_network(kwargs)
    with torch.no_grad():  # zero-initialised gains would hide the conditioning; larger ones saturate
        for key, p in net.named_parameters():
            if key.endswith("emb_gain"):
                p.fill_(0.1)
            elif key.endswith("out_gain"):
                p.fill_(1.0)
    return net


def save_tiny(folder, name, kwargs, seed=0, edit=None):
    """A tiny random VIVID net saved in our converted format (safetensors + JSON); returns its path."""
    state_dict = dict(_tiny_net(kwargs, seed).state_dict())
    if edit is not None:
        edit(state_dict)
    ckpt = loading.VividCheckpoint(name, "NVPrecond", dict(kwargs), state_dict)
    loading.save_vivid_converted(folder / name, ckpt)
    return folder / name


def tiny_vivid_models():
    """An NVS_VIVID with tiny random base, guidance and SR nets (8 -> 16 px), built in memory."""
    return nv.VividModels(_tiny_net(BASE), _tiny_net(dict(BASE, uncond=True), 1), _tiny_net(SR, 2))


def _nan(state_dict):
    state_dict["unet.out_conv.weight"] = state_dict["unet.out_conv.weight"].clone()
    state_dict["unet.out_conv.weight"][0, 0, 0, 0] = float("nan")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder = root / "vivid"
    folder.mkdir()
    save_tiny(folder, "vivid-base.safetensors", BASE)
    save_tiny(folder, "vivid-uncond.safetensors", dict(BASE, uncond=True), seed=1)
    save_tiny(folder, "vivid-sr.safetensors", SR, seed=2)
    save_tiny(folder, "uncond-16px.safetensors", dict(BASE, uncond=True, img_resolution=16), seed=3)
    save_tiny(folder, "vivid-nan.safetensors", BASE, edit=_nan)
    # VIVID-named files that are something else.
    checkpoints.save_with_config(folder / "vivid-genvs.safetensors", {"w": torch.zeros(2)},
                                 {"method": "genvs", "class": "GeNVS", "constructor": {"a": 1}})
    (folder / "vivid-text.pkl").write_bytes(b"this is not a checkpoint at all")
    (folder / "vivid-evil.pkl").write_bytes(_pickle_of_global("os", "system"))
    return root


def _pickle_of_global(module, name):
    return b"\x80\x04" + f"c{module}\n{name}\n".encode() + b"."


@pytest.fixture(autouse=True)
def models_dir(models_root, monkeypatch):
    monkeypatch.setenv("NVS_MODELS_DIR", str(models_root))
    nv.clear_cache()
    yield models_root
    nv.clear_cache()


def _load(base="vivid-base.safetensors", guidance="vivid-uncond.safetensors", sr="vivid-sr.safetensors",
          device="auto", dtype="fp32"):
    out = nv.NVSVIVIDLoader().load(base, guidance, sr, device, dtype)
    return out["result"][0]


def _cameras(n=3, width=32, height=32):
    source = cam.Cameras.from_spherical(math.radians(10), 0.0, 2.5, math.radians(40), width, height)
    targets = cam.orbit(n, math.radians(10), math.radians(15), math.radians(90), 2.5, math.radians(40), 32, 32)
    return source, targets


def _image(width=32, height=32, channels=3, seed=0):
    return torch.rand(1, height, width, channels, generator=torch.Generator().manual_seed(seed))


def _sample(models, n=3, steps=2, **kwargs):
    source, targets = _cameras(n)
    args = dict(steps=steps, guidance=1.5, seed=5, batch_size=2, super_resolution=False)
    args.update(kwargs)
    image = args.pop("source_image", _image())
    source = args.pop("source_camera", source)
    targets = args.pop("target_cameras", targets)
    out = nv.NVSVIVIDSampler().sample(models, image, source, targets, **args)
    assert out["ui"]["text"] == [out["result"][1]]
    return out["result"]


# ----------------------------------------------------------------------------------------------- loader
def test_loader_lists_files_with_none_entries():
    spec = nv.NVSVIVIDLoader.INPUT_TYPES()["required"]
    assert "vivid-base.safetensors" in spec["base_model"][0] and "none" not in spec["base_model"][0]
    assert spec["guidance_model"][0][0] == "none" and spec["sr_model"][0][0] == "none"
    assert spec["guidance_model"][1]["default"] == "none"
    assert not any(name.endswith(".json") for name in spec["base_model"][0])  # sidecars are not listed


def test_loader_roles_and_summary():
    out = nv.NVSVIVIDLoader().load("vivid-base.safetensors", "vivid-uncond.safetensors", "vivid-sr.safetensors",
                                   "auto", "auto")
    models = out["result"][0]
    assert isinstance(models, nv.VividModels)
    assert models.resolution == 8 and models.sr_resolution == 16
    assert models.guidance.uncond and models.sr.super_res and models.base.encoder is not None
    assert models.device == host.compute_device() and models.dtype == torch.float32
    text = out["ui"]["text"][0]
    assert "vivid-base.safetensors" in text and "vivid-sr.safetensors" in text and "16 px" in text
    only_base = _load(guidance="none", sr="none")
    assert only_base.guidance is None and only_base.sr is None


@pytest.mark.parametrize("args, message", [
    (dict(base="vivid-sr.safetensors"), r"base_model: vivid-sr\.safetensors is a super-resolution .*sr_model"),
    (dict(base="vivid-uncond.safetensors"),
     r"base_model: vivid-uncond\.safetensors is an unconditional .*guidance_model"),
    (dict(sr="vivid-base.safetensors"), r"sr_model: vivid-base\.safetensors is a conditional base .*super-resolution"),
    (dict(sr="vivid-uncond.safetensors"), r"sr_model: vivid-uncond\.safetensors .*super-resolution"),
    (dict(guidance="vivid-sr.safetensors"), r"guidance_model: vivid-sr\.safetensors is a super-resolution"),
    (dict(guidance="uncond-16px.safetensors"), r"guidance_model: uncond-16px\.safetensors works at 16 px .* 8 px"),
    (dict(base="vivid-nan.safetensors"), r"base_model: vivid-nan\.safetensors has 1 NaN/infinite .*out_conv"),
    (dict(base="vivid-genvs.safetensors"), r"base_model: vivid-genvs\.safetensors is not a usable VIVID checkpoint"
                                            r".*method 'genvs'"),
    (dict(base="vivid-text.pkl"), r"base_model: vivid-text\.pkl is not a usable VIVID checkpoint.*vivid-text\.pkl"),
    (dict(guidance="vivid-evil.pkl"), r"guidance_model: vivid-evil\.pkl is not a usable VIVID checkpoint"
                                       r".*os\.system"),
    (dict(base="missing.safetensors"), r"base_model: model file 'missing\.safetensors' not found"),
    (dict(base="none"), "base_model: choose"),
    (dict(device="tpu"), "device must be one of"),
    (dict(dtype="fp8"), "dtype must be one of"),
])
def test_loader_errors(args, message):
    with pytest.raises(ValueError, match=message):
        _load(**args)


def test_loader_caches_until_the_file_changes(models_root):
    first = _load()
    again = _load()
    assert again.base is first.base and again.sr is first.sr
    assert _load(dtype="bf16").base is not first.base  # another precision is another net
    path = models_root / "vivid" / "vivid-base.safetensors"
    changed = nv.NVSVIVIDLoader.IS_CHANGED("vivid-base.safetensors", "none", "none", "auto", "fp32")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert nv.NVSVIVIDLoader.IS_CHANGED("vivid-base.safetensors", "none", "none", "auto", "fp32") != changed
    assert _load().base is not first.base


@pytest.mark.parametrize("dtype, weights", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_low_precision_weights_run_on_cpu(dtype, weights):
    models = _load(dtype=dtype)
    assert models.dtype == weights and models.base.unet.emb_fourier.freqs.dtype == torch.float32
    assert models.autocast_dtype == (torch.bfloat16 if dtype == "bf16" else None)
    images, _ = _sample(models, n=2, steps=2, super_resolution=True)
    assert images.shape == (2, 16, 16, 3) and torch.isfinite(images).all()


# ----------------------------------------------------------------------------------------------- sampler
def test_sampler_outputs_base_and_sr():
    models = _load()
    images, info = _sample(models, n=3)
    assert images.shape == (3, 8, 8, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert torch.equal(images * 255, (images * 255).round())  # 8-bit levels, as the original's PNGs
    sr_images, sr_info = _sample(models, n=3, super_resolution=True)
    assert sr_images.shape == (3, 16, 16, 3) and 0 <= sr_images.min() and sr_images.max() <= 1
    assert "16x16 (SR)" in sr_info and "2 SR steps" in sr_info
    _, fewer = _sample(models, n=1, super_resolution=True, sr_steps=3)
    assert "2 steps + 3 SR steps" in fewer


def test_seeds_are_reproducible_and_batch_independent():
    models = _load()
    one, info = _sample(models, n=4, steps=3, batch_size=1, super_resolution=True)
    four, _ = _sample(models, n=4, steps=3, batch_size=4, super_resolution=True)
    three, _ = _sample(models, n=4, steps=3, batch_size=3, super_resolution=True)
    again, _ = _sample(models, n=4, steps=3, batch_size=3, super_resolution=True)
    assert torch.equal(three, again)
    # Batch composition changes float rounding only (upstream is not bit-exact across batches either).
    for other in (four, three):
        assert (one - other).abs().max() <= 3.5 / 255 and (one != other).float().mean() < 0.01
    assert "seeds 5..8 (seed + index)" in info
    # Target i uses seed + i: the views 1..3 are the views of a run starting at seed 6 from camera 1.
    source, targets = _cameras(4)
    shifted, _ = _sample(models, n=3, steps=3, batch_size=1, super_resolution=True, seed=6,
                         target_cameras=targets[[1, 2, 3]])
    assert (shifted - one[1:]).abs().max() <= 3.5 / 255 and (shifted != one[1:]).float().mean() < 0.01
    other_seed, _ = _sample(models, n=4, steps=3, batch_size=4, super_resolution=True, seed=99)
    assert not torch.equal(other_seed, four)


def test_guidance_changes_the_result_and_one_needs_no_guidance_net():
    models = _load()
    guided, _ = _sample(models, guidance=3.0)
    plain, info = _sample(models, guidance=1.0)
    assert not torch.equal(guided, plain) and "no guidance" in info
    base_only = _load(guidance="none", sr="none")
    alone, _ = _sample(base_only, guidance=1.0)
    assert torch.equal(alone, plain)


@pytest.mark.parametrize("width, height, left, top, side", [
    (40, 24, 8, 0, 24), (24, 40, 0, 8, 24), (25, 24, 0, 0, 24), (27, 24, 2, 0, 24), (32, 32, 0, 0, 32)])
def test_crop_follows_torchvision_center_crop(width, height, left, top, side):
    box = nv.centre_crop_box(height, width)
    assert (box.top, box.left, box.side) == (top, left, side)  # offsets round half to even
    pixels = torch.arange(height * width * 3, dtype=torch.float32).reshape(1, 3, height, width) % 256
    assert torch.equal(nv.crop_and_resize(pixels, side), pixels[..., top:top + side, left:left + side])
    small = nv.crop_and_resize(pixels, 8)
    assert small.shape == (1, 3, 8, 8) and torch.equal(small, small.round()) and 0 <= small.min() and small.max() <= 255


def test_crop_is_reported_and_used():
    models = _load()
    source, targets = _cameras(2, width=40, height=24)
    image = _image(40, 24)
    images, info = _sample(models, n=2, source_image=image, source_camera=source, target_cameras=targets)
    assert "source 40x24: centre crop 24x24 at x=8, y=0, resized to 8x8" in info
    # Only the crop matters: changing pixels outside it changes nothing.
    outside = image.clone()
    outside[:, :, :8] = 0.0
    outside[:, :, 32:] = 1.0
    same, _ = _sample(models, n=2, source_image=outside, source_camera=source, target_cameras=targets)
    assert torch.equal(same, images)
    inside = image.clone()
    inside[:, :, 8:32] = 1 - inside[:, :, 8:32]
    different, _ = _sample(models, n=2, source_image=inside, source_camera=source, target_cameras=targets)
    assert not torch.equal(different, images)


def test_alpha_is_composited_over_white():
    models = _load()
    rgb = _image()
    rgba = torch.cat([torch.rand(1, 32, 32, 3), torch.zeros(1, 32, 32, 1)], dim=-1)  # fully transparent
    white, _ = _sample(models, source_image=torch.ones(1, 32, 32, 3))
    transparent, info = _sample(models, source_image=rgba)
    assert torch.equal(white, transparent) and "alpha composited over white" in info
    opaque, _ = _sample(models, source_image=torch.cat([rgb, torch.ones(1, 32, 32, 1)], dim=-1))
    assert torch.equal(opaque, _sample(models, source_image=rgb)[0])


def test_translation_scale_changes_the_label():
    models = _load()
    near, _ = _sample(models, translation_scale=1.0)
    far, info = _sample(models, translation_scale=3.0)
    assert not torch.equal(near, far) and "translation x3" in info


def test_published_intrinsics_quirk_changes_the_label(monkeypatch):
    seen, labels = [], []
    real = nv.geometry_from_cameras

    def recording(*args, **kwargs):
        seen.append(args[4:] or tuple(kwargs.values()))
        labels.append(real(*args, **kwargs))
        return labels[-1]

    monkeypatch.setattr(nv, "geometry_from_cameras", recording)
    models = _load()
    # Non-square frames larger than the quirk's first size, or the double resize changes nothing.
    source = cam.Cameras.from_spherical(math.radians(10), 0.0, 2.5, math.radians(40), 240, 160)
    wide = dict(source_image=_image(240, 160), source_camera=source)
    _sample(models, **wide)
    _sample(models, published_intrinsics_quirk=True, **wide)
    _sample(models, published_intrinsics_quirk=True, super_resolution=True, guidance=1.0, **wide)
    # Tiny random nets saturate, so compare what they are given: the source intrinsics in the label.
    assert not torch.allclose(labels[0][:, 12:14], labels[1][:, 12:14])
    assert torch.equal(labels[0][:, :12], labels[1][:, :12])
    assert seen[0] == (None,) and seen[1] == ((4 * models.resolution, models.resolution),)
    assert seen[2] == seen[3] == ((models.sr_resolution, models.resolution),)


def test_progress_counts_every_step_and_interrupt_stops(monkeypatch):
    models = _load()
    seen = []

    def factory(total, desc=""):
        seen.append(total)
        return progress_mod.Progress(total, desc, on_update=lambda done, tot: seen.append(("step", done)))

    monkeypatch.setattr(host, "progress_factory", lambda: factory)
    _sample(models, n=3, steps=2, batch_size=2, super_resolution=True, sr_steps=3)
    assert seen[0] == 2 * (2 + 3) and seen[-1] == ("step", 10) and len(seen) == 11  # one bar: 2 batches

    def stopping(total, desc=""):
        return progress_mod.Progress(total, desc, should_stop=lambda: len(seen) > 13,
                                     on_update=lambda done, tot: seen.append(done))

    monkeypatch.setattr(host, "progress_factory", lambda: stopping)
    with pytest.raises(progress_mod.Interrupted):
        _sample(models, n=3, steps=4, batch_size=1)


def _empty_cameras():
    return cam.Cameras(torch.zeros(0, 4, 4), torch.zeros(0, 4), 32, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance=1.5, base_only=True), r"guidance: 1\.5 needs a guidance net"),
    (dict(super_resolution=True, base_only=True, guidance=1.0), "super_resolution: no SR net"),
    (dict(target_cameras="empty"), "target_cameras: the camera batch is empty"),
    (dict(source_camera="two"), "source_camera: expected exactly one camera"),
    (dict(source_camera="wide"), r"source_camera: made for 64x32 .* source image is 32x32"),
    (dict(source_image=torch.rand(2, 32, 32, 3)), "source_image: expected exactly one source image"),
    (dict(source_image=torch.rand(1, 32, 32, 2)), "source_image: expected RGB or RGBA"),
    (dict(source_image=torch.rand(32, 32, 3)), "source_image: expected an IMAGE tensor"),
    (dict(source_image=torch.full((1, 32, 32, 3), float("nan"))), "source_image: contains NaN"),
    (dict(vivid="not a model"), "vivid: expected the NVS_VIVID output"),
    (dict(steps=1), "steps must be an integer >= 2"),
    (dict(sr_steps=1), "sr_steps must be 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(translation_scale=0.0), "translation_scale must be a finite number > 0"),
    (dict(target_cameras="not cameras"), "target_cameras: expected NVS_CAMERA"),
])
def test_sampler_bad_inputs(kwargs, message):
    models = _load(guidance="none", sr="none") if kwargs.pop("base_only", False) else _load()
    source, targets = _cameras(2)
    special = {"empty": _empty_cameras(), "two": cam.Cameras.cat([source, source]),
               "wide": source.with_size(64, 32)}
    for key in ("target_cameras", "source_camera"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = special.get(kwargs[key], kwargs[key])
    if "vivid" in kwargs:
        models = kwargs.pop("vivid")
    with pytest.raises(ValueError, match=message):
        _sample(models, n=2, **kwargs)


def test_in_memory_models_need_no_files():
    torch.manual_seed(0)
    models = nv.VividModels(loading.build_vivid_network(BASE))
    images, info = _sample(models, n=2, guidance=1.0)
    assert images.shape == (2, 8, 8, 3) and "<in memory>" in models.describe()


# ----------------------------------------------------------------------------------------------- training
@pytest.fixture
def train_dirs(tmp_path, monkeypatch):
    return use_train_dirs(tmp_path, monkeypatch)


def _train(**kwargs):
    return run_train_node(nv.NVSVIVIDTrain, dict(data_source="procedural", network="tiny 16px", steps=2,
                                                 learning_rate=0.01, batch_size=2, seed=1, output_name="tiny_run",
                                                 resume=True, translation_scale=0.25, checkpoint_every=0), **kwargs)


def test_train_procedural_saves_a_loadable_net_and_resumes(train_dirs):
    models, summary = _train()
    assert isinstance(models, nv.VividModels) and models.resolution == 16 and models.guidance is None
    assert "step 2/2 (2 this run" in summary and "loss " in summary and "tiny_run.safetensors" in summary
    saved = train_dirs / "models" / "vivid" / "tiny_run.safetensors"
    assert saved.is_file() and saved.with_suffix(".json").is_file()
    assert (train_dirs / "output" / "nvs_vivid_training" / "tiny_run" / "training-state.safetensors").is_file()
    assert not any(p.requires_grad for p in models.base.parameters())
    loaded = _load(base="tiny_run.safetensors", guidance="none", sr="none")
    for (key, a), b in zip(models.base.state_dict().items(), loaded.base.state_dict().values()):
        assert torch.equal(a, b), key
    source, targets = _cameras(2)
    images, info = nv.NVSVIVIDSampler().sample(models, _image(), source, targets, steps=2, guidance=1.0, seed=0,
                                               batch_size=2, super_resolution=False,
                                               translation_scale=0.25)["result"]
    assert images.shape == (2, 16, 16, 3)
    check_resume_rules(_train, 0.02)


def test_train_on_a_multiview(train_dirs):
    cams = cam.orbit(3, math.radians(20), 0.0, math.radians(120), 2.6, math.radians(45), 24, 24)
    scene = pack.NODE_CLASS_MAPPINGS["NVSProceduralScene"]()
    with torch.inference_mode():
        views = scene.render(seed=2, cameras=cams, background="white")[2]
    models, summary = _train(data_source="multiview", multiview=views, output_name="mv_run.safetensors")
    assert "multiview data" in summary and (train_dirs / "models" / "vivid" / "mv_run.safetensors").is_file()
    assert views.images.is_inference()  # the input itself is left alone


@pytest.mark.parametrize("kwargs, message", COMMON_BAD_INPUTS)
def test_train_bad_inputs(train_dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _train(**kwargs)


def test_train_needs_two_views(train_dirs):
    views = pack.NODE_CLASS_MAPPINGS["NVSProceduralScene"]().render(
        seed=2, cameras=cam.orbit(1, 0.3, 0.0, 1.0, 2.6, 0.8, 16, 16), background="white")[2]
    with pytest.raises(ValueError, match="at least 2 views"):
        _train(data_source="multiview", multiview=views)
