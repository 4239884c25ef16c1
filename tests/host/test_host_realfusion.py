"""RealFusion inside a real ComfyUI: NVS RealFusion Reconstruct for a few iterations at small resolution on a random
full-size SD 1.5 checkpoint (the published field size, SDS through the host's MODEL/VAE with gradient, prompts through
its CLIP), then NVS Field Render from an orbit; bad inputs reach execution_error with their message."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHECKPOINT = "random_sd15.safetensors"
PHOTO = "nvs_realfusion_host.png"
RGB_PHOTO = "nvs_realfusion_host_rgb.png"


@pytest.fixture(scope="module")
def photos(comfy):
    folder = Path(comfy.output_dir).parent / "input"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 255, (48, 48, 3))
    rgba[12:36, 14:34, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / PHOTO)
    Image.fromarray(rgba[..., :3], "RGB").save(folder / RGB_PHOTO)
    return folder


def _prompt(image=PHOTO, checkpoint=CHECKPOINT, with_mask=True, iterations=3):
    reconstruct = {"image": ["2", 0], "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                   "prompt": "a photo of a toy", "preset": "published", "iterations": iterations, "seed": 1,
                   "multiview_weight": 1.0, "sds_resolution": 64, "render_size": 16, "input_size": 32,
                   "guidance_scale": 100.0, "preview_every": 1, "run_name": "host_test", "resume": False}
    if with_mask:
        reconstruct["mask"] = ["2", 1]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "NVSRealFusionReconstruct", "inputs": reconstruct},
        "4": {"class_type": "NVSOrbitCameras", "inputs": {"count": 2, "elevation": 15.0, "azimuth_start": 0.0,
                                                          "azimuth_sweep": 360.0, "radius": 1.8, "fov": 55.0,
                                                          "width": 24, "height": 24}},
        "5": {"class_type": "NVSFieldRender", "inputs": {"field": ["3", 0], "cameras": ["4", 0],
                                                         "shading": "lambertian"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "nvs_rf_render"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["5", 2], "filename_prefix": "nvs_rf_normals"}},
    }


def _error(entry):
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    return next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")


def test_nodes_are_registered(comfy):
    info = comfy.get("/object_info/NVSRealFusionReconstruct")["NVSRealFusionReconstruct"]
    assert info["category"] == "NVS/RealFusion" and info["output"] == ["NVS_FIELD", "IMAGE", "STRING"]
    for node in ("NVSFieldRender", "NVSFieldLoader", "NVSFieldSave"):
        assert comfy.get(f"/object_info/{node}")[node]["category"] == "NVS/RealFusion"


def test_reconstruct_then_render(comfy, photos):
    entry = comfy.run(_prompt(), timeout=1200)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + comfy.log()[-3000:]
    log = entry["outputs"]["3"]["text"][0]
    print(log)
    assert "step 3" in log and "non-finite SDS gradient values 0" in log
    images = entry["outputs"]["6"]["images"]
    assert len(images) == 2
    render = np.asarray(Image.open(Path(comfy.output_dir) / images[0]["subfolder"] / images[0]["filename"]))
    assert render.shape == (24, 24, 3)
    state = Path(comfy.output_dir) / "nvs_realfusion" / "host_test" / "train_state.pt"
    assert state.is_file()


def test_bad_inputs_reach_execution_error(comfy, photos):
    message = _error(comfy.run(_prompt(image=RGB_PHOTO, with_mask=False, iterations=1), timeout=600))
    assert "no alpha channel" in message["exception_message"] and message["node_type"] == "NVSRealFusionReconstruct"
    message = _error(comfy.run(_prompt(checkpoint="random_sd21v.safetensors", iterations=1), timeout=600))
    assert "Stable Diffusion 1.5" in message["exception_message"] and "1024-wide" in message["exception_message"]
