"""NVS Field Export Mesh node (GLB/OBJ in the output folder, Preview3D path, core MESH stand-in, errors) and
the three RealFusion example workflows, built here from the node definitions."""
import importlib
from pathlib import Path

import pytest
import torch

from tests.conftest import load_pack

trimesh = pytest.importorskip("trimesh")

pack = load_pack()
field_module = importlib.import_module(f"{pack.__name__}.nvs_core.realfusion.field")
mesh_module = importlib.import_module(f"{pack.__name__}.nvs_core.realfusion.mesh")
Export = pack.NODE_CLASS_MAPPINGS["NVSFieldExportMesh"]
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
TINY = dict(grid_levels=4, grid_resolution=64, hidden_dim=16, hidden_dim_bg=8, grid_size=16)

# Sample photos as the workflows reference them: <folder>.png (the photo) and <folder>_mask.png (its mask)
# in ComfyUI's input folder, copied from shared/samples/realfusion/<folder>/ (the host test does this).
SAMPLE = "cat_statue"
SAMPLE_IMAGE = f"realfusion_{SAMPLE}.png"
SAMPLE_MASK = f"realfusion_{SAMPLE}_mask.png"
SAMPLE_EMBEDDING = f"realfusion_{SAMPLE}"  # models/embeddings/realfusion_cat_statue.bin (the published file)
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
ADAPTER_CHECKPOINT = "v2-1_512-ema-pruned.safetensors"
ADAPTER_CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


def ball_field():
    class Ball(field_module.RealFusionField):
        def common_forward(self, x):
            r = (x - torch.tensor([0.2, 0.0, 0.0], device=x.device)).norm(dim=-1)
            sigma = 50.0 * torch.sigmoid((0.4 - r) * 60)
            return sigma, torch.stack([torch.ones_like(r), 0.5 * torch.ones_like(r), 0 * r], -1)

    field = Ball(field_module.FieldConfig(**TINY), grid_levels_mask=0)
    field.mean_density = 20.0
    return field


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVS_OUTPUT_DIR", str(tmp_path / "output"))
    return tmp_path / "output"


def export(field, **kwargs):
    args = dict(resolution=24, format="glb", textured=False, filename_prefix="nvs/test_mesh")
    with torch.inference_mode():
        return Export().export(field, **(args | kwargs))


def test_glb_for_preview3d_and_a_core_mesh(out_dir):
    out = export(ball_field())
    path, core_mesh, summary = out["result"]
    assert path == "nvs/test_mesh_00001_.glb" and out["ui"]["text"] == [summary]
    loaded = trimesh.load(out_dir / path, force="mesh")
    assert loaded.is_watertight and loaded.volume > 0
    assert core_mesh.vertices.shape == (1, len(loaded.vertices), 3) and core_mesh.faces.shape[0] == 1
    assert core_mesh.faces.shape[1] == len(loaded.faces) and core_mesh.faces.dtype == torch.int64
    assert "vertex colours" in summary and "level 10" in summary
    again, _, _ = export(ball_field())["result"]
    assert again == "nvs/test_mesh_00002_.glb"  # numbered like ComfyUI's savers


@pytest.mark.skipif(not mesh_module.xatlas_available(), reason="xatlas is not installed")
def test_textured_glb_and_obj(out_dir):
    path, _, summary = export(ball_field(), format="glb+obj", textured=True, texture_size=64)["result"]
    assert path.endswith(".glb") and "texture 64x64" in summary
    obj = out_dir / path.replace(".glb", ".obj")
    assert obj.is_file() and obj.with_suffix(".mtl").is_file()
    assert (obj.parent / f"{obj.stem}_albedo.png").is_file()
    assert len(trimesh.load(out_dir / path, force="mesh").faces) == len(trimesh.load(obj, force="mesh").faces)


def test_obj_only_and_frames(out_dir):
    path, mesh_nvs, _ = export(ball_field(), format="obj")["result"]
    assert path.endswith(".obj")
    _, mesh_rf, _ = export(ball_field(), frame="realfusion")["result"]
    torch.testing.assert_close(mesh_nvs.vertices[..., 0].mean(), -mesh_rf.vertices[..., 0].mean())


def test_empty_field_is_an_error_and_writes_nothing(out_dir):
    field = field_module.RealFusionField(field_module.FieldConfig(**TINY, blob_density=0.0), grid_levels_mask=0)
    with torch.no_grad():
        field.sigma_net.net[-1].weight.zero_()
        field.sigma_net.net[-1].bias[0] = -12.0
    with pytest.raises(ValueError, match="field: .*empty everywhere"):
        export(field)
    assert not out_dir.exists() or not any(out_dir.rglob("*.glb"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(field="not a field"), "NVS_FIELD"), (dict(format="ply"), "format"), (dict(threshold=-1.0), "threshold"),
    (dict(frame="opengl"), "frame")])
def test_bad_inputs(out_dir, kwargs, message):
    args = dict(field=ball_field()) | kwargs
    field = args.pop("field")
    with pytest.raises(ValueError, match=message):
        export(field, **args)


def test_interrupt_stops_the_export(out_dir, monkeypatch):
    progress = importlib.import_module(f"{pack.__name__}.nvs_core.progress")
    host = importlib.import_module(f"{pack.__name__}.nodes.host")
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    monkeypatch.setattr(host, "progress_factory",
                        lambda: (lambda total, desc="": progress.Progress(total, desc, should_stop=stop)))
    with pytest.raises(progress.Interrupted):
        export(ball_field(), resolution=96)
    assert not any(out_dir.rglob("*.glb")) if out_dir.exists() else True


# ----------------------------------------------------------------------------------------- workflows

def _preview3d(wf, src, output, pos, title):
    """A core Preview 3D node whose model_file widget is fed by a link (the editor's widget socket)."""
    node_id = wf.add("Preview3D", pos, title=title, size=(460, 420), model_file="")
    node = wf.nodes[node_id - 1]
    node["inputs"].insert(0, {"name": "model_file", "type": "STRING", "widget": {"name": "model_file"},
                              "link": None})
    wf.connect(src, output, node_id, "model_file")
    return node_id


def build_workflows():
    from tests.ui_workflow import UIWorkflow

    out = {}
    photo_note = (f"**Inputs.** `{SAMPLE_IMAGE}` and `{SAMPLE_MASK}` are `image.png` and `mask.png` of the `{SAMPLE}` "
                  "example of RealFusion (in this pack's shared samples); put them in ComfyUI's `input/` folder. The "
                  f"published textual-inversion token of that photo is `learned_embeds.bin`: copy it to "
                  f"`models/embeddings/{SAMPLE_EMBEDDING}.bin` and write `embedding:{SAMPLE_EMBEDDING}` in the prompt "
                  "(or train your own with NVS Textual Inversion Train). The checkpoint is any Stable Diffusion 1.5.")

    # 1. photo + published embedding -> field -> orbit frames -> mesh -> Preview 3D
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt = wf.add("CheckpointLoaderSimple", (40, 40), size=(340, 110), ckpt_name=CHECKPOINT)
    photo = wf.add("LoadImage", (40, 190), title="Photo", size=(340, 320), image=SAMPLE_IMAGE, extra_widgets=["image"])
    mask = wf.add("LoadImageMask", (40, 550), title="Mask", size=(340, 320), image=SAMPLE_MASK, channel="red",
                  extra_widgets=["image"])
    recon = wf.add("NVSRealFusionReconstruct", (420, 40), size=(380, 560),
                   prompt=f"A high-resolution DSLR image of a embedding:{SAMPLE_EMBEDDING}", preset="published",
                   iterations=5000, seed=101, run_name=f"realfusion_{SAMPLE}")
    orbit = wf.add("NVSOrbitCameras", (420, 640), title="Orbit cameras", size=(380, 260), count=24, elevation=15.0,
                   azimuth_start=0.0, azimuth_sweep=360.0, radius=1.8, fov=55.0, width=128, height=128)
    render = wf.add("NVSFieldRender", (840, 40), size=(340, 200), shading="albedo")
    frames = wf.add("SaveImage", (1220, 40), title="Orbit frames", size=(420, 360),
                    filename_prefix=f"nvs/realfusion_{SAMPLE}_orbit")
    normals = wf.add("PreviewImage", (1220, 440), title="Normals", size=(420, 300))
    export_id = wf.add("NVSFieldExportMesh", (840, 300), size=(340, 260), resolution=256, format="glb",
                       textured=False, filename_prefix=f"nvs/realfusion_{SAMPLE}")
    progress_preview = wf.add("PreviewImage", (840, 600), title="Input view while training", size=(340, 300))
    save = wf.add("NVSFieldSave", (420, 940), size=(380, 110), name=f"realfusion_{SAMPLE}")
    for src, name, dst, slot in ((ckpt, "MODEL", recon, "model"), (ckpt, "CLIP", recon, "clip"),
                                 (ckpt, "VAE", recon, "vae"), (photo, "IMAGE", recon, "image"),
                                 (mask, "MASK", recon, "mask"), (recon, "field", render, "field"),
                                 (orbit, "cameras", render, "cameras"), (render, "image", frames, "images"),
                                 (render, "normals", normals, "images"), (recon, "field", export_id, "field"),
                                 (recon, "preview", progress_preview, "images"), (recon, "field", save, "field")):
        wf.connect(src, name, dst, slot)
    _preview3d(wf, export_id, "mesh_path", (1680, 40), "Mesh")
    wf.add("MarkdownNote", (1680, 500), title="Read me", size=(460, 420), text=(
        "## RealFusion: one photo to a 3D mesh\n\n" + photo_note + "\n\nThe reconstruct node fits a radiance field "
        "(published preset: 5000 iterations, SDS with CFG 100; a GPU job of about 25 minutes on a V100) and shows "
        "the input view while it trains; interrupt saves the run and queueing again resumes it. The orbit "
        "frames use the input photo's camera height (elevation 15, radius 1.8, fov 55). The mesh is marching "
        "cubes at the published density level with the albedo as vertex colours (turn on `textured` for a UV "
        "texture)."))
    out["realfusion_image_to_mesh.json"] = wf.to_json()

    # 2. textual inversion on the photo, then a quick SD sample with the learned word
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt = wf.add("CheckpointLoaderSimple", (40, 40), size=(340, 110), ckpt_name=CHECKPOINT)
    photo = wf.add("LoadImage", (40, 190), title="Photo", size=(340, 320), image=SAMPLE_IMAGE, extra_widgets=["image"])
    train = wf.add("NVSTextualInversionTrain", (420, 40), size=(380, 520), initializer_word="cat", steps=3000,
                   learning_rate=0.0005, seed=0, embedding_name=f"my_{SAMPLE}")
    show = wf.add("PreviewAny", (840, 40), title="Prompt word", size=(400, 160))
    summary = wf.add("PreviewAny", (840, 240), title="Summary", size=(400, 240))
    for src, name, dst, slot in ((ckpt, "MODEL", train, "model"), (ckpt, "CLIP", train, "clip"),
                                 (ckpt, "VAE", train, "vae"), (photo, "IMAGE", train, "image"),
                                 (train, "embedding", show, "source"), (train, "summary", summary, "source")):
        wf.connect(src, name, dst, slot)
    wf.add("MarkdownNote", (840, 520), title="Read me", size=(400, 360), text=(
        "## Textual inversion on one photo (RealFusion's first stage)\n\n" + f"**Input.** `{SAMPLE_IMAGE}` is "
        f"`image.png` of the `{SAMPLE}` example of RealFusion (in this pack's shared samples); put it in ComfyUI's "
        "`input/` folder. The checkpoint is any Stable Diffusion 1.5."
        + f"\n\nThe learned vector is saved as `models/embeddings/my_{SAMPLE}.safetensors`: write "
        f"`embedding:my_{SAMPLE}` in any SD 1.5 prompt, e.g. in NVS RealFusion Reconstruct. The published run is "
        "3000 steps of 4 accumulated 512 px samples (about an hour on a V100); `pixel_range` reproduces or fixes "
        "the original's [0, 1] input quirk."))
    out["textual_inversion_train.json"] = wf.to_json()

    # 3. NVS-Adapter views of the same photo as extra supervision of the field
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt = wf.add("CheckpointLoaderSimple", (40, 40), title="SD 1.5 (RealFusion)", size=(340, 110),
                  ckpt_name=CHECKPOINT)
    sd21 = wf.add("CheckpointLoaderSimple", (40, 1040), title="SD 2.1 base (NVS-Adapter)", size=(340, 110),
                  ckpt_name=ADAPTER_CHECKPOINT)
    vision = wf.add("CLIPVisionLoader", (40, 190), size=(340, 90), clip_name=ADAPTER_CLIP_VISION)
    photo = wf.add("LoadImage", (40, 320), title="Photo", size=(340, 320), image=SAMPLE_IMAGE, extra_widgets=["image"])
    mask = wf.add("LoadImageMask", (40, 680), title="Mask", size=(340, 320), image=SAMPLE_MASK, channel="red",
                  extra_widgets=["image"])
    loader = wf.add("NVSAdapterLoader", (420, 40), size=(360, 130))
    ref_cam = wf.add("NVSCamera", (420, 210), title="Photo camera", size=(360, 220), elevation=15.0, azimuth=0.0,
                     radius=1.8, fov=55.0, width=256, height=256)
    views = wf.add("NVSOrbitCameras", (420, 470), title="Views to generate", size=(360, 260), count=4,
                   elevation=15.0, azimuth_start=90.0, azimuth_sweep=360.0, radius=1.8, fov=55.0, width=256,
                   height=256)
    sampler = wf.add("NVSAdapterSampler", (820, 40), size=(380, 420), steps=50, seed=0, mask_meaning="1 = object")
    multiview = wf.add("NVSMultiviewFromImages", (820, 500), size=(380, 100))
    recon = wf.add("NVSRealFusionReconstruct", (1240, 40), size=(380, 560),
                   prompt=f"A high-resolution DSLR image of a embedding:{SAMPLE_EMBEDDING}", preset="published",
                   iterations=5000, seed=101, run_name=f"realfusion_{SAMPLE}_nvsadapter")
    generated = wf.add("PreviewImage", (820, 640), title="NVS-Adapter views", size=(380, 300))
    export_id = wf.add("NVSFieldExportMesh", (1660, 40), size=(340, 260), resolution=256, format="glb",
                       textured=False, filename_prefix=f"nvs/realfusion_{SAMPLE}_nvsadapter")
    for src, name, dst, slot in ((sd21, "MODEL", sampler, "model"), (sd21, "CLIP", sampler, "clip"),
                                 (sd21, "VAE", sampler, "vae"), (vision, "CLIP_VISION", sampler, "clip_vision"),
                                 (loader, "nvs_adapter", sampler, "nvs_adapter"),
                                 (photo, "IMAGE", sampler, "reference_image"),
                                 (ref_cam, "cameras", sampler, "reference_camera"),
                                 (views, "cameras", sampler, "target_cameras"), (mask, "MASK", sampler, "reference_mask"),
                                 (sampler, "images", multiview, "images"), (views, "cameras", multiview, "cameras"),
                                 (sampler, "images", generated, "images"),
                                 (ckpt, "MODEL", recon, "model"), (ckpt, "CLIP", recon, "clip"),
                                 (ckpt, "VAE", recon, "vae"), (photo, "IMAGE", recon, "image"),
                                 (mask, "MASK", recon, "mask"), (multiview, "multiview", recon, "multiview"),
                                 (recon, "field", export_id, "field")):
        wf.connect(src, name, dst, slot)
    _preview3d(wf, export_id, "mesh_path", (1660, 340), "Mesh")
    wf.add("MarkdownNote", (1240, 640), title="Read me", size=(380, 380), text=(
        "## NVS-Adapter views as extra supervision for RealFusion\n\n" + photo_note + " NVS-Adapter runs on "
        f"Stable Diffusion 2.1 base (`{ADAPTER_CHECKPOINT}`) with its adapter file in `models/nvs/nvs_adapter/` and "
        f"the OpenCLIP ViT-H vision model (`{ADAPTER_CLIP_VISION}`).\n\nNVS-Adapter first generates "
        "views of the photo at the orbit cameras; they enter the field fit as an NVS_MULTIVIEW with their "
        "cameras (`multiview_weight` sets their reconstruction weight) while SDS shapes the rest. No published "
        "code combines the two."))
    out["nvs_adapter_views_to_mesh.json"] = wf.to_json()
    return out


def test_example_workflows_are_the_built_ones():
    from tests.ui_workflow import assert_workflows_built

    assert_workflows_built(WORKFLOWS, build_workflows())


if __name__ == "__main__":
    from tests.ui_workflow import write_workflows

    write_workflows(WORKFLOWS, build_workflows())
