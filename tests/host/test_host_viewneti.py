"""ViewNeTI inside a real ComfyUI: the novel-view workflow on a random full-size SD 2.1 (768-v) checkpoint.

The view mapper is a random full-width (1024) arch-15 mapper in our converted format (the golden checkpoint's
config, fresh weights); the object mapper is the golden one in the published pickle format; the camera range
comes from the golden synthetic cal18 folder, put where the workflow's default expects it (models/nvs/viewneti/
cal18). Sampling is 64x64 with 2 steps, so the run is about the text-encoder passes and the UNet at full size.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import load_pack
from tests.paths import GOLDEN_DIR
from tests.workflow_check import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "viewneti_novel_views.json"
GOLDEN = GOLDEN_DIR / "viewneti"
CHECKPOINT = "random_sd21v.safetensors"
VIEW_FILE = "host-viewneti-view.safetensors"
OBJECT_FILE = "mapper-steps-10_object.pt"
VIEWS = 2


@pytest.fixture(scope="module")
def viewneti_files(comfy):
    if not (GOLDEN / "checkpoints").is_dir():
        pytest.skip("golden ViewNeTI files not found")
    from nvs_core.checkpoints import save_with_config
    from nvs_core.viewneti.loading import convert_viewneti_file

    folder = comfy.output_dir.parent / "models" / "nvs" / "viewneti"
    folder.mkdir(parents=True, exist_ok=True)
    tensors, config = convert_viewneti_file(GOLDEN / "checkpoints" / "mapper-steps-10_view.pt")
    g = torch.Generator().manual_seed(7)
    fresh = {k: (v if k.endswith("encoder.w") else torch.randn(v.shape, generator=g) * (0.3 if v.ndim > 1 else 0.1))
             for k, v in tensors.items()}
    assert config["constructor"]["word_dim"] == 1024 and fresh["mappers.0.output_layer.0.weight"].shape == (2048, 64)
    save_with_config(folder / VIEW_FILE, fresh, config)
    shutil.copy(GOLDEN / "checkpoints" / OBJECT_FILE, folder / OBJECT_FILE)
    if not (folder / "cal18").is_dir():
        shutil.copytree(GOLDEN / "cal18_synthetic", folder / "cal18")
    return folder


def _prompt(workflow=WORKFLOW, views=VIEWS, **apply_inputs):
    prompt = ui_to_api(workflow, load_pack().NODE_CLASS_MAPPINGS)
    nodes = {node["class_type"]: node["inputs"] for node in prompt.values()}
    nodes["CheckpointLoaderSimple"]["ckpt_name"] = CHECKPOINT
    nodes["NVSViewNeTILoader"]["view_mapper"] = VIEW_FILE
    if "NVSOrbitCameras" in nodes:
        nodes["NVSOrbitCameras"]["count"] = views
        nodes["NVSViewNeTILoader"]["object_mapper"] = OBJECT_FILE
    nodes["EmptyLatentImage"].update(width=64, height=64, batch_size=views)
    nodes["KSampler"].update(steps=2, seed=1)
    nodes["NVSViewNeTIApply"].update(apply_inputs)
    return prompt


def _node_id(prompt, class_type):
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def _error(entry):
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


def test_nodes_are_registered(comfy, viewneti_files):
    info = comfy.get("/object_info/NVSViewNeTIApply")["NVSViewNeTIApply"]
    assert info["category"] == "NVS/ViewNeTI" and info["output"] == ["MODEL", "CONDITIONING", "CONDITIONING"]
    files = comfy.get("/object_info/NVSViewNeTILoader")["NVSViewNeTILoader"]["input"]["required"]["view_mapper"][0]
    assert VIEW_FILE in files and OBJECT_FILE in files


def test_novel_view_workflow_runs_on_full_size_sd21v(comfy, viewneti_files):
    prompt = _prompt()
    entry = comfy.run(prompt, timeout=1200)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    outputs = entry["outputs"]
    saved = outputs[_node_id(prompt, "SaveImage")]["images"]
    assert len(saved) == VIEWS  # one image per camera
    pixels = []
    for item in saved:
        with Image.open(comfy.output_dir / item["subfolder"] / item["filename"]) as image:
            assert image.size == (64, 64)
            pixels.append(torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32)))
    assert (pixels[0] - pixels[1]).abs().max() > 0  # the two views differ (same seed, different view tokens)
    loader_text = outputs[_node_id(prompt, "NVSViewNeTILoader")]["text"][0]
    assert f"view mapper: {VIEW_FILE} (dtu-12d, 1024-wide words" in loader_text and "(64 cameras)" in loader_text
    apply_text = outputs[_node_id(prompt, "NVSViewNeTIApply")]["text"][0]
    assert f"{VIEWS} views" in apply_text and "object mapper: <object>" in apply_text
    times = {m[0]: m[1].get("timestamp") for m in entry["status"]["messages"]}
    if times.get("execution_start") and times.get("execution_success"):
        print(f"novel-view workflow, {VIEWS} views, 2 steps, 64x64, full-size SD 2.1 on CPU: "
              f"{(times['execution_success'] - times['execution_start']) / 1000:.1f} s")


def test_view_control_workflow_runs(comfy, viewneti_files):
    """A free prompt behind the view token, a DTU camera by index, no object mapper."""
    prompt = _prompt(ROOT / "workflows" / "viewneti_view_control_prompt.json", views=1, dtu_cameras="25")
    entry = comfy.run(prompt, timeout=1200)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert len(entry["outputs"][_node_id(prompt, "SaveImage")]["images"]) == 1
    apply_text = entry["outputs"][_node_id(prompt, "NVSViewNeTIApply")]["text"][0]
    assert "'{view}. A photo of a red car'" in apply_text and "1 view (DTU camera 25)" in apply_text


def test_bad_inputs_reach_the_user(comfy, viewneti_files):
    entry = comfy.run(_prompt(prompt_template="A photo of a {object}"))
    error = _error(entry)
    assert error["node_type"] == "NVSViewNeTIApply" and error["exception_type"] == "ValueError"
    assert "prompt_template: the template has no {view} field" in error["exception_message"]

    prompt = _prompt()
    prompt[_node_id(prompt, "EmptyLatentImage")]["inputs"]["batch_size"] = 1
    error = _error(comfy.run(prompt, timeout=900))
    assert error["node_type"] == "KSampler"
    assert f"NVS ViewNeTI Apply was given {VIEWS} views: set the latent batch_size to {VIEWS}" \
        in error["exception_message"]
