"""RealFusion nodes without ComfyUI: reconstruct (stand-in SD objects through the node's guidance seam), render,
save/load, bad inputs, interrupt."""
from importlib import import_module

import pytest
import torch

from tests.conftest import load_pack

pack = load_pack()
rf_nodes = import_module(f"{pack.__name__}.nodes.nodes_realfusion")
rf = import_module(f"{pack.__name__}.nvs_core.realfusion")
cameras_mod = import_module(f"{pack.__name__}.nvs_core.cameras")
progress_mod = import_module(f"{pack.__name__}.nvs_core.progress")

TINY = dict(grid_levels=4, grid_resolution=64, log2_hashmap_size=10, hidden_dim=16, hidden_dim_bg=16, grid_size=32,
            grid_levels_mask=0)


def tiny_field(seed=0):
    """A tiny random field with a filled occupancy grid (the blob makes the centre dense)."""
    torch.manual_seed(seed)
    field = rf.RealFusionField(rf.FieldConfig(**TINY))
    field.update_occupancy(jitter=False)
    return field.train(False).requires_grad_(False)


def save_tiny(path):
    rf.save_field(path, tiny_field())
    return path


def _node(node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


def test_render_outputs():
    cams = cameras_mod.orbit(2, 0.3, 0.0, 3.14, 1.8, 0.9, 24, 24)
    image, depth, normals, mask = _node("NVSFieldRender").render(tiny_field(), cams, "lambertian")
    assert image.shape == (2, 24, 24, 3) and depth.shape == (2, 24, 24, 3) and normals.shape == (2, 24, 24, 3)
    assert mask.shape == (2, 24, 24) and float(mask.max()) > 0.5 and float(mask.min()) < 0.5
    assert 0 <= float(image.min()) and float(image.max()) <= 1


# ----------------------------------------------------------------------------- reconstruct (stand-in SD objects)
sds_mod = import_module(f"{pack.__name__}.nvs_core.realfusion.sds")
host = import_module(f"{pack.__name__}.nodes.host")
sd_comfy = import_module(f"{pack.__name__}.nodes.sd_comfy")
FAST = dict(num_rays=128, max_steps=48, occupancy_every=2, albedo_iters=2, grid_levels_mask=2, preview_size=12)


class StubGuidance:
    def __init__(self, nonfinite=0):
        self.nonfinite, self.calls = nonfinite, 0

    def step(self, image, direction=0, lambda_grad=1.0, generator=None, **kwargs):
        self.calls += 1
        grad = torch.full_like(image, 1e-3)
        return sds_mod.SDSStep((image * grad).sum(), image, grad, 500, self.nonfinite, 1e-3)


@pytest.fixture
def reconstruct(monkeypatch, tmp_path):
    monkeypatch.setenv("NVS_OUTPUT_DIR", str(tmp_path / "output"))
    node = _node("NVSRealFusionReconstruct")
    monkeypatch.setattr(type(node), "FIELD_CONFIG", rf.FieldConfig(**{**TINY, "grid_levels_mask": 8}))
    monkeypatch.setattr(type(node), "TRAIN_OVERRIDES", FAST)
    stub = StubGuidance()
    monkeypatch.setattr(type(node), "guidance", staticmethod(lambda *args: stub))
    node.stub = stub
    return node


def _rgba(size=24):
    image = torch.rand(1, size, size, 4, generator=torch.Generator().manual_seed(0))
    image[..., 3] = 0
    image[:, 6:18, 8:16, 3] = 1
    return image


ARGS = dict(model=None, clip=None, vae=None, prompt="a photo of embedding:thing", preset="published", iterations=4,
            seed=1, render_size=12, input_size=24, preview_every=2)


def test_reconstruct_runs_and_reports(reconstruct, tmp_path):
    out = reconstruct.reconstruct(image=_rgba(), **ARGS)
    field, preview, log = out["result"]
    assert isinstance(field, rf.RealFusionField) and not field.training and field.grid_levels_mask == 0
    assert preview.shape == (1, 24, 24, 3) and reconstruct.stub.calls == 4
    assert "step 4" in log and "non-finite SDS gradient values 0" in log and out["ui"]["text"] == [log]
    assert (tmp_path / "output" / "nvs_realfusion" / "realfusion" / "train_state.pt").is_file()


def test_reconstruct_mask_input_and_inverted_mask(reconstruct):
    image = torch.rand(1, 24, 24, 3)
    mask = torch.zeros(1, 24, 24)
    mask[:, 6:18, 8:16] = 1
    reconstruct.reconstruct(image=image, mask=mask, **{**ARGS, "iterations": 1, "run_name": "a"})
    reconstruct.reconstruct(image=image, mask=1 - mask, **{**ARGS, "iterations": 1, "run_name": "b"})  # LoadImage


@pytest.mark.parametrize("image, mask, message", [
    (torch.rand(1, 16, 16, 3), None, "no alpha channel"),
    (torch.rand(1, 16, 16, 3), torch.zeros(1, 16, 16), "empty"),
    (torch.rand(1, 16, 16, 3), torch.zeros(1, 64, 64), "empty.*LoadImage"),  # LoadImage of a photo without alpha
    (torch.rand(1, 16, 16, 3), torch.ones(1, 16, 16), "whole image"),
    (torch.rand(1, 16, 16, 3), torch.ones(1, 8, 8), "mask"),
])
def test_reconstruct_bad_photos(reconstruct, image, mask, message):
    with pytest.raises(ValueError, match=message):
        reconstruct.reconstruct(image=image, mask=mask, **ARGS)


def test_reconstruct_bad_widgets(reconstruct):
    with pytest.raises(ValueError, match="preset"):
        reconstruct.reconstruct(image=_rgba(), **{**ARGS, "preset": "mine"})
    with pytest.raises(ValueError, match="prompt"):
        reconstruct.reconstruct(image=_rgba(), **{**ARGS, "prompt": "  "})
    with pytest.raises(ValueError, match="run_name"):
        reconstruct.reconstruct(image=_rgba(), **{**ARGS, "run_name": "../x"})


def test_reconstruct_reports_nonfinite_sds(reconstruct):
    reconstruct.stub.nonfinite = 5
    log = reconstruct.reconstruct(image=_rgba(), **{**ARGS, "iterations": 2})["result"][2]
    assert "non-finite SDS gradient values 10 (in 2 steps)" in log and "warning" in log


def test_reconstruct_interrupt_saves_and_resumes(reconstruct, monkeypatch, tmp_path):
    calls = {"n": 0}

    def stopping(total, desc=""):
        def should_stop():
            calls["n"] += 1
            return calls["n"] == 2
        return progress_mod.Progress(total, desc, should_stop=should_stop)

    monkeypatch.setattr(host, "progress_factory", lambda: stopping)
    with pytest.raises(progress_mod.Interrupted):
        reconstruct.reconstruct(image=_rgba(), **ARGS)
    state = torch.load(tmp_path / "output" / "nvs_realfusion" / "realfusion" / "train_state.pt", weights_only=True)
    assert state["global_step"] == 2
    log = reconstruct.reconstruct(image=_rgba(), **ARGS)["result"][2]  # resumes at step 3
    assert "step 4" in log and reconstruct.stub.calls == 4
    with pytest.raises(ValueError, match="resume"):
        reconstruct.reconstruct(image=_rgba(), **{**ARGS, "preset": "fixed"})


def test_non_sd15_model_is_named(monkeypatch):
    from types import SimpleNamespace

    model = SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(
        unet_config={"context_dim": 1024, "in_channels": 4})))
    monkeypatch.setattr(sd_comfy, "prediction_type_of", lambda m: "v_prediction")
    with pytest.raises(ValueError, match="found a 1024-wide text context, v_prediction prediction"):
        rf_nodes.check_sd15_model(model)
    sdxl = SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(
        unet_config={"context_dim": 2048, "in_channels": 4, "adm_in_channels": 2816})))
    monkeypatch.setattr(sd_comfy, "prediction_type_of", lambda m: "epsilon")
    with pytest.raises(ValueError, match="2048-wide.*SDXL"):
        rf_nodes.check_sd15_model(sdxl)


# ----------------------------------------------------------------------------- save / load / render
def test_save_load_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path / "models"))
    field = tiny_field()
    (path,) = _node("NVSFieldSave").save(field, "my_field")["result"]
    assert path.endswith("realfusion/my_field.safetensors")
    (loaded,) = _node("NVSFieldLoader").load("my_field.safetensors")
    for (k, a), b in zip(field.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="name"):
        _node("NVSFieldSave").save(field, "a/b")
    with pytest.raises(FileNotFoundError, match="models/nvs/realfusion"):
        _node("NVSFieldLoader").load("missing.safetensors")


def test_loader_refuses_other_files(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path / "models"))
    folder = tmp_path / "models" / "realfusion"
    folder.mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(folder / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors"):
        _node("NVSFieldLoader").load("other.safetensors")


def test_render_refuses_non_fields():
    cams = cameras_mod.orbit(1, 0.3, 0.0, 3.14, 1.8, 0.9, 8, 8)
    with pytest.raises(ValueError, match="NVS_FIELD"):
        _node("NVSFieldRender").render(object(), cams, "albedo")
    with pytest.raises(ValueError, match="shading"):
        _node("NVSFieldRender").render(tiny_field(), cams, "toon")
