"""NVS GeNVS Train on the tiny network: files the loader reads, resume, multiview data, bad inputs."""
import json
import math
from importlib import import_module

import pytest
import torch

from tests.conftest import load_pack
from tests.train_nodes import COMMON_BAD_INPUTS, check_resume_rules, run_train_node, use_train_dirs

pack = load_pack()
nt = import_module(f"{pack.__name__}.nodes.nodes_genvs_train")
ng = import_module(f"{pack.__name__}.nodes.nodes_genvs")
cam = import_module(f"{pack.__name__}.nvs_core.cameras")
progress_mod = import_module(f"{pack.__name__}.nvs_core.progress")
host = import_module(f"{pack.__name__}.nodes.host")


@pytest.fixture
def train_dirs(tmp_path, monkeypatch):
    ng.clear_cache()
    return use_train_dirs(tmp_path, monkeypatch)


def _train(**kwargs):
    return run_train_node(nt.NVSGeNVSTrain, dict(data_source="procedural", network="tiny 16px", steps=2,
                                                 learning_rate=0.001, batch_size=1, seed=1, output_name="tiny_run",
                                                 resume=True, checkpoint_every=0), **kwargs)


def _views(count=3, size=24):
    cams = cam.orbit(count, math.radians(20), 0.0, math.radians(120), 2.6, math.radians(45), size, size)
    with torch.inference_mode():
        return cams, pack.NODE_CLASS_MAPPINGS["NVSProceduralScene"]().render(seed=2, cameras=cams,
                                                                                background="white")[2]


def test_registered_with_house_style():
    assert pack.NODE_CLASS_MAPPINGS["NVSGeNVSTrain"] is nt.NVSGeNVSTrain
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["NVSGeNVSTrain"] == "NVS GeNVS Train"
    inputs = nt.NVSGeNVSTrain.INPUT_TYPES()
    for group in inputs.values():
        for name, spec in group.items():
            assert spec[1].get("tooltip"), name
    assert nt.NVSGeNVSTrain.CATEGORY == "NVS/GeNVS" and nt.NVSGeNVSTrain.RETURN_TYPES[0] == "NVS_GENVS"


def test_train_saves_a_loadable_model_and_resumes(train_dirs):
    model, summary = _train()
    assert isinstance(model, ng.GeNVSModel) and model.first_source_frame
    assert "step 2/2 (2 this run" in summary and "terms: diffusion" in summary and "tiny_run.safetensors" in summary
    saved = train_dirs / "models" / "genvs" / "tiny_run.safetensors"
    assert saved.is_file() and saved.with_suffix(".json").is_file()
    assert (train_dirs / "output" / "nvs_genvs_training" / "tiny_run" / "training-state.safetensors").is_file()
    assert not any(p.requires_grad for p in model.model.parameters())
    with torch.inference_mode():
        loaded = ng.NVSGeNVSLoader().load("tiny_run.safetensors")["result"][0]
    assert loaded.first_source_frame
    for (key, a), b in zip(model.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), key
    check_resume_rules(_train, 0.002)


def test_source_reconstruction_warm_up_reaches_the_recipe(train_dirs):
    model, summary = _train(steps=2, source_reconstruction_steps=1, source_view_rgb_weight=1.0, output_name="warm")
    assert "first 1 steps source-view reconstruction" in summary
    meta = json.loads((train_dirs / "models" / "genvs" / "warm.json").read_text())["meta"]["training"]
    assert meta["source_reconstruction_steps"] == 1 and meta["lambda_rgb_first"] == 1.0
    _, plain = _train(steps=1, output_name="plain")
    assert "source-view reconstruction" not in plain
    plain_meta = json.loads((train_dirs / "models" / "genvs" / "plain.json").read_text())["meta"]["training"]
    assert plain_meta["source_reconstruction_steps"] == 0 and plain_meta["lambda_rgb_first"] == 0.01


def test_train_on_a_multiview_leaves_the_input_alone(train_dirs):
    _, views = _views()
    model, summary = _train(data_source="multiview", multiview=views, output_name="mv_run.safetensors", steps=1)
    assert "multiview data" in summary and (train_dirs / "models" / "genvs" / "mv_run.safetensors").is_file()
    assert views.images.is_inference()


def test_progress_and_interrupt(train_dirs, monkeypatch):
    seen = []

    def factory(total, desc=""):
        return progress_mod.Progress(total, desc, on_update=lambda done, tot: seen.append((done, tot)))

    monkeypatch.setattr(host, "progress_factory", lambda: factory)
    _train(steps=2, output_name="p")
    assert seen == [(1, 2), (2, 2)]

    def stopping(total, desc=""):
        return progress_mod.Progress(total, desc, should_stop=lambda: True)

    monkeypatch.setattr(host, "progress_factory", lambda: stopping)
    with pytest.raises(progress_mod.Interrupted):
        _train(steps=3, output_name="q")
    assert not (train_dirs / "models" / "genvs" / "q.safetensors").exists()


@pytest.mark.parametrize("kwargs, message", COMMON_BAD_INPUTS + [
    (dict(denoiser_lr_ratio=float("nan")), "denoiser_lr_ratio must be a finite number > 0"),
    (dict(restart_steps=0), "restart_steps must be an integer >= 1"),
    (dict(source_reconstruction_steps=-1), "source_reconstruction_steps must be an integer >= 0"),
    (dict(source_view_rgb_weight=float("inf")), "source_view_rgb_weight must be a finite number >= 0"),
])
def test_train_bad_inputs(train_dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _train(**kwargs)


def test_train_needs_two_views(train_dirs):
    _, views = _views(1)
    with pytest.raises(ValueError, match="at least 2 views"):
        _train(data_source="multiview", multiview=views)
