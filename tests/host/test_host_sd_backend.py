"""The ComfyUI adapter (nodes/sd_comfy.py) against the diffusers adapter, on the same tiny random weights.

Route: a script run with ComfyUI's interpreter (COMFYUI_PYTHON) imports the real ComfyUI source
(COMFYUI_PATH) as a library, builds a tiny SD 2.x-layout v-prediction model from ComfyUI's own classes
(``supported_models.SD20`` config, ``model_base.BaseModel``, ``ModelPatcher``; a tiny LDM VAE through
``comfy.sd.VAE``; a tiny CLIP through ``sd1_clip``), fills it with seeded random weights and runs:
  * the adapter's direct noise prediction (CFG, both patches), with and without gradients;
  * ComfyUI's own sampler (``comfy.sample.sample_custom``, Euler, 2 steps, CFG) on the adapter's patched clone;
  * VAE encode/decode (with gradients) and CLIP encoding with an injected vector, compared there against
    ComfyUI's own VAE path and its own token-slot embedding injection.
It saves the weights in the original LDM layout plus every input and output. This test then loads those
weights with ``load_single_file`` (diffusers' ``from_single_file`` converter, local config) and recomputes
everything with the diffusers adapter. The UNet is the only large shared computation, so the two
adapters are compared on it; the server is not needed for this.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

COMFY_SCRIPT = r'''
import functools, importlib, json, sys, types
from pathlib import Path
ROOT, COMFY, OUT = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
sys.argv = sys.argv[:1]
sys.path.insert(0, COMFY)
import torch
from safetensors.torch import save_file
torch.set_num_threads(1)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_base, comfy.model_management, comfy.model_patcher, comfy.sample, comfy.samplers, comfy.sd
import comfy.sd1_clip, comfy.supported_models

# Only the modules under test: the pack as a package without running nodes/__init__ (other node modules).
pack = types.ModuleType("nvs_pack"); pack.__path__ = [str(ROOT)]; sys.modules["nvs_pack"] = pack
nodes = types.ModuleType("nvs_pack.nodes"); nodes.__path__ = [str(ROOT / "nodes")]
sys.modules["nvs_pack.nodes"] = nodes
sd_comfy = importlib.import_module("nvs_pack.nodes.sd_comfy")
sd = importlib.import_module("nvs_pack.nvs_core.sd.interface")
text = importlib.import_module("nvs_pack.nvs_core.viewneti.text")
tiny = importlib.import_module("nvs_pack.nvs_core.sd.tiny")
g = torch.Generator().manual_seed(0)

def randomize(module):
    tiny.randomize_(module, g, bias_std=0.1)

out, report = {}, {}
with torch.inference_mode():  # as inside a ComfyUI prompt: every weight is an inference tensor
    unet_config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[2] * 4,
                       channel_mult=[1, 1, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                       transformer_depth_middle=1,
                       transformer_depth_output=[1] * 9 + [0] * 3, use_spatial_transformer=True, legacy=False,
                       use_temporal_resblock=False, use_temporal_attention=False, context_dim=32,
                       use_linear_in_transformer=True, adm_in_channels=None)
    model_config = comfy.supported_models.SD20(unet_config)
    model_config.unet_config["num_head_channels"] = 16
    model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    randomize(model.diffusion_model)
    model_patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                     offload_device=torch.device("cpu"))
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    randomize(vae.first_stage_model)
    clip_config = {"hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                   "num_hidden_layers": 3, "max_position_embeddings": 16, "vocab_size": 64, "projection_dim": 32,
                   "bos_token_id": 60, "eos_token_id": 61, "layer_norm_eps": 1e-5}
    clip_model = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=clip_config, layer="hidden",
                                   layer_idx=-2, max_length=16, special_tokens={"start": 60, "end": 61, "pad": 0},
                                   return_projected_pooled=False)
    stage = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32, clip_name="h", clip_model=clip_model)
    randomize(stage)
for key, value in model.diffusion_model.state_dict().items():
    out["model.diffusion_model." + key] = value.clone()
for key, value in vae.first_stage_model.state_dict().items():
    out["first_stage_model." + key] = value.clone()

x, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
cond, uncond = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
keys = [torch.randn(1, 8, 32, generator=g) for _ in range(16)]
values = [torch.randn(1, 8, 32, generator=g) for _ in range(16)]
widths = [32] * 4 + [64] * 6 + [32] * 6  # channels of IN01..IN05, IN07..OUT05, OUT06..OUT11
deltas = [torch.randn(widths[l], generator=g) for l in range(16)]
out.update(x=x, noise=noise, cond=cond, uncond=uncond)
out.update({f"keys.{l}": keys[l] for l in range(16)}, **{f"values.{l}": values[l] for l in range(16)})
out.update({f"delta.{l}": deltas[l] for l in range(16)})

class Contexts:
    def __init__(self):
        self.calls, self.prepared = [], []
    def contexts(self, call):
        self.calls.append([call.layer, call.chunk, call.timesteps.tolist()])
        return (keys[call.layer], values[call.layer]) if call.chunk == sd.COND else None
    def prepare(self, timesteps, progress=None):
        self.prepared.append(torch.as_tensor(timesteps).tolist())
    def release(self):
        self.prepared.append("released")

def shift_uncond(hidden, info):
    rows = hidden.shape[0] // len(info.chunks)
    index = info.chunks.index(sd.UNCOND)
    hidden = hidden.clone()
    hidden[index * rows:(index + 1) * rows] += deltas[info.layer]
    return hidden

provider = Contexts()
patches = sd.UNetPatches(provider, shift_uncond)
backend = sd_comfy.ComfySDBackend(model_patcher, vae=vae)
report["prediction_type"] = backend.prediction_type
with torch.inference_mode():
    out["eps_direct"] = backend.predict_noise(x, 600, cond, uncond, 3.0, patches)
    out["eps_plain"] = backend.predict_noise(x, 600, cond, uncond, 3.0)

# ComfyUI's own sampler on the patched clone; the input MODEL stays unpatched
patched = backend.patched_model(patches)
report["input_model_untouched"] = model_patcher.model_options.get("transformer_options", {}) == {}
sigmas = torch.cat([model.model_sampling.sigma(torch.tensor([600.0, 300.0])), torch.zeros(1)])
provider.calls.clear()
with torch.inference_mode():
    out["sampled"] = comfy.sample.sample_custom(patched, noise, 3.0, comfy.samplers.sampler_object("euler"), sigmas,
                                                [[cond, {}]], [[uncond, {}]], torch.zeros(1, 4, 8, 8), seed=0)
out["sigmas"] = sigmas
report["sampler_calls"], report["prepared"] = list(provider.calls), list(provider.prepared)
report["latent_scale"] = backend.latent_scaling_factor

# which physical block each of our layer indices is, as ComfyUI reports it to attn2 patches
blocks = {}
def record(n, context, value, extra):
    blocks[sd_comfy._layer(extra)] = [extra["transformer_index"], list(extra["block"]), extra["block_index"]]
    return n, context, value
probe = model_patcher.clone()
probe.set_model_attn2_patch(record)
with torch.inference_mode():
    sd_comfy.ComfySDBackend(probe).unet(x, 600.0, cond)
report["blocks"] = [blocks[l] for l in range(16)]

# gradients through ComfyUI's inference-mode weights
differentiable = sd_comfy.ComfySDBackend(model_patcher, vae=vae, differentiable=True)
with torch.inference_mode(False):
    context = cond.clone().requires_grad_(True)
    latents = x.clone().requires_grad_(True)
    differentiable.predict_noise(latents, 600, context, uncond.clone(), 3.0, patches).square().mean().backward()
    out["grad_context"], out["grad_latents"] = context.grad, latents.grad
    try:
        plain_context = cond.clone().requires_grad_(True)
        backend.predict_noise(x.clone(), 600, plain_context, uncond.clone(), 3.0).sum().backward()
        report["plain_backward"] = "ok"
    except RuntimeError as e:
        report["plain_backward"] = str(e).splitlines()[0]

# VAE: the adapter's mean latents vs ComfyUI's own encode; gradients through the encoder
images = torch.rand(1, 3, 16, 16, generator=g)
out["images"] = images
with torch.inference_mode():
    mean = backend.encode_images(images * 2 - 1, sample=False)
    comfy_latents = vae.encode(images.movedim(1, -1))  # IMAGE (B, H, W, C) in [0, 1], raw latents
    report["vae_encode_vs_comfy"] = float((mean / backend.latent_scaling_factor - comfy_latents).abs().max())
    out["vae_mean"], out["vae_decoded"] = mean, backend.decode_latents(mean)
    comfy_images = vae.decode(comfy_latents)  # (B, H, W, C) in [0, 1]
    report["vae_decode_vs_comfy"] = float(((out["vae_decoded"].clamp(-1, 1) + 1) / 2
                                           - comfy_images.movedim(-1, 1)).abs().max())
with torch.inference_mode(False):
    pixels = (images * 2 - 1).requires_grad_(True)
    backend.encode_images(pixels, sample=False).square().sum().backward()
    out["vae_grad"] = pixels.grad

# CLIP: the transformers copy vs ComfyUI's own encoding, and an injected vector vs ComfyUI's token-slot injection
clip = types.SimpleNamespace(cond_stage_model=stage, patcher=types.SimpleNamespace(load_device=torch.device("cpu")))
texts = sd_comfy.ComfySDBackend(model_patcher, clip=clip)
ids = [60, 62, 5, 7, 9, 11, 7, 63, 61] + [0] * 7
word = torch.randn(32, generator=g)
with torch.inference_mode():
    comfy_plain = stage.encode_token_weights({"h": [[(i, 1.0) for i in ids]]})[0]
    slots = [(i, 1.0) for i in ids]
    slots[7] = (word, 1.0)
    comfy_injected = stage.encode_token_weights({"h": [slots]})[0]
plain = texts.encode_text(torch.tensor([ids]))
injected = texts.encode_text(torch.tensor([ids]), object_vectors=text.PlaceholderVectors(63, word))
report["clip_layers"] = texts.text_encoder.config.num_hidden_layers
report["clip_plain_vs_comfy"] = float((plain.keys - comfy_plain).abs().max())
report["clip_injected_vs_comfy"] = float((injected.keys - comfy_injected).abs().max())
report["clip_injection_changes"] = float((injected.keys - plain.keys).abs().max())

save_file({k: v.detach().contiguous() for k, v in out.items()}, str(OUT / "comfy.safetensors"))
(OUT / "report.json").write_text(json.dumps(report))
'''


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd_backend")
    script = out / "comfy_side.py"
    script.write_text(COMFY_SCRIPT)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    result = subprocess.run([python, str(script), str(ROOT), COMFYUI_PATH, str(out)], capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    from safetensors.torch import load_file

    return load_file(str(out / "comfy.safetensors")), json.loads((out / "report.json").read_text()), out


@pytest.fixture(scope="module")
def diffusers_backend(comfy_run, tmp_path_factory):
    """The same weights, read from the LDM layout by diffusers' single-file converter."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from nvs_core.sd.diffusers_backend import load_single_file
    from nvs_core.sd.tiny import TINY_UNET, TINY_VAE, tiny_unet, tiny_vae

    tensors, _, out = comfy_run
    folder = tmp_path_factory.mktemp("tiny_config")
    tiny_unet().save_config(folder / "unet")
    tiny_vae().save_config(folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    checkpoint = out / "tiny_ldm.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith(("model.", "first_stage_model."))}, str(checkpoint))
    assert TINY_UNET["cross_attention_dim"] == 32 and TINY_VAE["block_out_channels"] == (32, 32)
    return load_single_file(checkpoint, folder)




def _patches(tensors):
    from nvs_core.sd import COND, UNCOND, UNetPatches

    class Contexts:
        def contexts(self, call):
            return (tensors[f"keys.{call.layer}"], tensors[f"values.{call.layer}"]) if call.chunk == COND else None

    def shift_uncond(hidden, info):
        rows = hidden.shape[0] // len(info.chunks)
        index = info.chunks.index(UNCOND)
        hidden = hidden.clone()
        hidden[index * rows:(index + 1) * rows] += tensors[f"delta.{info.layer}"]
        return hidden

    return UNetPatches(Contexts(), shift_uncond)


def _close(a, b, tol=2e-5):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale


def test_same_noise_prediction_in_both_adapters(comfy_run, diffusers_backend):
    tensors, report, _ = comfy_run
    assert report["prediction_type"] == diffusers_backend.prediction_type == "v_prediction"
    with torch.no_grad():
        eps = diffusers_backend.predict_noise(tensors["x"], 600, tensors["cond"], tensors["uncond"], 3.0,
                                              _patches(tensors))
        plain = diffusers_backend.predict_noise(tensors["x"], 600, tensors["cond"], tensors["uncond"], 3.0)
    assert _close(eps, tensors["eps_direct"]), (eps - tensors["eps_direct"]).abs().max()
    assert _close(plain, tensors["eps_plain"]), (plain - tensors["eps_plain"]).abs().max()
    assert (eps - plain).abs().max() > 1e-2  # the patches matter


def test_comfy_sampler_on_the_patched_clone_matches_diffusers_euler(comfy_run, diffusers_backend):
    tensors, report, _ = comfy_run
    sigmas = tensors["sigmas"].tolist()
    schedule = diffusers_backend.schedule
    x = tensors["noise"] * sigmas[0]
    with torch.no_grad():
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):  # Euler in sigma space with CFG on eps
            eps = diffusers_backend.predict_noise(x / (1 + sigma ** 2) ** 0.5, schedule.timestep(torch.tensor(sigma)),
                                                  tensors["cond"], tensors["uncond"], 3.0, _patches(tensors))
            x = x + eps * (next_sigma - sigma)
    comfy = tensors["sampled"] * report["latent_scale"]  # sample_custom returns process_latent_out(x)
    assert _close(x, comfy), (x - comfy).abs().max()
    # one precompute for the run's schedule, released afterwards; chunk labels, not positions
    assert report["prepared"] == [[600.0, 300.0], "released"] and report["input_model_untouched"]
    calls = report["sampler_calls"]
    assert len(calls) == 2 * 16 * 2
    assert {c[1] for c in calls} == {"cond", "uncond"}
    assert [c[0] for c in calls if c[1] == "cond"] == list(range(16)) * 2
    assert [c[2] for c in calls if c[1] == "cond"] == [[600.0]] * 16 + [[300.0]] * 16


def test_layer_indices_are_the_same_physical_layers(comfy_run, diffusers_backend):
    """ComfyUI's transformer_index/block for each of our indices names an LDM module whose weights are the
    weights of the module the diffusers adapter uses for that index."""
    from nvs_core.sd import LDM_BLOCKS

    tensors, report, _ = comfy_run
    for layer, (index, (kind, block_id), block_index) in enumerate(report["blocks"]):
        assert index == layer and block_index == 0 and (kind, block_id) == LDM_BLOCKS[layer]
        ldm = f"{kind}_blocks.{block_id}.1" if kind != "middle" else "middle_block.1"
        for projection in ("to_k", "to_v", "to_q"):
            comfy_weight = tensors[f"model.diffusion_model.{ldm}.transformer_blocks.0.attn2.{projection}.weight"]
            ours = getattr(diffusers_backend.layers[layer].attn2, projection).weight
            assert torch.equal(comfy_weight, ours), (layer, ldm, diffusers_backend.layers[layer].name)


def test_gradients_through_comfy_inference_weights(comfy_run, diffusers_backend):
    tensors, report, _ = comfy_run
    assert "Inference tensors" in report["plain_backward"] or report["plain_backward"] == "ok"
    context = tensors["cond"].clone().requires_grad_(True)
    latents = tensors["x"].clone().requires_grad_(True)
    diffusers_backend.predict_noise(latents, 600, context, tensors["uncond"], 3.0,
                                    _patches(tensors)).square().mean().backward()
    assert _close(context.grad, tensors["grad_context"], 1e-4) and _close(latents.grad, tensors["grad_latents"], 1e-4)


def test_vae_and_text_encoder_match_comfy(comfy_run, diffusers_backend):
    tensors, report, _ = comfy_run
    assert report["vae_encode_vs_comfy"] < 1e-5 and report["vae_decode_vs_comfy"] < 1e-5
    images = tensors["images"] * 2 - 1
    with torch.no_grad():
        mean = diffusers_backend.encode_images(images, sample=False)
        decoded = diffusers_backend.decode_latents(mean)
    assert _close(mean, tensors["vae_mean"]) and _close(decoded, tensors["vae_decoded"])
    pixels = images.clone().requires_grad_(True)
    diffusers_backend.encode_images(pixels, sample=False).square().sum().backward()
    assert _close(pixels.grad, tensors["vae_grad"], 1e-4)
    assert report["clip_layers"] == 2  # ComfyUI's "penultimate" of a 3-layer tower
    assert report["clip_plain_vs_comfy"] < 1e-5 and report["clip_injected_vs_comfy"] < 1e-5
    assert report["clip_injection_changes"] > 1e-2
