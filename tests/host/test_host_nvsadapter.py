"""The NVS-Adapter inside a real ComfyUI.

(a) The ComfyUI adapter against the diffusers adapter on the same tiny weights: a script run with ComfyUI's
    interpreter (COMFYUI_PYTHON) builds a tiny SD 2.x-layout eps model from ComfyUI's own classes
    (``supported_models.SD20`` config, ``model_base.BaseModel``, ``ModelPatcher``) and a tiny random adapter, and
    runs (1) the published sampler through ``ComfySDBackend`` (middle_patch on a clone, per-row timesteps) and
    (2) ComfyUI's own ``sample_custom`` (euler, the published sigmas) on the ``AdapterUNetCall``-patched clone with
    the in-model guidance (``set_guidance_scale``; the sampler's cfg is 1). This test recomputes the published
    sampler with the diffusers adapter on the saved weights: all three must agree.
(b) The four-views example workflow end to end in a real server: the random full-size SD 2.1 base checkpoint, the
    random CLIP ViT-H vision model, a random full-size adapter in our converted format, the kakaobrain example
    photo, 64x64 and 2 steps; both branches (published sampler, Apply + KSampler).
(c) A bad input (an all-transparent reference photo) reaches the user as an execution error with our message.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import load_pack
from tests.paths import SHARED
from tests.workflow_check import ui_to_api

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
WORKFLOW = ROOT / "workflows" / "nvs_adapter_four_views.json"
SD21 = "random_sd21.safetensors"
VIT_H = "random_vit_h.safetensors"
ADAPTER = "host-nvsadapter-random.safetensors"
PHOTO = SHARED / "samples" / "nvsadapter" / "deer.png"
STEPS = 3

COMFY_SCRIPT = r'''
import importlib, json, sys, types
from pathlib import Path
ROOT, COMFY, OUT, STEPS = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
sys.argv = sys.argv[:1]
sys.path.insert(0, COMFY)
import torch
from safetensors.torch import save_file
torch.set_num_threads(1)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_base, comfy.model_management, comfy.model_patcher, comfy.sample, comfy.samplers
import comfy.supported_models

# Only the modules under test: the pack as a package without running nodes/__init__ (other node modules).
pack = types.ModuleType("nvs_pack"); pack.__path__ = [str(ROOT)]; sys.modules["nvs_pack"] = pack
nodes = types.ModuleType("nvs_pack.nodes"); nodes.__path__ = [str(ROOT / "nodes")]; sys.modules["nvs_pack.nodes"] = nodes
sd_comfy = importlib.import_module("nvs_pack.nodes.sd_comfy")
tiny = importlib.import_module("nvs_pack.nvs_core.sd.tiny")
config = importlib.import_module("nvs_pack.nvs_core.nvsadapter.config")
model_module = importlib.import_module("nvs_pack.nvs_core.nvsadapter.model")
network = importlib.import_module("nvs_pack.nvs_core.nvsadapter.network")
sampler = importlib.import_module("nvs_pack.nvs_core.nvsadapter.sampler")
g = torch.Generator().manual_seed(0)
H, Q = 16, 2
out, report = {}, {}
with torch.inference_mode():  # as inside a ComfyUI prompt: every weight is an inference tensor
    unet_config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[2] * 4,
                       channel_mult=[1, 1, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                       transformer_depth_middle=1, transformer_depth_output=[1] * 9 + [0] * 3,
                       use_spatial_transformer=True, legacy=False, use_temporal_resblock=False,
                       use_temporal_attention=False, context_dim=32, use_linear_in_transformer=True,
                       adm_in_channels=None)
    model_config = comfy.supported_models.SD20(unet_config)
    model_config.unet_config["num_head_channels"] = 16
    model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    tiny.randomize_(model.diffusion_model, g, 0.1)
    mp = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
adapter = tiny.randomize_(model_module.NVSAdapter(config.TINY_SD), g, 0.1).train(False).requires_grad_(False)
for k, v in model.diffusion_model.state_dict().items():
    out["unet." + k] = v.clone()
for k, v in adapter.state_dict().items():
    out["adapter." + k] = v.clone()
text = torch.randn(1, 8, 32, generator=g)
image = torch.randn(1, 1, 24, generator=g)
rays = torch.randn(1, 1 + Q, 144, H, H, generator=g)
ref = torch.randn(1, 1, 4, H, H, generator=g)
noise = torch.randn(1, Q, 4, H, H, generator=g)
out.update(text=text, image=image, rays=rays, ref=ref, noise=noise)
backend = sd_comfy.ComfySDBackend(mp)
report["prediction_type"] = backend.prediction_type
report["unet_config"] = {k: sd_comfy.model_unet_config(mp).get(k) for k in ("context_dim", "model_channels")}
with torch.inference_mode():
    out["faithful"] = sampler.sample(backend, adapter, noise, text, image, rays, ref, steps=STEPS,
                                     generator=torch.Generator().manual_seed(5))
    call = network.AdapterUNetCall(adapter, network.AdapterCondition(ref, image, rays))
    patched = backend.patched_model(call.patches)
    sd_comfy.set_guidance_scale(patched, 3.0)
    report["input_model_untouched"] = (mp.model_options.get("transformer_options", {}) == {}
                                       and "sampler_cfg_function" not in mp.model_options)
    _, sigmas = sampler.sampling_schedule(STEPS)
    # the sampler's cfg is 1: the in-model guidance must still run the unconditional chunk and apply 3.0
    out["stock"] = comfy.sample.sample_custom(patched, noise[0], 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                              [[text, {}]], [[text, {}]], torch.zeros(Q, 4, H, H), seed=5)
    report["latent_scale"] = backend.latent_scaling_factor
save_file({k: v.detach().contiguous() for k, v in out.items()}, str(OUT / "comfy.safetensors"))
(OUT / "report.json").write_text(json.dumps(report))
'''


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nvsadapter")
    script = out / "comfy_side.py"
    script.write_text(COMFY_SCRIPT)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    result = subprocess.run([python, str(script), str(ROOT), COMFYUI_PATH, str(out), str(STEPS)], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    from safetensors.torch import load_file

    return load_file(str(out / "comfy.safetensors")), json.loads((out / "report.json").read_text())


def test_comfy_adapter_equals_the_diffusers_adapter(comfy_run):
    pytest.importorskip("diffusers")
    from nvs_core.nvsadapter.config import TINY_SD
    from nvs_core.nvsadapter.loading import adapter_from_state_dict
    from nvs_core.nvsadapter.sampler import sample
    from nvs_core.progress import silent_progress
    from nvs_core.sd import tiny
    from nvs_core.sd.diffusers_backend import DiffusersSDBackend

    t, report = comfy_run
    assert report["prediction_type"] == "epsilon" and report["input_model_untouched"]
    assert report["unet_config"] == {"context_dim": 32, "model_channels": 32}
    unet = tiny.unet_from_ldm_state_dict(tiny.unet_config_from_ldm(32, (1, 1, 2, 2), 2, (4, 2, 1), 16, 32, 16),
                                         {k[5:]: v for k, v in t.items() if k.startswith("unet.")})
    adapter = adapter_from_state_dict({k[8:]: v for k, v in t.items() if k.startswith("adapter.")}, TINY_SD)
    with torch.no_grad():
        ours = sample(DiffusersSDBackend(unet), adapter, t["noise"], t["text"], t["image"], t["rays"], t["ref"],
                      steps=STEPS, generator=torch.Generator().manual_seed(5), progress=silent_progress)
    scale = float(ours.abs().max())
    assert scale > 1.0
    assert float((ours - t["faithful"]).abs().max()) <= 1e-5 * scale, (ours - t["faithful"]).abs().max()
    # ComfyUI's euler on the published sigmas + the same seed for the reference draws = the published sampler
    stock = t["stock"] * report["latent_scale"]  # sample_custom returns process_latent_out(x)
    assert float((ours[0] - stock).abs().max()) <= 1e-5 * scale, (ours[0] - stock).abs().max()


# ------------------------------------------------------------------------------------------ the workflow
@pytest.fixture(scope="module")
def nvsa_files(comfy):
    """A random full-size adapter (our converted format) in models/nvs/nvs_adapter/, the example photo and an
    all-transparent photo in input/; the random SD 2.1 base and ViT-H files must be in ComfyUI's models."""
    for folder, name in (("checkpoints", SD21), ("clip_vision", VIT_H)):
        if not (Path(COMFYUI_PATH) / "models" / folder / name).is_file():
            pytest.skip(f"{name} not in {COMFYUI_PATH}/models/{folder} (comfy_host setup.sh CKPTS=sd21 CLIP_VISION=1)")
    if not PHOTO.is_file():
        pytest.skip(f"sample photo {PHOTO} not found")
    from nvs_core.checkpoints import save_with_config
    from nvs_core.nvsadapter.config import SD21_BASE
    from nvs_core.nvsadapter.model import NVSAdapter
    from nvs_core.sd import tiny

    base = comfy.output_dir.parent
    folder = base / "models" / "nvs" / "nvs_adapter"
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        adapter = NVSAdapter(SD21_BASE)
    adapter = adapter.to_empty(device="cpu")
    tiny.randomize_(adapter, torch.Generator().manual_seed(0), 0.02)
    state = {k: v.to(torch.float16) for k, v in adapter.state_dict().items()}
    assert len(state) == 344 and sum(v.numel() for v in state.values()) == 217_126_080
    save_with_config(folder / ADAPTER, state, {"method": "nvsadapter", "class": "NVSAdapter",
                                               "constructor": SD21_BASE.to_dict()})
    del adapter, state
    shutil.copy(PHOTO, base / "input" / "deer.png")
    Image.new("RGBA", (48, 40), (200, 30, 30, 0)).save(base / "input" / "transparent.png")
    return base


def _prompt(photo="deer.png", targets_ksampler=True):
    prompt = ui_to_api(WORKFLOW, load_pack().NODE_CLASS_MAPPINGS)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = SD21
        elif kind == "CLIPVisionLoader":
            inputs["clip_name"] = VIT_H
        elif kind == "NVSAdapterLoader":
            inputs.update(adapter=ADAPTER, dtype="auto")
        elif kind == "LoadImage":
            inputs["image"] = photo
        elif kind in ("NVSAdapterSampler", "NVSAdapterApply"):
            inputs["resolution"] = 64
            if kind == "NVSAdapterSampler":
                inputs.update(steps=2, seed=3)
        elif kind == "KSampler":
            inputs["steps"] = 2
    if not targets_ksampler:
        drop = [i for i, n in prompt.items() if n["class_type"] in ("NVSAdapterApply", "KSampler", "VAEDecode")
                or n["inputs"].get("filename_prefix") == "NVS/nvs_adapter_ksampler"]
        for node_id in drop:
            del prompt[node_id]
    return prompt


def _run(comfy, prompt, timeout):
    """``comfy.run`` that tolerates a server too busy to answer one poll (full-size models on a loaded CPU)."""
    import time
    import uuid

    status, body = comfy.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, f"prompt rejected ({status}): {json.dumps(body)[:2000]}"
    prompt_id, deadline = body["prompt_id"], time.time() + timeout
    while time.time() < deadline:
        try:
            history = comfy.get(f"/history/{prompt_id}")
        except (TimeoutError, ConnectionError, OSError):
            continue
        entry = history.get(prompt_id, {})
        if entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        time.sleep(1.0)
    comfy.post("/interrupt", {})
    raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s")


def _node_id(prompt, class_type, **inputs):
    return next(i for i, n in prompt.items() if n["class_type"] == class_type
                and all(n["inputs"].get(k) == v for k, v in inputs.items()))


def test_loader_lists_the_model_folder(comfy, nvsa_files):
    info = comfy.get("/object_info/NVSAdapterLoader")["NVSAdapterLoader"]
    assert ADAPTER in info["input"]["required"]["adapter"][0] and info["category"] == "NVS/NVS-Adapter"


def test_four_views_workflow_runs(comfy, nvsa_files):
    prompt = _prompt()
    entry = _run(comfy, prompt, timeout=2400)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    outputs = entry["outputs"]
    for prefix in ("NVS/nvs_adapter", "NVS/nvs_adapter_ksampler"):
        saved = outputs[_node_id(prompt, "SaveImage", filename_prefix=prefix)]["images"]
        assert len(saved) == 4, prefix  # one view per target camera
        for item in saved:
            with Image.open(comfy.output_dir / item["subfolder"] / item["filename"]) as image:
                assert image.size == (64, 64)
    info = outputs[_node_id(prompt, "NVSAdapterSampler")]["text"][0]
    assert "4 target views in 1 group(s) of up to 4" in info and "background made white" in info
    assert "in-model guidance 3" in outputs[_node_id(prompt, "NVSAdapterApply")]["text"][0]
    loader = outputs[_node_id(prompt, "NVSAdapterLoader")]["text"][0]
    assert "344 tensors, 217,126,080 parameters, 16 blocks" in loader


def test_bad_input_reaches_the_user(comfy, nvsa_files):
    entry = _run(comfy, _prompt("transparent.png", targets_ksampler=False), timeout=1200)
    assert entry["status"]["status_str"] == "error"
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors and errors[0]["node_type"] == "NVSAdapterSampler"
    assert "reference_mask: the mask leaves no object pixel (1 = background)" in errors[0]["exception_message"]
