"""GeNVS inside a real ComfyUI: the three example workflows through the HTTP API (training shrunk to the tiny network), with a tiny random model (and with
the bundled demo model as shipped, when it is there); a bad camera reaches execution_error with our message."""
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import load_pack
from tests.workflow_check import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
NOVEL_VIEWS = ROOT / "workflows" / "genvs_novel_views.json"
ORBIT = ROOT / "workflows" / "genvs_orbit.json"
TRAIN = ROOT / "workflows" / "genvs_train_procedural.json"
DEMO = ROOT / "models" / "demo" / "genvs_procedural.safetensors"
TINY = "host-genvs-tiny.safetensors"
NOT_GENVS = "host-vivid-in-genvs.safetensors"


@pytest.fixture(scope="module")
def genvs_file(comfy):
    """A tiny random GeNVS model (8-px views) in the server's models/nvs/genvs/."""
    import torch

    from tests.test_nodes_genvs import checkpoints, save_tiny

    folder = comfy.output_dir.parent / "models" / "nvs" / "genvs"
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny(folder / TINY)
    checkpoints.save_with_config(folder / NOT_GENVS, {"w": torch.zeros(2)},
                                 {"method": "vivid", "class": "NVPrecond", "constructor": {"a": 1}})
    return TINY


def _prompt(path, model=None, **by_class):
    """A workflow in API format; ``by_class`` updates the inputs of every node of that class."""
    prompt = ui_to_api(path, load_pack().NODE_CLASS_MAPPINGS)
    for node in prompt.values():
        if node["class_type"] == "NVSGeNVSLoader" and model is not None:
            node["inputs"].update(model=model, device="cpu")
        node["inputs"].update(by_class.get(node["class_type"], {}))
    return prompt


def _ids(prompt, class_type):
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def _saved(comfy, entry, prompt, size):
    items = entry["outputs"][_ids(prompt, "SaveImage")[0]]["images"]
    for item in items:
        with Image.open(comfy.output_dir / item["subfolder"] / item["filename"]) as image:
            assert image.size == (size, size)
    return items


def _error(entry):
    assert entry["status"]["status_str"] == "error"
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


def test_loader_lists_the_model_folder_and_the_demo(comfy, genvs_file):
    info = comfy.get("/object_info/NVSGeNVSLoader")["NVSGeNVSLoader"]
    files = info["input"]["required"]["model"][0]
    assert genvs_file in files and info["category"] == "NVS/GeNVS"
    assert ("demo/genvs_procedural.safetensors" in files) == DEMO.is_file()


def test_novel_views_workflow_runs(comfy, genvs_file):
    # a wide source photo: the sources are centre-cropped (reported in info)
    prompt = _prompt(NOVEL_VIEWS, genvs_file, NVSGeNVSSampler={"steps": 2, "seed": 3},
                     NVSCamera={"width": 96, "height": 64})
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert len(_saved(comfy, entry, prompt, 8)) == 6                    # one view per target camera
    info = entry["outputs"][_ids(prompt, "NVSGeNVSSampler")[0]]["text"][0]
    assert "sources 96x64: centre crop 64x64 at x=16, y=0 -> 32 px" in info and "seeds 3..8 (seed + index)" in info
    render = entry["outputs"][_ids(prompt, "NVSGeNVSRender")[0]]["text"][0]
    assert "6 targets rendered at 4 px" in render
    previews = [entry["outputs"][i]["images"] for i in _ids(prompt, "PreviewImage")]
    assert sorted(len(p) for p in previews) == [1, 6, 6, 6]             # source, features, depth, ground truth
    assert TINY in entry["outputs"][_ids(prompt, "NVSGeNVSLoader")[0]]["text"][0]


def test_orbit_workflow_runs(comfy, genvs_file):
    prompt = _prompt(ORBIT, genvs_file, NVSGeNVSOrbit={"steps": 2, "frames": 4})
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert len(_saved(comfy, entry, prompt, 8)) == 4
    info = entry["outputs"][_ids(prompt, "NVSGeNVSOrbit")[0]]["text"][0]
    assert "circle of 4 frames" in info and "4 frames of 8 px" in info


def test_bad_cameras_reach_the_user(comfy, genvs_file):
    prompt = _prompt(NOVEL_VIEWS, genvs_file, NVSGeNVSSampler={"steps": 2}, NVSOrbitCameras={"radius": 0.8})
    error = _error(comfy.run(prompt))
    assert error["node_type"] in ("NVSGeNVSRender", "NVSGeNVSSampler") and error["exception_type"] == "ValueError"
    assert "target_cameras: camera 0, 1, 2, 3, 4, 5 is inside the scene cube [-1, 1]^3" in error["exception_message"]

    prompt = _prompt(NOVEL_VIEWS, NOT_GENVS)
    error = _error(comfy.run(prompt))
    assert error["node_type"] == "NVSGeNVSLoader"
    assert f"model: {NOT_GENVS} is not a usable GeNVS checkpoint" in error["exception_message"]


@pytest.mark.skipif(not DEMO.is_file(), reason="the bundled demo model models/demo/genvs_procedural.safetensors "
                                               "is not there yet")
@pytest.mark.parametrize("workflow, frames", [(NOVEL_VIEWS, 6), (ORBIT, 11)])
def test_workflows_run_as_shipped_on_the_demo_model(comfy, workflow, frames):
    prompt = _prompt(workflow)
    entry = comfy.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert len(_saved(comfy, entry, prompt, 32)) == frames


def test_genvs_training_workflow_runs(comfy):
    """The training workflow inside the host's inference mode, shrunk to the tiny network (with one
    source-reconstruction step), then sampling an unseen object and metrics."""
    import os

    name = "host_test_tiny_genvs"
    prompt = _prompt(TRAIN,
                     NVSGeNVSTrain=dict(network="tiny 16px", steps=2, batch_size=2, output_name=name, resume=False,
                                        source_reconstruction_steps=1),
                     NVSCamera=dict(width=16, height=16), NVSOrbitCameras=dict(width=16, height=16, count=3),
                     NVSGeNVSSampler=dict(steps=2))
    try:
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        outputs = entry["outputs"]
        summary = outputs[_ids(prompt, "NVSGeNVSTrain")[0]]["text"][0]
        assert "step 2/2" in summary and "first 1 steps source-view reconstruction" in summary
        assert (comfy.output_dir / "nvs_genvs_training" / name / "training-state.safetensors").is_file()
        saved = summary.split("network: ", 1)[1].splitlines()[0]
        assert Path(saved).name == f"{name}.safetensors" and Path(saved).is_file()
        assert "PSNR" in outputs[_ids(prompt, "NVSMetrics")[0]]["text"][0]
    finally:  # the node saves into ComfyUI's own models/nvs/genvs/ (the first registered folder)
        for model_dir in (Path(os.environ["COMFYUI_PATH"]) / "models" / "nvs" / "genvs",
                          comfy.output_dir.parent / "models" / "nvs" / "genvs"):
            for suffix in (".safetensors", ".json"):
                (model_dir / f"{name}{suffix}").unlink(missing_ok=True)
