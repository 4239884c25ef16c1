"""VIVID inside a real ComfyUI: the example workflow with tiny random nets, through the HTTP API."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import load_pack
from tests.workflow_check import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "vivid_novel_views.json"
SOURCE_W, SOURCE_H = 40, 24  # not square: the sampler reports a centre crop


@pytest.fixture(scope="module")
def vivid_files(comfy):
    """Tiny base / guidance / SR nets in the server's models/nvs/vivid/ and a source photo in its input/."""
    from tests.test_nodes_vivid import BASE, SR, save_tiny

    base = comfy.output_dir.parent
    folder = base / "models" / "nvs" / "vivid"
    folder.mkdir(parents=True, exist_ok=True)
    names = {"base": "host-vivid-base.safetensors", "guidance": "host-vivid-uncond.safetensors",
             "sr": "host-vivid-sr.safetensors"}
    save_tiny(folder, names["base"], BASE)
    save_tiny(folder, names["guidance"], dict(BASE, uncond=True), seed=1)
    save_tiny(folder, names["sr"], SR, seed=2)
    pixels = (torch.rand(SOURCE_H, SOURCE_W, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(base / "input" / "vivid_source.png")
    return names


def _prompt(names, *, guidance_model=None, targets=5, **sampler):
    """The example workflow with the tiny nets, the test photo and few steps."""
    prompt = ui_to_api(WORKFLOW, load_pack().NODE_CLASS_MAPPINGS)
    nodes = {node["class_type"]: node["inputs"] for node in prompt.values()}
    nodes["NVSVIVIDLoader"].update(base_model=names["base"], sr_model=names["sr"],
                                   guidance_model=guidance_model or names["guidance"], device="cpu")
    nodes["LoadImage"]["image"] = "vivid_source.png"
    nodes["NVSCamera"].update(width=SOURCE_W, height=SOURCE_H)
    nodes["NVSOrbitCameras"]["count"] = targets
    nodes["NVSVIVIDSampler"].update(dict(steps=2, guidance=1.5, seed=3, batch_size=2, super_resolution=True,
                                         translation_scale=1.0) | sampler)
    return prompt


def _node_id(prompt, class_type):
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def test_loader_lists_the_model_folder(comfy, vivid_files):
    info = comfy.get("/object_info/NVSVIVIDLoader")["NVSVIVIDLoader"]
    required = info["input"]["required"]
    assert vivid_files["base"] in required["base_model"][0]
    assert required["guidance_model"][0][0] == "none" and vivid_files["sr"] in required["sr_model"][0]
    assert info["category"] == "NVS/VIVID"


def test_vivid_workflow_runs(comfy, vivid_files):
    prompt = _prompt(vivid_files)
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    outputs = entry["outputs"]
    saved = outputs[_node_id(prompt, "SaveImage")]["images"]
    assert len(saved) == 5  # one view per target camera
    for item in saved:
        with Image.open(comfy.output_dir / item["subfolder"] / item["filename"]) as image:
            assert image.size == (16, 16)  # the tiny SR net's resolution
    info = outputs[_node_id(prompt, "NVSVIVIDSampler")]["text"][0]
    assert f"source {SOURCE_W}x{SOURCE_H}: centre crop 24x24 at x=8, y=0" in info
    assert "seeds 3..7 (seed + index)" in info and "autoguidance 1.5" in info
    loader_text = outputs[_node_id(prompt, "NVSVIVIDLoader")]["text"][0]
    assert vivid_files["sr"] in loader_text


def test_vivid_errors_reach_the_user(comfy, vivid_files):
    prompt = _prompt(vivid_files, guidance_model="none", targets=2)
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "NVSVIVIDSampler" and error["exception_type"] == "ValueError"
    assert "needs a guidance net" in error["exception_message"]

    prompt = _prompt(vivid_files, targets=2)
    prompt[_node_id(prompt, "NVSVIVIDLoader")]["inputs"]["base_model"] = vivid_files["sr"]
    entry = comfy.run(prompt)
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "NVSVIVIDLoader" and "super-resolution" in error["exception_message"]


def test_vivid_training_workflow_runs(comfy):
    """Training inside the host's inference mode, with the tiny network, then sampling and metrics."""
    prompt = ui_to_api(ROOT / "workflows" / "vivid_train_procedural.json", load_pack().NODE_CLASS_MAPPINGS)
    nodes = {node_id: node for node_id, node in prompt.items()}
    name = "host_test_tiny_vivid"
    for node in nodes.values():
        inputs = node["inputs"]
        if node["class_type"] == "NVSVIVIDTrain":
            inputs.update(network="tiny 16px", steps=2, batch_size=2, output_name=name, resume=False)
        elif node["class_type"] == "NVSCamera":
            inputs.update(width=16, height=16)
        elif node["class_type"] == "NVSOrbitCameras":
            inputs.update(width=16, height=16, count=3)
        elif node["class_type"] == "NVSVIVIDSampler":
            inputs["steps"] = 2
    try:
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        outputs = entry["outputs"]
        summary = outputs[_node_id(prompt, "NVSVIVIDTrain")]["text"][0]
        assert "step 2/2" in summary and "loss " in summary
        assert (comfy.output_dir / "nvs_vivid_training" / name / "training-state.safetensors").is_file()
        saved = summary.split("network: ", 1)[1].splitlines()[0]
        assert Path(saved).name == f"{name}.safetensors" and Path(saved).is_file()
        assert "PSNR" in outputs[_node_id(prompt, "NVSMetrics")]["text"][0]
    finally:  # the node saves into ComfyUI's own models/nvs/vivid/ (the first registered folder)
        for model_dir in (Path(os.environ["COMFYUI_PATH"]) / "models" / "nvs" / "vivid",
                          comfy.output_dir.parent / "models" / "nvs" / "vivid"):
            for suffix in (".safetensors", ".json"):
                (model_dir / f"{name}{suffix}").unlink(missing_ok=True)
