"""ViewNeTI training inside a real ComfyUI: the example workflow through the HTTP API on the full-size random
SD 2.1 768-v checkpoint (``models/checkpoints/random_sd21v.safetensors`` of the host), at 64x64 pixels for one
step, so the whole path runs: ComfyUI's inference mode, cloned inputs, the differentiable ComfyUI adapter
(ordinary-tensor aliases of the inference-mode weights), the CLIP copy with injected vectors, the VAE posterior
sample, the saved files; then the trained mapper goes into NVS ViewNeTI Apply and the stock KSampler renders two
novel views (2 steps)."""
import json
import os
from pathlib import Path

import pytest

from tests.conftest import load_pack
from tests.workflow_check import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "viewneti_train_single_scene.json"
CHECKPOINT = "random_sd21v.safetensors"
NAME = "host_test_viewneti_train"


def _node_id(prompt, class_type):
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def _prompt(**train):
    from tests.test_nodes_viewneti_train import NOVEL_ORBIT, TRAIN_ORBIT

    prompt = ui_to_api(WORKFLOW, load_pack().NODE_CLASS_MAPPINGS)
    nodes = {node["class_type"]: node["inputs"] for node in prompt.values()}
    nodes["CheckpointLoaderSimple"]["ckpt_name"] = CHECKPOINT
    prompt[str(TRAIN_ORBIT)]["inputs"].update(count=2, width=64, height=64)
    prompt[str(NOVEL_ORBIT)]["inputs"].update(count=2, azimuth_start=310.0, azimuth_sweep=20.0, width=64, height=64)
    nodes["EmptyLatentImage"].update(width=64, height=64, batch_size=2)
    nodes["KSampler"].update(steps=2)
    nodes["NVSViewNeTITrain"].update(dict(steps=1, batch_size=1, gradient_accumulation=1, width=64, height=64,
                                          output_name=NAME, resume=False, checkpoint_every=0) | train)
    return prompt


@pytest.fixture(scope="module")
def checkpoint_available():
    path = Path(os.environ["COMFYUI_PATH"]) / "models" / "checkpoints" / CHECKPOINT
    if not path.is_file():
        pytest.skip(f"{path} not found: put a random full-size SD 2.1 768-v checkpoint there "
                    "(../shared/comfy_host/README.md)")
    return path


def test_training_workflow_runs_on_full_size_sd21v(comfy, checkpoint_available):
    prompt = _prompt()
    try:
        entry = comfy.run(prompt, timeout=1800)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        summary = entry["outputs"][_node_id(prompt, "NVSViewNeTITrain")]["text"][0]
        print(summary)  # shown with pytest -s: step time and loss on the full-size model
        assert "mode 2" in summary and "step 1/1" in summary and "skipped non-finite steps: 0" in summary
        loss = float(summary.split("loss ", 1)[1].split()[0])
        assert loss == loss and loss > 0  # finite MSE against v
        files = [Path(p) for p in summary.split("files: ", 1)[1].splitlines()[0].split(", ")]
        assert {p.name for p in files} == {f"{NAME}_view.safetensors", f"{NAME}_object.safetensors",
                                           f"{NAME}_learned_embeds.safetensors"}
        from nvs_core.viewneti.loading import load_viewneti

        by_kind = {p.stem.rsplit("_", 1)[-1] if "embeds" not in p.stem else "embeds": p for p in files}
        model = load_viewneti(by_kind["view"], by_kind["object"], by_kind["embeds"])
        assert model.view.word_dim == 1024 and model.view.camera_representation in ("phi", "theta-phi")
        assert list(model.objects) == ["<object>"] and model.objects["<object>"].bypass_alpha == 5.0
        alone = load_viewneti(by_kind["view"])  # the view file alone keeps the spherical range
        assert alone.view_range == model.view_range
        images = entry["outputs"][_node_id(prompt, "SaveImage")]["images"]
        assert len(images) == 2  # the trained mapper rendered the two novel views
        for image in images:
            (comfy.output_dir / image.get("subfolder", "") / image["filename"]).unlink(missing_ok=True)
        state = comfy.output_dir / "nvs_viewneti_training" / NAME / "training-state.safetensors"
        assert state.is_file()
    finally:
        for model_dir in (Path(os.environ["COMFYUI_PATH"]) / "models" / "nvs" / "viewneti",
                          comfy.output_dir.parent / "models" / "nvs" / "viewneti"):
            for kind in ("view", "object", "learned_embeds"):
                for suffix in (".safetensors", ".json"):
                    (model_dir / f"{NAME}_{kind}{suffix}").unlink(missing_ok=True)


def test_training_errors_reach_the_user(comfy, checkpoint_available):
    prompt = _prompt(learnable_mode="5: pretrained view (frozen) + object")
    entry = comfy.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "NVSViewNeTITrain" and error["exception_type"] == "ValueError"
    assert "pretrained_view_mapper: learnable mode 5" in error["exception_message"]
