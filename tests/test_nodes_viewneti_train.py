"""NVS ViewNeTI Train without ComfyUI: the node's whole nvs_core path on tiny diffusers SD components
(``make_backend`` replaced by the tiny diffusers backend), the files it saves, DTU folders and bad inputs."""
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import load_pack
from tests.paths import GOLDEN_DIR

pytest.importorskip("diffusers")
pytest.importorskip("kornia")

pack = load_pack()


def _core(name):
    return importlib.import_module(f"{pack.__name__}.nvs_core.{name}")


cam = _core("cameras")
tiny_sd = _core("sd.tiny")
loading = _core("viewneti.loading")
training = _core("viewneti.training")
Train = pack.NODE_CLASS_MAPPINGS["NVSViewNeTITrain"]
MultiView = _core("multiview").MultiView
CAL18 = GOLDEN_DIR / "viewneti" / "cal18_synthetic"


@pytest.fixture
def node(tmp_path, monkeypatch):
    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("NVS_OUTPUT_DIR", str(tmp_path / "output"))
    made = []

    def make_backend(model, clip, vae):
        assert (model, clip, vae) == ("MODEL", "CLIP", "VAE")
        made.append(tiny_sd.tiny_backend_with_tokenizer(prediction_type="v_prediction"))
        return made[-1]

    monkeypatch.setattr(Train, "make_backend", staticmethod(make_backend))
    instance = Train()
    instance.made = made
    return instance


def orbit(count=3, size=16):
    return cam.orbit(count, 0.3, 0.0, 2 * math.pi, 2.5, math.radians(40), size, size)


def run(node, **kwargs):
    args = dict(model="MODEL", clip="CLIP", vae="VAE", learnable_mode=Train.INPUT_TYPES()["required"][
        "learnable_mode"][0][1], steps=2, learning_rate=0.001, scale_lr=True, batch_size=1, gradient_accumulation=1,
        augmentation="published-7", width=16, height=16, seed=0, output_name="node_run", resume=False,
        images=torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(0)), cameras=orbit())
    with torch.inference_mode():  # as ComfyUI runs every node
        out = node.train(**(args | kwargs))
    return out["result"][0], out["ui"]["text"][0]


def pretrained(width=32):
    view = training.new_mapper("view", width, 1.0, 5.0, "phi", 3)
    tokens = training.spherical_view_tokens(orbit())
    return loading.ViewNetiModel(view.train(False).requires_grad_(False), {}, {},
                                 _core("viewneti.camera_tokens").SphericalViewRange.from_tokens(tokens), tokens)


def test_node_trains_and_saves_mappers_that_load_back(node, tmp_path):
    model, summary = run(node)
    assert isinstance(model, loading.ViewNetiModel) and model.view is not None and list(model.objects) == ["<object>"]
    assert "mode 2" in summary and "step 2/2" in summary and "lr 0.001 (scaled)" in summary
    folder = tmp_path / "models" / "viewneti"
    files = {p.name for p in folder.iterdir()}
    assert {"node_run_view.safetensors", "node_run_object.safetensors", "node_run_learned_embeds.safetensors",
            "node_run_view.json"} <= files
    loaded = loading.load_viewneti(folder / "node_run_view.safetensors", folder / "node_run_object.safetensors",
                                   folder / "node_run_learned_embeds.safetensors")
    for a, b in zip(loaded.view.state_dict().values(), model.view.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.view_range == model.view_range
    assert (tmp_path / "output" / "nvs_viewneti_training" / "node_run" / "training-state.safetensors").is_file()
    backend = node.made[0]
    assert all(p.grad is None for p in backend.unet_model.parameters())
    # resuming to more steps continues the run
    _, summary = run(node, steps=3, resume=True)
    assert "step 3/3 (1 this run" in summary


def test_node_mode_5_with_a_pretrained_mapper_and_multiview(node):
    mv = MultiView(torch.rand(2, 16, 16, 3), orbit(2))
    model, summary = run(node, learnable_mode=Train.INPUT_TYPES()["required"]["learnable_mode"][0][4],
                         images=None, cameras=None, multiview=mv, pretrained_view_mapper=pretrained())
    assert "mode 5" in summary and "(frozen)" in summary
    for a, b in zip(model.view.state_dict().values(), pretrained().view.state_dict().values()):
        assert torch.equal(a, b)


def _dtu_folder(root, scans, size=(16, 12)):
    for scan in scans:
        folder = root / "Rectified" / f"scan{scan}"
        folder.mkdir(parents=True)
        for k in (25, 22, 28):
            pixels = (np.random.default_rng(scan * 100 + k).random((size[1], size[0], 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"rect_{k + 1:03d}_3_r5000.png")
    calibration = root / "Calibration" / "cal18"
    calibration.mkdir(parents=True)
    for path in CAL18.glob("pos_*.txt"):
        (calibration / path.name).write_text(path.read_text())
    return root


def test_node_mode_3_on_a_dtu_folder(node, tmp_path):
    root = _dtu_folder(tmp_path / "dtu", [3, 4])
    model, summary = run(node, learnable_mode=Train.INPUT_TYPES()["required"]["learnable_mode"][0][2], images=None,
                         cameras=None, dtu_folder=str(root), dtu_scans="3, 4", dtu_subset="1", width=16, height=16)
    assert list(model.objects) == ["<scan3>", "<scan4>"] and model.view.camera_representation == "dtu-12d"
    calibration = _core("viewneti.camera_tokens").DTUCalibration.from_folder(CAL18)
    assert torch.equal(model.view_range.mins, calibration.camera_range().mins)
    assert "DTU scans [3, 4], subset 1" in summary
    folder = tmp_path / "models" / "viewneti"
    loaded = training.load_trained(tmp_path / "output" / "nvs_viewneti_training" / "node_run", "node_run")
    assert list(loaded.objects) == ["<scan3>", "<scan4>"] and (folder / "node_run_object.safetensors").is_file()


def test_node_bad_inputs(node):
    modes = Train.INPUT_TYPES()["required"]["learnable_mode"][0]
    with pytest.raises(ValueError, match="pretrained_view_mapper: learnable mode 5"):
        run(node, learnable_mode=modes[4])
    with pytest.raises(ValueError, match="pretrained_view_mapper: learnable mode 4"):
        run(node, learnable_mode=modes[3])
    with pytest.raises(ValueError, match="768 wide but the model's text encoder is 32 wide"):
        run(node, learnable_mode=modes[4], pretrained_view_mapper=pretrained(768))
    with pytest.raises(ValueError, match="images/cameras: 3 images but 2 cameras"):
        run(node, cameras=orbit(2))
    with pytest.raises(ValueError, match="empty"):
        run(node, images=torch.zeros(0, 16, 16, 3))
    with pytest.raises(ValueError, match="connect training images"):
        run(node, images=None, cameras=None)
    with pytest.raises(ValueError, match="cameras: learnable mode 2 needs"):
        run(node, cameras=None)
    with pytest.raises(ValueError, match="output_name"):
        run(node, output_name="../escape")
    with pytest.raises(ValueError, match="object_placeholder"):
        run(node, object_placeholder="no brackets")
    with pytest.raises(ValueError, match="learnable_mode must be one of"):
        run(node, learnable_mode="1: view only")
    with pytest.raises(ValueError, match="batch_size must be 1..3"):
        run(node, batch_size=4)


def test_node_mode_0_needs_no_cameras(node):
    model, summary = run(node, learnable_mode=Train.INPUT_TYPES()["required"]["learnable_mode"][0][0], cameras=None,
                         augmentation="none", steps=1)
    assert model.view is None and "view mapper: none" in summary


# ------------------------------------------------------------ Train -> Apply, Train -> files -> Loader -> Apply
from tests.test_nodes_viewneti import host, tiny  # noqa: E402,F401  (stand-in MODEL/CLIP fixtures for Apply)

Loader = pack.NODE_CLASS_MAPPINGS["NVSViewNeTILoader"]
Apply = pack.NODE_CLASS_MAPPINGS["NVSViewNeTIApply"]
P = _core("viewneti.prompting")
DTU_ORBIT = dict(count=3, elevation=0.0, azimuth_start=-20.0, azimuth_sweep=40.0)


def _apply(host, mapper, **kwargs):
    out = Apply().apply(model=host.model, clip=host.clip, view_mapper=mapper, **kwargs)
    return out["result"][0].patches.contexts, out["ui"]["text"][0]


def _load_files(**kwargs):
    args = dict(view_mapper="node_run_view.safetensors", object_mapper="node_run_object.safetensors",
                dtu_calibration="cal18") | kwargs
    out = Loader().load(**args)
    return out["result"][0], out["ui"]["text"][0]


def _dtu_orbit(count=3):
    return cam.orbit(count, 0.0, math.radians(-20), math.radians(40), 2.0, math.radians(23.5), 768, 576)


def test_dtu_training_carries_its_calibration_to_apply_and_through_the_files(node, host, tmp_path):
    root = _dtu_folder(tmp_path / "dtu", [3])
    model, summary = run(node, images=None, cameras=None, dtu_folder=str(root), dtu_scans="3", dtu_subset="1")
    assert "view range: DTU calibration" in summary and "(64 cameras" in summary
    calibration = _core("viewneti.camera_tokens").DTUCalibration.from_folder(CAL18)
    assert P.calibration_of(model) is not None and torch.equal(P.calibration_of(model).projections,
                                                               calibration.projections)
    # Train -> Apply: DTU indices and an orbit around the rig work on the fresh model
    provider, text = _apply(host, model, dtu_cameras="22, 25")
    assert provider.rows == 2 and "DTU camera 22, DTU camera 25" in text
    expected = P.dtu_rows_for_keys(model, calibration, [22, 25]).params
    assert torch.equal(provider.view_params, expected)
    provider, _ = _apply(host, model, cameras=_dtu_orbit())
    assert provider.rows == 3
    orbit_params = provider.view_params
    # Train -> files -> Loader -> Apply: the view file alone restores range and cameras (no cal18 installed)
    assert not (tmp_path / "models" / "viewneti" / "cal18").exists()
    for calibration_text in ("cal18", ""):
        loaded, text = _load_files(dtu_calibration=calibration_text)
        assert "DTU calibration stored with the mapper" in text and "64 cameras)" in text
        assert torch.equal(loaded.view_range.mins, model.view_range.mins)
        provider, _ = _apply(host, loaded, dtu_cameras="22, 25")
        assert torch.equal(provider.view_params, expected)
        provider, _ = _apply(host, loaded, cameras=_dtu_orbit())
        assert torch.equal(provider.view_params, orbit_params)
        for a, b in zip(loaded.view.state_dict().values(), model.view.state_dict().values()):
            assert torch.equal(a, b)
    # a calibration given to the loader must agree with the stored range
    numbers = ", ".join(f"{v * 2:.9g}" for v in calibration.camera_range().to_numbers())
    with pytest.raises(ValueError, match="dtu_calibration: its camera range differs from the one"):
        _load_files(dtu_calibration=numbers)
    same = ", ".join(f"{v:.9g}" for v in calibration.camera_range().to_numbers())
    loaded, _ = _load_files(dtu_calibration=same)
    assert P.calibration_of(loaded) is None  # numbers only: cameras in DTU scene coordinates
    # load_trained restores the same
    restored = training.load_trained(tmp_path / "output" / "nvs_viewneti_training" / "node_run", "node_run")
    assert torch.equal(restored.dtu_calibration.projections, calibration.projections)


def test_spherical_training_carries_its_range_to_apply_and_through_the_view_file_alone(node, host, tmp_path):
    model, summary = run(node)
    assert "view range: spherical" in summary and P.calibration_of(model) is None
    provider, text = _apply(host, model, cameras=orbit())
    assert provider.rows == 3 and "3 views" in text
    trained_params = provider.view_params
    with pytest.raises(ValueError, match="spherical .* connect cameras"):
        _apply(host, model)
    # the view + object files, without learned_embeds and without any calibration installed
    loaded, text = _load_files()
    assert "spherical views (phi, range stored with the mapper)" in text
    assert loaded.view_range == model.view_range
    provider, _ = _apply(host, loaded, cameras=orbit())
    assert torch.equal(provider.view_params, trained_params)
    # the view file alone, for view control of a free prompt
    alone, _ = _load_files(object_mapper="none")
    provider, _ = _apply(host, alone, cameras=orbit(), prompt_template="{view}. A photo of a red car")
    assert torch.equal(provider.view_params, trained_params) and provider.object_mapper is None
    # with learned_embeds it is the same range
    with_embeds, text = _load_files(learned_embeds="node_run_learned_embeds.safetensors")
    assert with_embeds.view_range == model.view_range and "range learned_embeds" in text


def test_mode_5_keeps_the_pretrained_calibration(node, host, tmp_path):
    root = _dtu_folder(tmp_path / "dtu", [3])
    calibration = _core("viewneti.camera_tokens").DTUCalibration.from_folder(CAL18)
    view = training.new_mapper("view", 32, 1.0, 5.0, "dtu-12d", 3).train(False).requires_grad_(False)
    pretrained = P.attach_calibration(loading.ViewNetiModel(view, {}, {}, calibration.camera_range()), calibration)
    modes = Train.INPUT_TYPES()["required"]["learnable_mode"][0]
    model, summary = run(node, learnable_mode=modes[4], images=None, cameras=None, pretrained_view_mapper=pretrained,
                         dtu_folder=str(root), dtu_scans="3", dtu_subset="1", steps=1)
    assert "(frozen)" in summary and P.calibration_of(model) is not None
    provider, _ = _apply(host, model, dtu_cameras="25")
    assert torch.equal(provider.view_params, P.dtu_rows_for_keys(pretrained, calibration, [25]).params)


def test_differentiable_comfy_calls_alias_inference_weights_without_copies():
    """What ComfySDBackend(differentiable=True).unet does with ComfyUI's inference-mode weights: ordinary aliases
    of the same storage through functional_call, so backward reaches the input and no weight is copied."""
    sd_comfy = importlib.import_module(pack.__name__ + ".nodes.sd_comfy")
    with torch.inference_mode():  # as ComfyUI loads checkpoints
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        net.register_buffer("offset", torch.ones(2))
    with torch.inference_mode(False):
        x = torch.randn(3, 4, requires_grad=True)
        with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
            (net(x) + net.offset).sum().backward()
        aliases = sd_comfy.ordinary_weights(net)
        assert set(aliases) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "offset"}
        for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
            alias = aliases[name]
            assert not alias.is_inference() and alias.data_ptr() == tensor.data_ptr() and torch.equal(alias, tensor)
        out = torch.func.functional_call(net, aliases, (x,), tie_weights=False)
        out.square().sum().backward()
        with torch.no_grad():
            expected = torch.autograd.functional.jacobian(
                lambda v: torch.func.functional_call(net, {k: a.clone() for k, a in aliases.items()}, (v,),
                                                     tie_weights=False).square().sum(), x.detach())
        assert torch.allclose(x.grad, expected, atol=1e-6)
    assert all(p.is_inference() for p in net.parameters())  # the module itself is left as it was


# ------------------------------------------------------------------------------------------ workflow
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "viewneti_train_single_scene.json"
TRAIN_ORBIT, NOVEL_ORBIT = 2, 6  # node ids of the training and the novel-view cameras (host test sets them)
TRAIN_NOTE = """## Train ViewNeTI on one scene, then render new views

*NVS ViewNeTI Train* learns a **view mapper** and an **object mapper** for the connected SD model (the paper uses \
SD 2.1 768-v, `v2-1_768-ema-pruned.safetensors`) from a few images with known cameras. Here the images are 6 renders \
of a procedural object; connect your own with *NVS Load Multiview Folder* (images + `cameras.json`/`transforms.json`), \
a DTU scan (*NVS Load DTU Scan*, or the node's `dtu_folder`, `dtu_scans`, `dtu_subset` inputs), or an IMAGE batch \
with one NVS_CAMERA per image.

Learnable modes: **0** object only; **2** fresh view + object (this workflow); **3** shared view mapper + one object \
per scene; **4/5** start from the published pretrained view mapper (*NVS ViewNeTI Loader* with \
`mapper-steps-50000_view.pt` and the DTU calibration) and train / freeze it; the published DTU results use mode 5 \
with `dtu_subset` 1 or 3.

Recipe as published: 3000 steps, batch 3 x accumulation 3, lr 1e-3 scaled to 9e-3, augmentation key 7. That is a \
GPU job (each step runs the UNet 9 times forward and backward and the text encoder 16 times per micro-batch); on a \
CPU try `width`/`height` 256, batch 1, accumulation 1 and a few hundred steps.

**Right after training** the trained mappers go straight into *NVS ViewNeTI Apply*: the *Novel views* cameras \
(between the training views, same elevation and distance) are rendered by the stock KSampler; the latent \
`batch_size` must equal their count (3). Views outside the training cameras' range are refused (max_extrapolation).

Checkpoints go to `output/nvs_viewneti_training/<output_name>/` (queue again with more steps to resume); the mappers \
are saved as `models/nvs/viewneti/<output_name>_view / _object / _learned_embeds.safetensors`. The view file keeps \
the camera range (and, for DTU data, the calibration cameras), so *NVS ViewNeTI Loader* with the `_view` and \
`_object` files alone renders them later."""


def build_train_workflow():
    """The training workflow (regenerate with ``python -m tests.test_nodes_viewneti_train``)."""
    from tests.test_nodes_viewneti import CHECKPOINT_NAME
    from tests.ui_workflow import UIWorkflow

    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt = wf.add("CheckpointLoaderSimple", (40, 40), title="SD 2.1 768-v checkpoint", size=(340, 100),
                  ckpt_name=CHECKPOINT_NAME)
    train_orbit = wf.add("NVSOrbitCameras", (40, 200), title="Training cameras (6 views on an orbit)",
                         size=(340, 250), count=6, elevation=20.0, azimuth_start=0.0, azimuth_sweep=300.0, radius=2.6,
                         fov=45.0, width=512, height=512)
    scene = wf.add("NVSProceduralScene", (40, 500), title="Training object", size=(340, 210), seed=7,
                   background="white")
    train = wf.add("NVSViewNeTITrain", (440, 40), size=(400, 520), learnable_mode="2: view + object, fresh",
                   steps=3000, width=512, height=512, output_name="viewneti_procedural")
    preview = wf.add("PreviewImage", (40, 760), title="Training views", size=(340, 300))
    novel_orbit = wf.add("NVSOrbitCameras", (440, 600), title="Novel views (between the training views)",
                         size=(400, 250), count=3, elevation=20.0, azimuth_start=30.0, azimuth_sweep=240.0, radius=2.6,
                         fov=45.0, width=512, height=512)
    apply = wf.add("NVSViewNeTIApply", (880, 40), size=(400, 460), prompt_template="{view}. A photo of a {object}",
                   negative_prompt="")
    latent = wf.add("EmptyLatentImage", (880, 550), size=(400, 110), width=512, height=512, batch_size=3)
    sampler = wf.add("KSampler", (1320, 40), size=(320, 270), seed=0, steps=30, cfg=7.5, sampler_name="dpmpp_2m",
                     scheduler="normal", denoise=1.0)
    decode = wf.add("VAEDecode", (1320, 350), size=(220, 50))
    save = wf.add("SaveImage", (1680, 40), title="Novel views of the trained scene", size=(480, 400),
                  filename_prefix="NVS/viewneti_trained")
    wf.add("MarkdownNote", (1320, 480), title="Read me", size=(840, 520), text=TRAIN_NOTE)
    assert (train_orbit, novel_orbit) == (TRAIN_ORBIT, NOVEL_ORBIT)
    for src, name, dst, slot in ((ckpt, "MODEL", train, "model"), (ckpt, "CLIP", train, "clip"),
                                 (ckpt, "VAE", train, "vae"), (train_orbit, "cameras", scene, "cameras"),
                                 (scene, "multiview", train, "multiview"), (scene, "images", preview, "images"),
                                 (ckpt, "MODEL", apply, "model"), (ckpt, "CLIP", apply, "clip"),
                                 (train, "view_mapper", apply, "view_mapper"), (novel_orbit, "cameras", apply, "cameras"),
                                 (apply, "model", sampler, "model"), (apply, "positive", sampler, "positive"),
                                 (apply, "negative", sampler, "negative"), (latent, "LATENT", sampler, "latent_image"),
                                 (sampler, "LATENT", decode, "samples"), (ckpt, "VAE", decode, "vae"),
                                 (decode, "IMAGE", save, "images")):
        wf.connect(src, name, dst, slot)
    return wf.to_json()


def test_training_workflow_is_the_built_one():
    from tests.ui_workflow import assert_workflows_built

    assert_workflows_built(WORKFLOW.parent, {WORKFLOW.name: build_train_workflow()})


def test_training_workflow_novel_views_are_inside_the_training_range():
    """The workflow's novel cameras pass Apply's range check for the training cameras' spherical range."""
    import json

    nodes = {n["id"]: n for n in json.loads(WORKFLOW.read_text())["nodes"]}
    train, novel = (cam.orbit(*_orbit_args(nodes[i]["widgets_values"])) for i in (TRAIN_ORBIT, NOVEL_ORBIT))
    tokens = training.spherical_view_tokens(train)
    model = loading.ViewNetiModel(training.new_mapper("view", 32, 1.0, 5.0, "phi", 0), {}, {},
                                  _core("viewneti.camera_tokens").SphericalViewRange.from_tokens(tokens), tokens)
    rows = P.spherical_rows_for_cameras(model, novel)
    assert len(rows) == 3 and float(rows.params.abs().max()) <= 1.0


def _orbit_args(values):
    count, elevation, azimuth_start, azimuth_sweep, radius, fov, width, height = values
    return (count, math.radians(elevation), math.radians(azimuth_start), math.radians(azimuth_sweep), radius,
            math.radians(fov), width, height)


if __name__ == "__main__":
    from tests.ui_workflow import write_workflows

    write_workflows(WORKFLOW.parent, {WORKFLOW.name: build_train_workflow()})
