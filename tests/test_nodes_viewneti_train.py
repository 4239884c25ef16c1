"""NVS ViewNeTI Train without ComfyUI: the node's whole nvs_core path on tiny diffusers SD components
(``make_backend`` replaced by the tiny diffusers backend), the files it saves, DTU folders and bad inputs."""
import importlib
import math

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
tiny = _core("sd.tiny")
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
        made.append(tiny.tiny_backend_with_tokenizer(prediction_type="v_prediction"))
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
