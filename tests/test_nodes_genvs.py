"""GeNVS nodes on tiny random models: loader (formats, demo choice, errors, cache), render preview, sampler,
orbit, input preparation (crop, alpha, cameras) and bad inputs."""
import math
import os
from importlib import import_module
from pathlib import Path

import pytest
import torch

from tests.conftest import load_pack

pack = load_pack()
ng = import_module(f"{pack.__name__}.nodes.nodes_genvs")
nv = import_module(f"{pack.__name__}.nodes.nodes_vivid")
gin = import_module(f"{pack.__name__}.nvs_core.genvs.inputs")
imageio = import_module(f"{pack.__name__}.nvs_core.imageio")
gconfig = import_module(f"{pack.__name__}.nvs_core.genvs.config")
gmodel = import_module(f"{pack.__name__}.nvs_core.genvs.model")
gcams = import_module(f"{pack.__name__}.nvs_core.genvs.cameras")
gpipe = import_module(f"{pack.__name__}.nvs_core.genvs.pipeline")
gorbit = import_module(f"{pack.__name__}.nvs_core.genvs.orbit")
checkpoints = import_module(f"{pack.__name__}.nvs_core.checkpoints")
cam = import_module(f"{pack.__name__}.nvs_core.cameras")
progress_mod = import_module(f"{pack.__name__}.nvs_core.progress")
multiview = import_module(f"{pack.__name__}.nvs_core.multiview")

FOV = math.radians(45)
RADIUS = 2.6


def tiny_config():
    return gconfig.tiny_config(image_size=32, render_size=4, decoder_channels=32, color_feat_dim=8, mapping_out=32,
                               channels=(16, 32))


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = gmodel.build_genvs(tiny_config())
    with torch.no_grad():   # some density, so renders are not pure background
        net.nerf.sigma_color_net.net[-1].bias[0] = 1.0
    return net


def tiny_genvs_model(scene_scale=1.0):
    """An NVS_GENVS holding a tiny random GeNVS network, in memory."""
    return ng.GeNVSModel(tiny_net(), "tiny (in memory)", scene_scale)


def save_tiny(path, seed=0, meta=None, edit=None):
    """A tiny random GeNVS network in our converted format (safetensors + JSON)."""
    state_dict = {k: v.clone() for k, v in tiny_net(seed).state_dict().items()}
    if edit is not None:
        edit(state_dict)
    checkpoints.save_with_config(path, state_dict, {"method": "genvs", "class": "GeNVS",
                                                    "constructor": tiny_config().to_dict(), "meta": meta or {}})
    return path


def save_published(path, seed=0):
    """The same network as the training script saves it: genvs.pt with the denoiser stored twice."""
    sd = dict(tiny_net(seed).state_dict())
    sd.update({"ddpm_pipeline.model." + k[len("ddpm_pipeline."):]: v for k, v in list(sd.items())
               if k.startswith("ddpm_pipeline.")})
    torch.save({"optim": {"state": {}, "param_groups": []}, "model": sd, "step": 3, "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder = root / "genvs"
    folder.mkdir()
    save_tiny(folder / "tiny.safetensors")
    save_tiny(folder / "scaled.safetensors", meta={"scene_scale": 0.5})
    save_tiny(folder / "relative.safetensors", meta={"training": {"normalize_first_view": True}})
    save_published(folder / "genvs.pt")
    save_tiny(folder / "nan.safetensors", edit=lambda sd: sd["nerf.sigma_color_net.net.1.bias"].fill_(float("nan")))
    checkpoints.save_with_config(folder / "vivid-base.safetensors", {"w": torch.zeros(2)},
                                 {"method": "vivid", "class": "NVPrecond", "constructor": {"a": 1}})
    (folder / "notes.pt").write_bytes(b"this is not a checkpoint")
    return root


@pytest.fixture(autouse=True)
def models_dir(models_root, monkeypatch):
    monkeypatch.setenv("NVS_MODELS_DIR", str(models_root))
    ng.clear_cache()
    yield models_root
    ng.clear_cache()


@pytest.fixture(scope="module")
def genvs():
    return tiny_genvs_model()


def _load(name="tiny.safetensors", device="auto", dtype="fp32", noise="auto", scene_scale=0.0, camera_frame="auto"):
    return ng.NVSGeNVSLoader().load(name, device, dtype, noise, scene_scale, camera_frame)


def _cams(n, azimuth=0.0, sweep=1.0, width=32, height=32, radius=RADIUS):
    return cam.orbit(n, math.radians(15), azimuth, sweep, radius, FOV, width, height)


def _images(n, width=32, height=32, channels=3, seed=0):
    return torch.rand(n, height, width, channels, generator=torch.Generator().manual_seed(seed))


def _looking_away():
    """A camera outside the cube that looks away from it."""
    c2w = cam.look_at(torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, 6.0]]))
    return cam.Cameras(c2w, torch.tensor([0.6, 0.6, 0.5, 0.5]), 32, 32)


# ----------------------------------------------------------------------------------------------- loader
def test_loader_lists_files_and_the_demo_only_when_it_exists(monkeypatch, tmp_path):
    monkeypatch.setattr(ng, "DEMO_PATH", tmp_path / "missing.safetensors")
    spec = ng.NVSGeNVSLoader.INPUT_TYPES()["required"]["model"]
    assert "tiny.safetensors" in spec[0] and "genvs.pt" in spec[0] and ng.DEMO_CHOICE not in spec[0]
    assert not any(name.endswith(".json") for name in spec[0])
    with pytest.raises(ValueError, match="bundled demo model .* is missing"):
        _load(ng.DEMO_CHOICE)
    demo = save_tiny(tmp_path / "genvs_procedural.safetensors", meta={"scene_scale": 0.25})
    monkeypatch.setattr(ng, "DEMO_PATH", demo)
    spec = ng.NVSGeNVSLoader.INPUT_TYPES()["required"]["model"]
    assert ng.DEMO_CHOICE in spec[0] and spec[1]["default"] == ng.DEMO_CHOICE
    out = _load(ng.DEMO_CHOICE)
    assert out["result"][0].scene_scale == 0.25 and ng.DEMO_CHOICE in out["ui"]["text"][0]


def test_loader_formats_scale_and_noise():
    out = _load("genvs.pt", noise="auto")
    published = out["result"][0]
    assert isinstance(published, ng.GeNVSModel) and "published genvs.pt" in out["ui"]["text"][0]
    assert published.config.denoiser.sigma_max == 50.0 and published.scene_scale == 1.0
    converted = _load("tiny.safetensors")["result"][0]
    for key, value in converted.model.state_dict().items():
        assert torch.equal(published.model.state_dict()[key], value), key
    assert _load("genvs.pt", noise="high")["result"][0].config.denoiser.sigma_max == 80.0
    assert _load("scaled.safetensors")["result"][0].scene_scale == 0.5        # the file's training scale
    assert _load("scaled.safetensors", scene_scale=2.0)["result"][0].scene_scale == 2.0
    text = _load("scaled.safetensors")["ui"]["text"][0]
    assert "scene_scale 0.5" in text and "render 4 px x 8 features" in text and "views 8 px" in text


@pytest.mark.parametrize("args, message", [
    (dict(name="vivid-base.safetensors"), r"model: vivid-base\.safetensors is not a usable GeNVS checkpoint.*"
                                          r"method 'vivid'"),
    (dict(name="notes.pt"), r"model: notes\.pt is not a usable GeNVS checkpoint"),
    (dict(name="nan.safetensors"), r"nan\.safetensors.*NaN"),
    (dict(name="missing.safetensors"), r"model: model file 'missing\.safetensors' not found"),
    (dict(name=""), "model: choose"),
    (dict(device="tpu"), "device must be one of"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(dtype="fp16", device="cpu"), "fp16 runs on a GPU only"),
    (dict(noise="extreme"), "noise must be one of"),
    (dict(scene_scale=-1.0), "scene_scale must be"),
    (dict(camera_frame="camera"), "camera_frame must be one of"),
])
def test_loader_errors(args, message):
    with pytest.raises(ValueError, match=message):
        _load(**args)


def test_loader_caches_until_the_file_changes(models_root):
    first = _load()["result"][0]
    assert _load()["result"][0].model is first.model
    stamp = ng.NVSGeNVSLoader.IS_CHANGED("tiny.safetensors", "auto", "fp32", "auto", 0.0)
    path = models_root / "genvs" / "tiny.safetensors"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert ng.NVSGeNVSLoader.IS_CHANGED("tiny.safetensors", "auto", "fp32", "auto", 0.0) != stamp
    assert _load()["result"][0].model is not first.model


def test_bf16_compute_runs_on_cpu():
    out = _load(dtype="bf16")
    genvs = out["result"][0]
    assert genvs.dtype == torch.float32 and genvs.autocast_dtype == torch.bfloat16
    assert "weights float32, compute bfloat16" in out["ui"]["text"][0]
    assert _load()["result"][0].model is genvs.model          # one cached network for every precision
    images, _ = ng.NVSGeNVSSampler().sample(genvs, _images(1), _cams(1), _cams(2, 0.4), steps=2)["result"]
    assert images.shape == (2, 8, 8, 3) and torch.isfinite(images).all()


def test_camera_frame_from_the_file_or_chosen():
    assert not _load()["result"][0].first_source_frame and not _load("genvs.pt")["result"][0].first_source_frame
    out = _load("relative.safetensors")
    assert out["result"][0].first_source_frame and "camera frame: first source" in out["ui"]["text"][0]
    assert not _load("relative.safetensors", camera_frame="world")["result"][0].first_source_frame
    assert _load(camera_frame="first source")["result"][0].first_source_frame


# ----------------------------------------------------------------------------------------------- inputs
def test_first_view_transform_is_the_training_normalisation():
    poses = gcams.to_genvs(_cams(3, 0.3), 4).poses
    T = gin.first_view_transform(poses[0])
    assert torch.allclose(gin.transform_poses(T, poses.double()), gcams.normalize_first_view(poses), atol=1e-9)

@pytest.mark.parametrize("height, width", [(32, 48), (48, 32), (33, 50), (31, 31), (7, 10)])
def test_centre_crop_is_the_one_the_vivid_node_uses(height, width):
    box = imageio.centre_crop_box(height, width)
    assert nv.centre_crop_box is imageio.centre_crop_box
    assert box.side == min(height, width) and (box.top, box.left) == (round((height - box.side) / 2), round((width - box.side) / 2))


def test_prepare_images_crops_composites_and_resizes():
    rgba = torch.zeros(1, 32, 48, 4)
    rgba[..., 0] = 1.0
    rgba[:, :, 8:40, 3] = 1.0          # opaque red square in the middle, transparent sides
    rgba[:, :, :8, 0] = 0.0
    out, box = gin.prepare_images(rgba, 16)
    assert out.shape == (1, 3, 16, 16) and (box.top, box.left, box.side) == (0, 8, 32)
    assert torch.allclose(out[0, 0], torch.ones(16, 16)) and torch.allclose(out[0, 1:], torch.zeros(2, 16, 16))
    half = torch.full((1, 8, 8, 4), 0.0)
    half[..., 3] = 0.5                  # black at 50 % alpha over white -> mid grey
    assert torch.allclose(gin.prepare_images(half, 8)[0], torch.full((1, 3, 8, 8), 0.5))


def test_cropped_cameras_project_like_the_cropped_image():
    cams = _cams(2, width=48, height=32)
    cropped, box = imageio.crop_cameras(cams)
    assert (cropped.width, cropped.height) == (32, 32) and box.left == 8
    point = torch.tensor([0.3, 0.2, -0.1, 1.0], dtype=torch.float64)
    for c_full, c_crop in ((cams.to_projection(), cropped.to_projection()),):
        full = c_full @ point
        crop = c_crop @ point
        assert torch.allclose(full[:, 0] / full[:, 2] - 8, crop[:, 0] / crop[:, 2], atol=1e-9)
        assert torch.allclose(full[:, 1] / full[:, 2], crop[:, 1] / crop[:, 2], atol=1e-9)


# ----------------------------------------------------------------------------------------------- render
def test_render_preview_outputs(genvs):
    targets = cam.Cameras.cat([_cams(2, 0.3), _looking_away()])
    out = ng.NVSGeNVSRender().render(genvs, _images(2, 48, 32), _cams(2, width=48, height=32), targets, 0, 0)
    features, depth, opacity, info = out["result"]
    assert features.shape == (3, 4, 4, 3) and depth.shape == (3, 4, 4, 3) and opacity.shape == (3, 4, 4)
    assert 0 <= features.min() and features.max() <= 1 and 0 <= depth.min() and depth.max() <= 1
    assert opacity[:2].amin(dim=(1, 2)).min() > 0                 # rays through the cube see density
    assert torch.all(opacity[2] == 0) and torch.all(features[2] == 1) and torch.all(depth[2] == 0)
    assert "sources 48x32: centre crop 32x32 at x=8, y=0 -> 32 px" in info
    assert "target 2: every ray misses the scene cube" in info and out["ui"]["text"] == [info]
    big = ng.NVSGeNVSRender().render(genvs, _images(2), _cams(2), _cams(1, 0.3), 12, 0)["result"]
    assert big[0].shape == (1, 12, 12, 3) and big[2].shape == (1, 12, 12)


# ----------------------------------------------------------------------------------------------- sampler
def _sample(genvs, n=3, **kwargs):
    args = dict(steps=2, stochastic=True, cfg=1.0, seed=5, batch_size=2)
    args.update(kwargs)
    images = args.pop("source_images", _images(2))
    sources = args.pop("source_cameras", _cams(2))
    targets = args.pop("target_cameras", _cams(n, 0.4))
    out = ng.NVSGeNVSSampler().sample(genvs, images, sources, targets, **args)
    assert out["ui"]["text"] == [out["result"][1]]
    return out["result"]


def test_sampler_outputs_and_matches_the_core_pipeline(genvs):
    images, info = _sample(genvs)
    assert images.shape == (3, 8, 8, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert "seeds 5..7 (seed + index)" in info and "2 steps, stochastic" in info
    src = gcams.to_genvs(_cams(2), 4)
    tgt = gcams.to_genvs(_cams(3, 0.4), 4)
    sources01 = _images(2).permute(0, 3, 1, 2)
    core = gpipe.generate_views(genvs.model, sources01, src, tgt, steps=2, seed=5, noise="per_target",
                                progress=progress_mod.silent_progress)["images"]
    assert torch.allclose(images, core.permute(0, 2, 3, 1), atol=1e-4)


def test_first_source_frame_matches_relative_cameras(genvs):
    relative = ng.GeNVSModel(genvs.model, "relative", 1.0, first_source_frame=True)
    images, _ = _sample(relative, n=2, seed=4, source_cameras=_cams(1, 0.2), source_images=_images(1))
    both = gcams.to_genvs(cam.Cameras.cat([_cams(1, 0.2), _cams(2, 0.4)]), 4, normalize=True)
    core = gpipe.generate_views(genvs.model, _images(1).permute(0, 3, 1, 2), both[0], both[[1, 2]], steps=2, seed=4,
                                noise="per_target", progress=progress_mod.silent_progress)["images"]
    assert torch.allclose(images, core.permute(0, 2, 3, 1), atol=1e-4)
    world = _sample(genvs, n=2, seed=4, source_cameras=_cams(1, 0.2), source_images=_images(1))[0]
    assert not torch.allclose(world, images, atol=1e-3)
    # the circle is the same world circle in either frame
    a = ng.NVSGeNVSOrbit().orbit(relative, _images(1), _cams(1), steps=1, frames=3)["result"][1]
    b = ng.NVSGeNVSOrbit().orbit(genvs, _images(1), _cams(1), steps=1, frames=3)["result"][1]
    assert torch.allclose(a.c2w, b.c2w, atol=1e-6)


def test_seeds_are_per_target_and_batch_independent(genvs):
    images, _ = _sample(genvs, n=3, batch_size=2)
    assert torch.allclose(_sample(genvs, n=3, batch_size=1)[0], images, atol=1e-4)
    later = _sample(genvs, target_cameras=_cams(3, 0.4)[[1, 2]], seed=6)[0]
    assert torch.allclose(later, images[1:], atol=1e-4)
    assert not torch.allclose(_sample(genvs, seed=9)[0], images)
    deterministic = _sample(genvs, stochastic=False, cfg=2.0)
    assert "deterministic, cfg 2" in deterministic[1] and torch.isfinite(deterministic[0]).all()


def test_targets_with_different_intrinsics_render_with_their_own(genvs):
    wide = cam.orbit(1, 0.2, 0.6, 1.0, RADIUS, math.radians(60), 32, 32)
    targets = cam.Cameras.cat([_cams(2, 0.4), wide])
    mixed, _ = _sample(genvs, target_cameras=targets, seed=5)
    alone, _ = _sample(genvs, target_cameras=wide, seed=7)
    assert torch.allclose(mixed[2:], alone, atol=1e-4)


def test_sampler_progress_per_step_and_interrupt(genvs, monkeypatch):
    seen = []

    def factory(total, desc=""):
        return progress_mod.Progress(total, desc, on_update=lambda done, tot: seen.append((done, tot)))

    monkeypatch.setattr(ng.host, "progress_factory", lambda: factory)
    _sample(genvs, n=2, steps=3)
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def stopping(total, desc=""):
        return progress_mod.Progress(total, desc, should_stop=lambda: len(seen) > 4,
                                     on_update=lambda done, tot: seen.append(done))

    monkeypatch.setattr(ng.host, "progress_factory", lambda: stopping)
    with pytest.raises(progress_mod.Interrupted):
        _sample(genvs, n=2, steps=5)
    with pytest.raises(progress_mod.Interrupted):
        ng.NVSGeNVSOrbit().orbit(genvs, _images(1), _cams(1), steps=5, frames=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(source_cameras=_cams(3)), r"source_images: 2 images but source_cameras has 3 cameras"),
    (dict(target_cameras=_cams(3)[[]]), r"target_cameras: the camera batch is empty"),
    (dict(source_images=_images(0)), r"source_images: the image batch is empty"),
    (dict(target_cameras=_cams(2, radius=0.8)), r"target_cameras: camera 0, 1 is inside the scene cube"),
    (dict(source_cameras=_cams(2, radius=0.9)), r"source_cameras: camera 0, 1 is inside the scene cube"),
    (dict(source_cameras=_cams(2, width=64, height=32)), r"source_cameras: made for 64x32 images .* 32x32"),
    (dict(source_cameras=cam.Cameras.cat([_cams(1), cam.orbit(1, 0.2, 1.0, 1.0, RADIUS, 0.5, 32, 32)])),
     "different intrinsics"),
    (dict(source_images=_images(2, channels=2)), "3 or 4 channels"),
    (dict(source_images=torch.full((2, 32, 32, 3), float("nan"))), "NaN"),
    (dict(source_cameras="cams"), "source_cameras: expected NVS_CAMERA"),
    (dict(steps=0), "steps must be"),
    (dict(cfg=float("nan")), "cfg must be"),
    (dict(batch_size=0), "batch_size must be"),
])
def test_sampler_bad_inputs(genvs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _sample(genvs, **kwargs)


def test_wrong_model_type():
    with pytest.raises(ValueError, match="genvs: expected the NVS_GENVS output"):
        ng.NVSGeNVSSampler().sample(object(), _images(1), _cams(1), _cams(1, 0.3), steps=2)


def test_scene_scale_moves_cameras_into_the_cube():
    with pytest.raises(ValueError, match=r"inside the scene cube .* after scene_scale 0\.25"):
        _sample(tiny_genvs_model(scene_scale=0.25))


# ----------------------------------------------------------------------------------------------- orbit
def test_orbit_on_the_circle_matches_the_core_orbit(genvs):
    out = ng.NVSGeNVSOrbit().orbit(genvs, _images(1), _cams(1), steps=2, seed=3, frames=4)
    frames, path, views, info = out["result"]
    assert frames.shape == (4, 8, 8, 3) and len(path) == 4 and (path.width, path.height) == (8, 8)
    assert isinstance(views, multiview.MultiView) and torch.equal(views.images, frames)
    src = gcams.to_genvs(_cams(1), 4)
    poses = gcams.circle_path(src.poses[0], 5)[1:]
    core = gorbit.autoregressive_orbit(genvs.model, _images(1).permute(0, 3, 1, 2), src,
                                       gcams.GeNVSCameras(poses, src.intrinsics, src.camera_k, 4), steps=2, seed=3,
                                       progress=progress_mod.silent_progress)
    assert torch.allclose(frames, core["images"].permute(0, 2, 3, 1), atol=1e-4)
    # the path output is the circle in NVS_CAMERA form: same radius, turning about +Y (up)
    radius = _cams(1).centers.norm()
    assert torch.allclose(path.centers.norm(dim=-1), radius.expand(4), atol=1e-4)
    assert torch.allclose(path.centers[:, 1], _cams(1).centers[:, 1].expand(4), atol=1e-4)
    assert "circle of 4 frames" in info and "encoder calls" in info


def test_orbit_on_a_path_and_bad_paths(genvs):
    path = _cams(3, 0.5, 1.5)
    frames, out_path, views, info = ng.NVSGeNVSOrbit().orbit(genvs, _images(2), _cams(2), steps=2,
                                                             path=path)["result"]
    assert frames.shape == (3, 8, 8, 3) and torch.allclose(out_path.c2w, path.c2w, atol=1e-4)
    assert "path of 3 cameras" in info
    mixed = cam.Cameras.cat([_cams(1, 0.4), cam.orbit(1, 0.2, 1.0, 1.0, RADIUS, 0.5, 32, 32)])
    with pytest.raises(ValueError, match="path: the cameras have different intrinsics"):
        ng.NVSGeNVSOrbit().orbit(genvs, _images(1), _cams(1), steps=2, path=mixed)
    with pytest.raises(ValueError, match="path: camera 0 is inside the scene cube"):
        ng.NVSGeNVSOrbit().orbit(genvs, _images(1), _cams(1), steps=2, path=_cams(1, radius=0.5))
    with pytest.raises(ValueError, match="path: the camera batch is empty"):
        ng.NVSGeNVSOrbit().orbit(genvs, _images(1), _cams(1), steps=2, path=_cams(2)[[]])


# ----------------------------------------------------------------------------------------------- workflows
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SCENE_SEED = 1_000_003          # a held-out procedural object (the demo model never saw it)
MODELS_NOTE = (
    "**Model** (loader): `{demo}` is the small GeNVS model bundled with the pack (32-px views, trained on the "
    "pack's procedural objects: white background, cameras 2.6 units from the object with a 45 degree field of "
    "view, poses relative to the first source). The published `genvs.pt` (SRN cars, 128-px views; "
    "HF `JFoz/genvs-unofficial`) or converted `.safetensors` + `.json` files go in `ComfyUI/models/nvs/genvs/`; "
    "for SRN-style cars use cameras 1.3 units from the object with a 52 degree field of view and 250 "
    "stochastic steps (the published sampler).\n\n"
    "Sources of any size are composited over white, centre-cropped to a square and resized; the crop is "
    "reported in `info`. The scene must fit in the cube [-1, 1]^3 (after `scene_scale`) and cameras must be "
    "outside it.")


def build_workflows():
    """The shipped GeNVS example workflows, built from the node definitions (run this module to rewrite them)."""
    saved = ng.DEMO_PATH
    ng.DEMO_PATH = Path(__file__)      # the demo entry is listed whether or not the model file is there yet
    try:
        return _build_workflows()
    finally:
        ng.DEMO_PATH = saved


def _build_workflows():
    from tests.ui_workflow import UIWorkflow

    demo = ng.DEMO_CHOICE
    out = {}
    # novel views: render preview + sampling on cameras from the camera nodes, ground truth alongside
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    loader = wf.add("NVSGeNVSLoader", (40, 40), size=(340, 220), model=demo)
    src_cam = wf.add("NVSCamera", (40, 300), title="Source camera", size=(340, 220), elevation=20.0, azimuth=0.0,
                     radius=2.6, fov=45.0, width=64, height=64)
    scene = wf.add("NVSProceduralScene", (40, 560), title="Source view (procedural object)", size=(340, 190),
                   seed=SCENE_SEED, background="white", supersampling=2)
    targets = wf.add("NVSOrbitCameras", (40, 790), title="Target cameras", size=(340, 260), count=6, elevation=20.0,
                     azimuth_start=-90.0, azimuth_sweep=180.0, radius=2.6, fov=45.0, width=32, height=32)
    render = wf.add("NVSGeNVSRender", (420, 40), size=(360, 210), seed=0)
    sampler = wf.add("NVSGeNVSSampler", (420, 290), size=(360, 320), steps=50, stochastic=True, cfg=1.0, seed=0,
                     batch_size=6, published_train_mode=False)
    truth = wf.add("NVSProceduralScene", (420, 650), title="Ground truth at the targets", size=(360, 190),
                   seed=SCENE_SEED, background="white", supersampling=2)
    preview_src = wf.add("PreviewImage", (420, 880), title="Source", size=(360, 280))
    preview_render = wf.add("PreviewImage", (820, 40), title="Render preview (features)", size=(420, 300))
    preview_depth = wf.add("PreviewImage", (820, 380), title="Render preview (depth)", size=(420, 300))
    save = wf.add("SaveImage", (1280, 40), title="Novel views", size=(460, 340), filename_prefix="NVS/genvs")
    preview_truth = wf.add("PreviewImage", (1280, 420), title="Ground truth", size=(460, 260))
    wf.add("MarkdownNote", (820, 720), title="Read me", size=(920, 340), text=(
        "## GeNVS novel views\n\n" + MODELS_NOTE.format(demo=demo) + "\n\nThe render preview shows what the "
        "network's NeRF sees at each target camera before any sampling (the first three feature channels and "
        "the depth): an all-white preview means the camera looks away from the scene. Target *i* uses seed + *i*; "
        "results do not depend on `batch_size`."))
    for src, name, dst, slot in ((src_cam, "cameras", scene, "cameras"), (targets, "cameras", truth, "cameras"),
                                 (loader, "genvs", render, "genvs"), (scene, "images", render, "source_images"),
                                 (src_cam, "cameras", render, "source_cameras"),
                                 (targets, "cameras", render, "target_cameras"),
                                 (loader, "genvs", sampler, "genvs"), (scene, "images", sampler, "source_images"),
                                 (src_cam, "cameras", sampler, "source_cameras"),
                                 (targets, "cameras", sampler, "target_cameras"),
                                 (scene, "images", preview_src, "images"),
                                 (render, "features", preview_render, "images"),
                                 (render, "depth", preview_depth, "images"), (sampler, "images", save, "images"),
                                 (truth, "images", preview_truth, "images")):
        wf.connect(src, name, dst, slot)
    out["genvs_novel_views.json"] = wf.to_json()

    # autoregressive orbit: the published circle around the source camera, frames saved, path previewed
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    loader = wf.add("NVSGeNVSLoader", (40, 40), size=(340, 220), model=demo)
    src_cam = wf.add("NVSCamera", (40, 300), title="Source camera", size=(340, 220), elevation=20.0, azimuth=0.0,
                     radius=2.6, fov=45.0, width=64, height=64)
    scene = wf.add("NVSProceduralScene", (40, 560), title="Source view (procedural object)", size=(340, 190),
                   seed=SCENE_SEED, background="white", supersampling=2)
    orbit = wf.add("NVSGeNVSOrbit", (420, 40), size=(360, 330), steps=50, stochastic=True, cfg=1.0, seed=0,
                   frames=11, published_train_mode=False, max_cached_volumes=8)
    save = wf.add("SaveImage", (820, 40), title="Orbit frames", size=(520, 360), filename_prefix="NVS/genvs_orbit")
    rig = wf.add("NVSCameraPreview", (420, 420), size=(360, 180), viewer_elevation=30.0, viewer_azimuth=30.0,
                 frustum_scale=0.15)
    preview_rig = wf.add("PreviewImage", (420, 650), title="Orbit path", size=(360, 320))
    preview_src = wf.add("PreviewImage", (40, 790), title="Source", size=(340, 280))
    wf.add("MarkdownNote", (820, 440), title="Read me", size=(520, 420), text=(
        "## GeNVS autoregressive orbit\n\n" + MODELS_NOTE.format(demo=demo) + "\n\nViews are generated one at a "
        "time (the published `sample_ar.py` schedule): each is conditioned on the sources, up to 4 earlier "
        "generated views and the latest one, and then joins the pool. Without a `path` the orbit is the "
        "published circle about the vertical axis through the first source camera (`frames` new views; the "
        "source's own pose is skipped). Connect any NVS_CAMERA batch to `path` to follow it instead; the "
        "`multiview` output carries the frames with their cameras."))
    for src, name, dst, slot in ((src_cam, "cameras", scene, "cameras"), (loader, "genvs", orbit, "genvs"),
                                 (scene, "images", orbit, "source_images"),
                                 (src_cam, "cameras", orbit, "source_cameras"), (orbit, "frames", save, "images"),
                                 (orbit, "path", rig, "cameras"), (rig, "image", preview_rig, "images"),
                                 (scene, "images", preview_src, "images")):
        wf.connect(src, name, dst, slot)
    out["genvs_orbit.json"] = wf.to_json()
    return out


def test_example_workflows_are_the_built_ones():
    from tests.ui_workflow import assert_workflows_built

    assert_workflows_built(WORKFLOWS, build_workflows())


if __name__ == "__main__":
    from tests.ui_workflow import write_workflows

    write_workflows(WORKFLOWS, build_workflows())
