"""The pack inside a real ComfyUI: registration, the camera workflow through the API, node errors."""
import json
from pathlib import Path

from tests.conftest import load_pack
from tests.host.conftest import PACK_DIR_NAME
from tests.workflow_check import ui_to_api

ROOT = Path(__file__).resolve().parents[2]


def test_pack_loads_and_registers_every_node(comfy):
    log = comfy.log()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if PACK_DIR_NAME in l), log[-3000:]
    assert "Cannot import" not in "\n".join(l for l in log.splitlines() if PACK_DIR_NAME in l)
    info = comfy.get("/object_info")
    pack = load_pack()
    missing = sorted(set(pack.NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"not registered: {missing}"
    for node_id, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert info[node_id]["display_name"] == display
        assert info[node_id]["category"].startswith("NVS/")
    extensions = comfy.get("/extensions")
    assert any(e.endswith("nvs_text_output.js") for e in extensions), extensions


def test_camera_workflow_runs(comfy):
    prompt = ui_to_api(ROOT / "workflows" / "cameras_and_procedural_scene.json", load_pack().NODE_CLASS_MAPPINGS)
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    outputs = entry["outputs"]
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert len(images) >= 2  # camera rig preview + rendered views
    metrics = next(out["text"][0] for node_id, out in outputs.items()
                   if prompt[node_id]["class_type"] == "NVSMetrics")
    assert "inf" in metrics  # prediction == ground truth
    camera_json = next(out["text"][0] for node_id, out in outputs.items()
                       if prompt[node_id]["class_type"] == "NVSCameraInfo")
    assert len(json.loads(camera_json)["cameras"]) == 8


def test_node_error_reaches_the_user(comfy):
    prompt = {
        "1": {"class_type": "NVSCameraFromJSON", "inputs": {"camera_json": "{not json", "width": 64, "height": 64}},
        "2": {"class_type": "NVSCameraInfo", "inputs": {"cameras": ["1", 0]}},
    }
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "NVSCameraFromJSON"
    assert error["exception_type"] == "ValueError" and "not valid JSON" in error["exception_message"]


def test_widget_ranges_are_enforced_by_the_server(comfy):
    prompt = {"1": {"class_type": "NVSCamera", "inputs": {"elevation": 0.0, "azimuth": 0.0, "radius": -1.0, "fov": 40.0,
                                                         "width": 64, "height": 64}},
              "2": {"class_type": "NVSCameraInfo", "inputs": {"cameras": ["1", 0]}}}
    status, body = comfy.post("/prompt", {"prompt": prompt})
    assert status == 400 and "radius" in json.dumps(body)
