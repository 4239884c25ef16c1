"""NVS-Adapter nodes without ComfyUI: the loader on converted and Lightning files, Apply and the Sampler through
stand-in host objects (a tiny diffusers SD backend in ComfySDBackend's place, the real patch state of
nodes/sd_comfy.py driven as ComfyUI drives it), the bad inputs, and the example workflows."""
import functools
import importlib
import math
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import load_pack

pack = load_pack()


def _core(name):
    """The pack's own nvs_core modules (the classes the nodes check against)."""
    return importlib.import_module(f"{pack.__name__}.nvs_core.{name}")


cam = _core("cameras")
tiny = _core("sd.tiny")
interface = _core("sd.interface")
config = _core("nvsadapter.config")
network = _core("nvsadapter.network")
pipeline = _core("nvsadapter.pipeline")
NVSAdapter = _core("nvsadapter.model").NVSAdapter
save_with_config = _core("checkpoints").save_with_config
nodes_nvsadapter = importlib.import_module(pack.__name__ + ".nodes.nodes_nvsadapter")
sd_comfy = importlib.import_module(pack.__name__ + ".nodes.sd_comfy")
host_module = importlib.import_module(pack.__name__ + ".nodes.host")
Loader = pack.NODE_CLASS_MAPPINGS["NVSAdapterLoader"]
Apply = pack.NODE_CLASS_MAPPINGS["NVSAdapterApply"]
Sampler = pack.NODE_CLASS_MAPPINGS["NVSAdapterSampler"]
TINY = config.TINY_SD
RES = 64          # the tiny VAE halves: 64 px -> 32x32 latents


def tiny_adapter(seed=0):
    return tiny.randomize_(NVSAdapter(TINY), torch.Generator().manual_seed(seed), 0.2).train(False)


def save_tiny(folder, name="nvsa-tiny.safetensors", seed=0) -> Path:
    """A tiny adapter in the converted format (safetensors + JSON)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = tiny_adapter(seed)
    save_with_config(folder / name, adapter.state_dict(), {"method": "nvsadapter", "class": "NVSAdapter",
                                                            "constructor": TINY.to_dict()})
    return folder / name


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path / "models"))
    return save_tiny(tmp_path / "models" / "nvs_adapter").parent


# ------------------------------------------------------------------------------------------ loader
def test_loader_lists_and_loads_converted_files(models_dir):
    spec = Loader.INPUT_TYPES()["required"]
    assert spec["adapter"][0] == ["nvsa-tiny.safetensors"] and spec["adapter"][1]["default"] == "nvsa-tiny.safetensors"
    out = Loader().load("nvsa-tiny.safetensors", use_ema=True, dtype="fp32")
    adapter = out["result"][0]
    assert isinstance(adapter, NVSAdapter) and adapter.config == TINY
    reference = tiny_adapter(0).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in adapter.state_dict().items())
    text = out["ui"]["text"][0]
    assert "nvsa-tiny.safetensors" in text and "16 blocks" in text and "float32" in text
    assert Loader().load("nvsa-tiny.safetensors", dtype="bf16")["result"][0].block(0).support_emb.dtype == torch.bfloat16


def test_loader_ema_switch_on_a_lightning_checkpoint(models_dir):
    from tests.test_nvsadapter_loading import _lightning_checkpoint

    raw, ema = tiny_adapter(1), tiny_adapter(2)
    _lightning_checkpoint(models_dir / "base_query_4_step_200000.ckpt", raw, ema)
    assert Loader.INPUT_TYPES()["required"]["adapter"][1]["default"] == "base_query_4_step_200000.ckpt"
    for use_ema, source in ((True, ema), (False, raw)):
        loaded = Loader().load("base_query_4_step_200000.ckpt", use_ema=use_ema, dtype="fp32")["result"][0]
        expected = source.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_loader_errors_and_is_changed(models_dir):
    with pytest.raises(ValueError, match="adapter: model file 'missing.ckpt' not found"):
        Loader().load("missing.ckpt")
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(models_dir / "sd.safetensors"))
    with pytest.raises(ValueError, match="adapter: .*Stable Diffusion checkpoint without NVS-Adapter tensors"):
        Loader().load("sd.safetensors")
    before = Loader.IS_CHANGED("nvsa-tiny.safetensors")
    save_tiny(models_dir, seed=5)
    assert Loader.IS_CHANGED("nvsa-tiny.safetensors") != before


# ------------------------------------------------------------------------------------------ host stand-ins
class FakeSampling:
    def timestep(self, sigma):
        return (torch.as_tensor(sigma) * 100).round()


class FakePatched:
    """What Apply does to the patched ModelPatcher clone, recorded."""

    def __init__(self, patch):
        self.patch, self.cfg_function, self.cfg1 = patch, None, None

    def set_model_sampler_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.cfg_function, self.cfg1 = fn, disable_cfg1_optimization


@functools.lru_cache(maxsize=None)
def _parts():
    diffusers_backend = _core("sd.diffusers_backend")

    class StandIn(diffusers_backend.DiffusersSDBackend):
        def patched_model(self, patches):
            return FakePatched(sd_comfy.ComfyPatch(patches, FakeSampling()))

    g = torch.Generator().manual_seed(0)
    backend = StandIn(tiny.randomize_(tiny.tiny_unet(0), g, 0.2), tiny.tiny_clip(0), None, tiny.tiny_vae(0))
    vision = tiny.tiny_clip_vision(0)
    text = torch.randn(1, 16, 32, generator=g)
    return backend, vision, text


@pytest.fixture
def host(monkeypatch):
    """Stand-ins for MODEL/CLIP/VAE/CLIP_VISION: ComfySDBackend -> the tiny diffusers backend, the CLIP vision
    encoder -> a tiny transformers model, the empty prompt -> a fixed (1, 16, 32) context."""
    backend, vision, text = _parts()
    prompts = []

    def make_backend(model, vae=None):
        model.backends.append(vae)
        return model.backend

    def encode_prompt(clip, prompt):
        prompts.append(prompt)
        return [[clip.text, {}]]

    monkeypatch.setattr(sd_comfy, "ComfySDBackend", make_backend)
    monkeypatch.setattr(sd_comfy, "encode_prompt", encode_prompt)
    monkeypatch.setattr(sd_comfy, "clip_vision_encoder", lambda cv: lambda px: cv(pixel_values=px).image_embeds)
    unet_config = {"context_dim": 32, "model_channels": 32, "channel_mult": [1, 1, 2, 2], "in_channels": 4}
    model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(
        unet_config=unet_config)), backend=backend, backends=[])
    return types.SimpleNamespace(model=model, clip=types.SimpleNamespace(text=text), vae="vae", clip_vision=vision,
                                 backend=backend, prompts=prompts)


def _cameras(elevations, azimuths, size=RES):
    return cam.Cameras.from_spherical([math.radians(e) for e in elevations], [math.radians(a) for a in azimuths], 1.5,
                                      math.radians(49.1), size, size)


def _image(seed=0, height=RES, width=RES, channels=3):
    return torch.rand(1, height, width, channels, generator=torch.Generator().manual_seed(seed))


def _args(host, **kwargs):
    return dict(model=host.model, clip=host.clip, vae=host.vae, clip_vision=host.clip_vision,
                nvs_adapter=tiny_adapter(), reference_image=_image(), reference_camera=_cameras([0], [0]),
                target_cameras=_cameras([0, 20, -10], [90, 180, 270]), cfg=3.0, resolution=RES) | kwargs


# ------------------------------------------------------------------------------------------ sampler
def test_sampler_is_the_published_pipeline_with_progress(host, monkeypatch):
    updates = []
    progress = _core("progress")

    def factory():
        return lambda total, desc="": progress.Progress(total, desc, on_update=lambda d, n: updates.append((d, n)))

    monkeypatch.setattr(host_module, "progress_factory", factory)
    args = _args(host)
    out = Sampler().sample(**args, steps=2, seed=4, views_per_batch=2)
    images = out["result"][0]
    assert images.shape == (3, RES, RES, 3) and 0 <= images.min() and images.max() <= 1
    assert updates[-1] == (4, 4) and len(updates) == 4  # 2 groups x 2 steps, one bar
    assert host.prompts == [""] and host.model.backends == ["vae"]
    info = out["ui"]["text"][0]
    assert "3 target views in 2 group(s) of up to 2" in info and "seed 4" in info and "no mask" in info
    reference = args["reference_image"].movedim(-1, 1)
    emb = pipeline.clip_image_embedding(host.clip_vision, pipeline.prepare_reference(reference, None, RES))
    with torch.no_grad():
        expected = pipeline.generate_views(host.backend, args["nvs_adapter"], reference, args["reference_camera"],
                                           args["target_cameras"], emb, host.clip.text, cfg_scale=3.0, steps=2, seed=4,
                                           views_per_batch=2, resolution=RES)
    assert torch.equal(images, expected.movedim(1, -1))


def test_sampler_masks_crops_and_interrupts(host, monkeypatch):
    rgba = _image(1, RES, RES + 20, 4)
    rgba[..., 3] = 0
    rgba[:, 20:40, 30:50, 3] = 1
    load_image_mask = 1 - rgba[..., 3]                # LoadImage: 1 = transparent
    args = _args(host, target_cameras=_cameras([10], [45]))
    from_alpha = Sampler().sample(**(args | dict(reference_image=rgba)), steps=1)
    from_mask = Sampler().sample(**(args | dict(reference_image=rgba[..., :3], reference_mask=load_image_mask)), steps=1)
    as_object = Sampler().sample(**(args | dict(reference_image=rgba[..., :3], reference_mask=rgba[..., 3],
                                                mask_meaning="1 = object")), steps=1)
    assert torch.equal(from_alpha["result"][0], from_mask["result"][0])
    assert torch.equal(from_alpha["result"][0], as_object["result"][0])
    assert "centre crop 64x64 at x=10, y=0" in from_mask["ui"]["text"][0]
    plain = Sampler().sample(**(args | dict(reference_image=rgba[..., :3])), steps=1)
    no_alpha = Sampler().sample(**(args | dict(reference_image=rgba[..., :3], reference_mask=torch.zeros(1, 64, 64))),
                                steps=1)  # LoadImage's mask of a photo without transparency
    assert torch.equal(plain["result"][0], no_alpha["result"][0]) and "no mask" in no_alpha["ui"]["text"][0]
    assert "background made white" in from_mask["ui"]["text"][0]
    progress = _core("progress")

    def stop():
        raise RuntimeError("interrupted by the user")

    monkeypatch.setattr(host_module, "progress_factory",
                        lambda: lambda total, desc="": progress.Progress(total, desc, should_stop=stop))
    with pytest.raises(RuntimeError, match="interrupted by the user"):
        Sampler().sample(**args, steps=2)


# ------------------------------------------------------------------------------------------ apply
def test_apply_patches_for_stock_samplers(host):
    args = _args(host)
    model, positive, negative, latent = Apply().apply(**args)["result"]
    assert latent["samples"].shape == (3, 4, RES // 2, RES // 2) and not latent["samples"].any()
    assert torch.equal(positive[0][0], host.clip.text) and torch.equal(negative[0][0], host.clip.text)
    # in-model CFG whatever the sampler's cfg, and the unconditional chunk runs at cfg 1
    assert model.cfg1 is True
    cond, uncond = torch.full((2,), 3.0), torch.ones(2)
    assert torch.equal(model.cfg_function({"cond": cond, "uncond": uncond, "cond_scale": 1.0}), torch.full((2,), 7.0))
    call = model.patch.patches.unet_wrapper
    reference = pipeline.prepare_reference(args["reference_image"].movedim(-1, 1), None, RES)
    with torch.no_grad():
        latents = host.backend.encode_images(reference, sample=False)
    rays = _core("nvsadapter.cameras").rays_context_for_cameras(args["reference_camera"], args["target_cameras"], RES, 2)
    assert torch.equal(call.condition.reference_latents, latents[:, None])
    assert torch.equal(call.condition.rays_context, rays)
    emb = pipeline.clip_image_embedding(host.clip_vision, reference)
    assert torch.equal(call.condition.image_context, emb)

    # one UNet call as ComfyUI makes it (positive chunk, timestep 500): the same eps as the faithful batch
    x = torch.randn(3, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(7))
    hook = network.hook_for(args["nvs_adapter"])

    def executor(batch_latents, steps, context, y, control, options):  # the UNet; ComfyUI calls the middle patch
        return host.backend.unet(batch_latents, steps, context, (interface.COND,), hook.patches)

    with torch.no_grad():
        got = model.patch.diffusion_model(executor, x, torch.full((3,), 500.0), host.clip.text.expand(3, -1, -1),
                                          None, None, {"cond_or_uncond": [0]})
        batch = network.build_batch(x[None], torch.tensor([500]), host.clip.text, emb, rays, latents[:, None])
        expected = network.adapter_eps(host.backend, args["nvs_adapter"], batch)[0]
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(target_cameras="cams"), "target_cameras: expected NVS_CAMERA"),
    (dict(reference_camera=_cameras([0, 10], [0, 0])), "reference_camera: expected exactly one camera, got 2"),
    (dict(reference_image=torch.rand(2, RES, RES, 3)), "reference_image: expected one reference photo"),
    (dict(reference_image=torch.full((1, RES, RES, 3), float("nan"))), "reference_image: contains NaN"),
    (dict(nvs_adapter="adapter"), "nvs_adapter: expected the NVS_ADAPTER"),
    (dict(resolution=96), "resolution must be a multiple of 64"),
    (dict(cfg=float("inf")), "cfg must be a finite number"),
    (dict(reference_mask=torch.zeros(1, RES, RES), mask_meaning="1 = object"),
     r"reference_mask: the mask leaves no object pixel \(1 = object\)"),
    (dict(reference_mask=torch.ones(1, RES, RES)), r"reference_mask: the mask leaves no object pixel \(1 = background\)"),
    (dict(reference_mask=torch.eye(8)), "reference_mask: expected one 64x64 mask"),
])
def test_bad_inputs(host, change, message):
    with pytest.raises(ValueError, match=message):
        Apply().apply(**_args(host, **change))


def test_empty_target_batch(host):
    targets = _cameras([0], [0])
    targets = cam.Cameras(targets.c2w[:0], targets.intrinsics[:0], RES, RES)
    for node, extra in ((Apply().apply, {}), (Sampler().sample, {"steps": 1})):
        with pytest.raises(ValueError, match="target_cameras: expected at least one camera, got an empty batch"):
            node(**_args(host, target_cameras=targets), **extra)


def test_models_of_another_family_are_refused(host, monkeypatch):
    unet = host.model.model.model_config.unet_config
    monkeypatch.setitem(unet, "context_dim", 24)
    with pytest.raises(ValueError, match="model: its cross-attention takes 24-wide text .an SD 1.x.*SD 2.1 base"):
        Apply().apply(**_args(host))
    monkeypatch.setitem(unet, "context_dim", 32)
    monkeypatch.setitem(unet, "channel_mult", [1, 2, 4, 4])
    with pytest.raises(ValueError, match=r"model: UNet widths \(32, 64, 128, 128\), the NVS-Adapter expects"):
        Apply().apply(**_args(host))
    monkeypatch.setitem(unet, "channel_mult", [1, 1, 2, 2])
    monkeypatch.setattr(host.backend, "prediction_type", "v_prediction")
    with pytest.raises(ValueError, match="model: a v_prediction model .SD 2.1-768.*eps-prediction SD 2.1 base"):
        Sampler().sample(**_args(host), steps=1)


def test_clip_models_of_another_family_are_refused(host):
    with pytest.raises(ValueError, match="clip_vision: 16-d image embeddings; .* needs the 24-d projected embedding "
                                         "of CLIP ViT-H/14"):
        Apply().apply(**_args(host, clip_vision=tiny.tiny_clip_vision(0, projection_dim=16)))
    with pytest.raises(ValueError, match="clip: 24-wide text encodings .an SD 1.x CLIP"):
        Apply().apply(**_args(host, clip=types.SimpleNamespace(text=torch.zeros(1, 16, 24))))


# ------------------------------------------------------------------------------------------ workflows
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
REFERENCE_PHOTO = "deer.png"
MODELS_NOTE = (
    "**Files** (see the pack README):\n"
    f"* `ComfyUI/models/checkpoints/{nodes_nvsadapter.SD_FILE}`: Stable Diffusion 2.1 base (512, eps), the model "
    "the adapter was trained on.\n"
    f"* `ComfyUI/models/clip_vision/{nodes_nvsadapter.CLIP_VISION_FILE}`: OpenCLIP ViT-H/14 (laion2b_s32b_b79k) "
    "vision model.\n"
    f"* `ComfyUI/models/nvs/nvs_adapter/{nodes_nvsadapter.PUBLISHED_FILE}`: the published adapter checkpoint "
    "(only its adapter tensors are read, EMA weights by default).\n"
    f"* `ComfyUI/input/{REFERENCE_PHOTO}`: the reference photo (the RGBA example `deer.png` of kakaobrain/"
    "nvs-adapter, MIT; any photo of one object works). LoadImage's mask (its transparency) makes the background "
    "white, as the original does.\n\n"
    "Cameras: the reference is the published view (elevation 0, azimuth 0, radius 1.5, field of view 49.1); only "
    "the targets' pose relative to it and their field of view matter.")


def build_workflows():
    """The two example workflows (regenerate with ``python -m tests.test_nodes_nvsadapter``)."""
    from tests.ui_workflow import UIWorkflow

    out = {}

    def common(wf):
        ckpt = wf.add("CheckpointLoaderSimple", (40, 40), size=(340, 100), ckpt_name=nodes_nvsadapter.SD_FILE)
        vision = wf.add("CLIPVisionLoader", (40, 180), size=(340, 60), clip_name=nodes_nvsadapter.CLIP_VISION_FILE)
        loader = wf.add("NVSAdapterLoader", (40, 290), size=(340, 110), adapter=nodes_nvsadapter.PUBLISHED_FILE)
        image = wf.add("LoadImage", (40, 450), title="Reference photo", size=(340, 330), image=REFERENCE_PHOTO,
                       extra_widgets=("image",))
        ref = wf.add("NVSCamera", (40, 830), title="Reference camera (published)", size=(340, 200), elevation=0.0,
                     azimuth=0.0, radius=1.5, fov=49.1, width=256, height=256)
        return ckpt, vision, loader, image, ref

    def wire(wf, ckpt, vision, loader, image, ref, targets, node):
        for src, name, slot in ((ckpt, "MODEL", "model"), (ckpt, "CLIP", "clip"), (ckpt, "VAE", "vae"),
                                (vision, "CLIP_VISION", "clip_vision"), (loader, "nvs_adapter", "nvs_adapter"),
                                (image, "IMAGE", "reference_image"), (image, "MASK", "reference_mask"),
                                (ref, "cameras", "reference_camera"), (targets, "cameras", "target_cameras")):
            wf.connect(src, name, node, slot)

    # four views at chosen elevations/azimuths: the published sampler, and the same views with a stock KSampler
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt, vision, loader, image, ref = common(wf)
    views = [(20.0, 45.0), (20.0, 135.0), (-10.0, 225.0), (-10.0, 315.0)]
    cams = [wf.add("NVSCamera", (420, 40 + 250 * i), title=f"Target {i + 1}", size=(300, 200), elevation=e,
                   azimuth=a, radius=1.5, fov=49.1, width=256, height=256) for i, (e, a) in enumerate(views)]
    batch1 = wf.add("NVSCameraBatch", (760, 40), title="Targets 1-2", size=(300, 80), select="")
    batch2 = wf.add("NVSCameraBatch", (760, 160), title="Targets 1-3", size=(300, 80), select="")
    batch3 = wf.add("NVSCameraBatch", (760, 280), title="Targets 1-4", size=(300, 80), select="")
    for a, b, dst in ((cams[0], cams[1], batch1), (batch1, cams[2], batch2), (batch2, cams[3], batch3)):
        wf.connect(a, "cameras", dst, "cameras")
        wf.connect(b, "cameras", dst, "cameras_2")
    rig = wf.add("NVSCameraPreview", (760, 520), title="Camera rig", size=(300, 160), viewer_elevation=30.0,
                 viewer_azimuth=30.0, frustum_scale=0.15)
    rig_preview = wf.add("PreviewImage", (760, 730), title="Reference and targets", size=(300, 300))
    rig_batch = wf.add("NVSCameraBatch", (760, 400), title="Reference + targets", size=(300, 80), select="")
    wf.connect(ref, "cameras", rig_batch, "cameras")
    wf.connect(batch3, "cameras", rig_batch, "cameras_2")
    wf.connect(rig_batch, "cameras", rig, "cameras")
    wf.connect(rig, "image", rig_preview, "images")
    sampler = wf.add("NVSAdapterSampler", (1100, 40), title="NVS-Adapter Sampler (published sampling)",
                     size=(380, 420), cfg=3.0, steps=50, seed=777, views_per_batch=4)
    wire(wf, ckpt, vision, loader, image, ref, batch3, sampler)
    save = wf.add("SaveImage", (1520, 40), title="Novel views (published sampler)", size=(460, 420),
                  filename_prefix="NVS/nvs_adapter")
    wf.connect(sampler, "images", save, "images")
    apply = wf.add("NVSAdapterApply", (1100, 500), title="NVS-Adapter Apply (stock samplers)", size=(380, 380),
                   cfg=3.0)
    wire(wf, ckpt, vision, loader, image, ref, batch3, apply)
    ksampler = wf.add("KSampler", (1520, 500), size=(320, 270), seed=777, steps=50, cfg=3.0, sampler_name="euler",
                      scheduler="simple", denoise=1.0)
    for name, slot in (("model", "model"), ("positive", "positive"), ("negative", "negative"),
                       ("latent", "latent_image")):
        wf.connect(apply, name, ksampler, slot)
    decode = wf.add("VAEDecode", (1520, 810), size=(220, 50))
    wf.connect(ksampler, "LATENT", decode, "samples")
    wf.connect(ckpt, "VAE", decode, "vae")
    save2 = wf.add("SaveImage", (1880, 500), title="Novel views (KSampler)", size=(420, 380),
                   filename_prefix="NVS/nvs_adapter_ksampler")
    wf.connect(decode, "IMAGE", save2, "images")
    wf.add("MarkdownNote", (40, 1080), title="Read me", size=(1020, 260), text=(
        "## NVS-Adapter: four novel views of one photo\n\n" + MODELS_NOTE + "\n\nTop: **NVS-Adapter Sampler**, "
        "the published 50-step Euler with in-model CFG (scale 3; the demo used 11), the four targets generated "
        "jointly. Bottom: the same views through **NVS-Adapter Apply** + ComfyUI's KSampler (any sampler; euler + "
        "simple, 50 steps gives the published timesteps; the patched model applies Apply's cfg itself). Delete the "
        "branch you do not need."))
    out["nvs_adapter_four_views.json"] = wf.to_json()

    # orbit frames: 16 views around the object, generated 4 at a time with the same reference
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt, vision, loader, image, ref = common(wf)
    orbit = wf.add("NVSOrbitCameras", (420, 40), title="Orbit", size=(320, 280), count=16, elevation=15.0,
                   azimuth_start=0.0, azimuth_sweep=360.0, radius=1.5, fov=49.1, width=256, height=256)
    rig = wf.add("NVSCameraPreview", (420, 370), title="Orbit path", size=(320, 160), viewer_elevation=30.0,
                 viewer_azimuth=30.0, frustum_scale=0.15)
    rig_preview = wf.add("PreviewImage", (420, 580), title="Orbit path preview", size=(320, 300))
    wf.connect(orbit, "cameras", rig, "cameras")
    wf.connect(rig, "image", rig_preview, "images")
    sampler = wf.add("NVSAdapterSampler", (780, 40), size=(380, 420), cfg=3.0, steps=50, seed=777, views_per_batch=4)
    wire(wf, ckpt, vision, loader, image, ref, orbit, sampler)
    save = wf.add("SaveImage", (1200, 40), title="Orbit frames", size=(520, 420), filename_prefix="NVS/nvs_adapter_orbit")
    wf.connect(sampler, "images", save, "images")
    wf.add("MarkdownNote", (780, 500), title="Read me", size=(940, 300), text=(
        "## NVS-Adapter: orbit frames\n\n" + MODELS_NOTE + "\n\n16 frames around the object at elevation 15, "
        "generated 4 at a time (`views_per_batch`, as the released model was trained); every group sees the same "
        "reference photo, so frames of different groups are not jointly consistent. The frames are saved in orbit "
        "order (feed them to a video node for a turntable)."))
    out["nvs_adapter_orbit.json"] = wf.to_json()
    return out


def test_example_workflows_are_the_built_ones():
    from tests.ui_workflow import assert_workflows_built

    assert_workflows_built(WORKFLOWS, build_workflows())


if __name__ == "__main__":
    from tests.ui_workflow import write_workflows

    write_workflows(WORKFLOWS, build_workflows())
