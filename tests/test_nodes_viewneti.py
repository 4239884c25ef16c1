"""ViewNeTI nodes without ComfyUI: the loader on published and converted files, Apply through stand-in host
objects (the real patch state of nodes/sd_comfy.py driven as ComfyUI drives it), and the bad inputs."""
import importlib
import math
import shutil
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import load_pack
from tests.paths import GOLDEN_DIR
from tests.test_viewneti_prompting import _model as random_model
from tests.test_viewneti_prompting import word_tokenize

pack = load_pack()


def _core(name):
    """The pack's own nvs_core modules (ComfyUI imports the pack as a package; its classes are these)."""
    return importlib.import_module(f"{pack.__name__}.nvs_core.{name}")


cam = _core("cameras")
convert = _core("convert").convert
COND, LDM_BLOCKS = _core("sd.interface").COND, _core("sd.interface").LDM_BLOCKS
P = _core("viewneti.prompting")
DTUCalibration = _core("viewneti.camera_tokens").DTUCalibration
ViewNetiContexts = _core("viewneti.injection").ViewNetiContexts
ViewNetiModel = _core("viewneti.loading").ViewNetiModel
ViewNetiMapper = _core("viewneti.mapper").ViewNetiMapper
GOLDEN = GOLDEN_DIR / "viewneti"
CHECKPOINTS = GOLDEN / "checkpoints"
pytestmark = pytest.mark.skipif(not CHECKPOINTS.is_dir(), reason="golden ViewNeTI files not found")

nodes_viewneti = importlib.import_module(pack.__name__ + ".nodes.nodes_viewneti")
sd_comfy = importlib.import_module(pack.__name__ + ".nodes.sd_comfy")
Loader = pack.NODE_CLASS_MAPPINGS["NVSViewNeTILoader"]
Apply = pack.NODE_CLASS_MAPPINGS["NVSViewNeTIApply"]


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """models/nvs/viewneti/ with the published-format files, a converted view mapper and cal18."""
    folder = tmp_path / "models" / "viewneti"
    folder.mkdir(parents=True)
    for name in ("mapper-steps-10_view.pt", "mapper-steps-10_object.pt", "learned_embeds-steps-10.bin"):
        shutil.copy(CHECKPOINTS / name, folder / name)
    convert(CHECKPOINTS / "mapper-steps-10_view.pt", "viewneti", folder / "view-converted.safetensors")
    shutil.copytree(GOLDEN / "cal18_synthetic", folder / "cal18")
    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path / "models"))
    return folder


def _load(**kwargs):
    args = dict(view_mapper="mapper-steps-10_view.pt", object_mapper="none", dtu_calibration="cal18") | kwargs
    out = Loader().load(**args)
    return out["result"][0], out["ui"]["text"][0]


# ------------------------------------------------------------------------------------------ loader
def test_loader_lists_files_and_reads_published_files(models_dir):
    files = Loader.INPUT_TYPES()["required"]["view_mapper"][0]
    assert files[0] == "none" and "mapper-steps-10_view.pt" in files and "view-converted.safetensors" in files
    model, text = _load(object_mapper="mapper-steps-10_object.pt", learned_embeds="learned_embeds-steps-10.bin")
    assert isinstance(model, ViewNetiModel) and list(model.objects) == ["<object>"]
    assert model.view.word_dim == 1024 and model.view.bypass_alpha == 5.0
    assert isinstance(P.calibration_of(model), DTUCalibration) and len(P.calibration_of(model)) == 64
    assert "view mapper: mapper-steps-10_view.pt (dtu-12d, 1024-wide words" in text
    assert "object mapper <object>" in text and "(64 cameras)" in text and "3 training views" in text


def test_converted_file_and_range_numbers_give_the_same_mapper(models_dir):
    published, _ = _load()
    calibration = DTUCalibration.from_folder(GOLDEN / "cal18_synthetic")
    numbers = ", ".join(f"{v:.9g}" for v in calibration.camera_range().to_numbers())
    converted, text = _load(view_mapper="view-converted.safetensors", dtu_calibration=numbers)
    assert "DTU camera range from 24 numbers" in text and P.calibration_of(converted) is None
    tokens = calibration.tokens()[20:24]
    assert torch.equal(published.view_inputs(tokens), converted.view_inputs(tokens))
    t, layer = torch.tensor([999.0, 33.0, 500.0, 1.0]), torch.tensor([0.0, 6.0, 15.0, 3.0])
    a = published.view(t, layer, published.view_inputs(tokens))
    b = converted.view(t, layer, converted.view_inputs(tokens))
    assert torch.equal(a.word, b.word) and torch.equal(a.bypass, b.bypass)
    absolute, _ = _load(view_mapper=str(CHECKPOINTS / "mapper-steps-10_view.pt"),
                        dtu_calibration=str(GOLDEN / "cal18_synthetic"))
    assert torch.equal(absolute.view.output_layer[0].weight, published.view.output_layer[0].weight)


def test_view_alpha_option(models_dir):
    model, _ = _load(view_bypass_alpha="view alpha")
    assert model.view.bypass_alpha == 5.0  # both alphas are 5 in the shipped configs; the option is accepted
    with pytest.raises(ValueError, match="view_bypass_alpha must be one of"):
        _load(view_bypass_alpha="half")


@pytest.mark.parametrize("kwargs, message", [
    (dict(view_mapper="none"), "view_mapper: choose a view mapper file"),
    (dict(view_mapper="missing_view.pt"), "view_mapper: model file 'missing_view.pt' not found"),
    (dict(view_mapper="mapper-steps-10_object.pt"), "view_mapper: .*expected a view-mapper file, found a object"),
    (dict(view_mapper="learned_embeds-steps-10.bin"), "view_mapper: .*token registry, not a mapper checkpoint"),
    (dict(object_mapper="mapper-steps-10_view.pt"), "object_mapper: .*expected an object-mapper file"),
    (dict(dtu_calibration=""), "dtu_calibration: this DTU view mapper needs the camera range"),
    (dict(dtu_calibration="nowhere"), "dtu_calibration: folder 'nowhere' not found"),
    (dict(dtu_calibration="1, 2, 3"), "dtu_calibration: 3 numbers"),
])
def test_loader_bad_inputs(models_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _load(**kwargs)


def test_calibration_folder_with_a_missing_file(models_dir):
    (models_dir / "cal18" / "pos_017.txt").unlink()
    with pytest.raises(ValueError, match="dtu_calibration: .*missing DTU calibration file pos_017.txt"):
        _load()


def test_loader_is_changed_follows_the_files(models_dir):
    before = Loader.IS_CHANGED("mapper-steps-10_view.pt", "none", "cal18")
    shutil.copy(CHECKPOINTS / "mapper-steps-10_object.pt", models_dir / "mapper-steps-10_view.pt")
    assert Loader.IS_CHANGED("mapper-steps-10_view.pt", "none", "cal18") != before


# ------------------------------------------------------------------------------------------ apply
class FakeSampling:
    """model_sampling.timestep: sigma -> the UNet's discrete timestep (as tests/test_sd_backend_comfy.py)."""

    def timestep(self, sigma):
        return (torch.as_tensor(sigma) * 100).round()


def _model(calibration, **kwargs):
    return random_model(calibration, classes=(ViewNetiMapper, ViewNetiModel, P), **kwargs)


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    return _core("sd.tiny").tiny_backend(seed=3)


@pytest.fixture
def host(tiny, monkeypatch):
    """Stand-ins for ComfyUI's MODEL and CLIP, and a backend whose patched MODEL is sd_comfy's real patch state."""
    made, encoded = [], []

    class Backend:
        def __init__(self, model, clip, text_dtype=torch.float32):
            self.text_dtype, self.released = text_dtype, 0
            made.append(self)

        tokenize = staticmethod(word_tokenize)

        def encode_text(self, *args, **kwargs):
            return tiny.encode_text(*args, **kwargs)

        def patched_model(self, patches):
            self.patch = sd_comfy.ComfyPatch(patches, FakeSampling())
            return self.patch

        def release_text_encoder(self):
            self.released += 1

    def encode_prompt(clip, text):
        encoded.append(text)
        return [[torch.zeros(1, 16, 32), {}]]

    monkeypatch.setattr(sd_comfy, "ComfySDBackend", Backend)
    monkeypatch.setattr(sd_comfy, "encode_prompt", encode_prompt)
    embeddings = getattr(tiny.text_encoder, "text_model", tiny.text_encoder).embeddings  # ComfyUI's CLIP layout
    transformer = types.SimpleNamespace(text_model=types.SimpleNamespace(embeddings=embeddings))
    stage = types.SimpleNamespace(clip="clip_h", clip_h=types.SimpleNamespace(transformer=transformer))
    clip = types.SimpleNamespace(cond_stage_model=stage, patcher=types.SimpleNamespace(load_device="cpu"))
    model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(
        unet_config={"context_dim": 32})))
    return types.SimpleNamespace(model=model, clip=clip, made=made, encoded=encoded)


@pytest.fixture(scope="module")
def calibration():
    return DTUCalibration.from_folder(GOLDEN / "cal18_synthetic")


def _apply(host, mapper, **kwargs):
    args = dict(model=host.model, clip=host.clip, view_mapper=mapper) | kwargs
    out = Apply().apply(**args)
    return out["result"], out["ui"]["text"][0]


def _extra(layer, sigma, rows):
    kind, block = LDM_BLOCKS[layer]
    return {"transformer_index": layer, "block": (kind, block), "block_index": 0, "cond_or_uncond": [1, 0],
            "sigmas": torch.full((rows,), sigma)}


def test_apply_patches_the_cond_chunk_with_the_views(host, calibration, tiny):
    mapper = _model(calibration)
    orbit = cam.orbit(3, 0.0, math.radians(-20), math.radians(40), 2.0, math.radians(23.5), 768, 576)
    (patch, positive, negative), text = _apply(host, mapper, cameras=orbit, negative_prompt="blurry",
                                               context_cache_mb=16)
    backend = host.made[-1]
    assert host.encoded == ["view. A photo of a object", "blurry"]
    assert "3 views" in text and "latent batch must be 3" in text and "up to" in text
    rows = P.view_rows(mapper, cameras=orbit, calibration=calibration)
    tokens = P.tokenize_template(P.PromptTemplate.parse(P.DEFAULT_TEMPLATE), word_tokenize, 64)
    reference = ViewNetiContexts(tiny, tokens.input_ids, mapper.view, tokens.token_ids["view"], rows.params,
                                 mapper.objects["<object>"], tokens.token_ids["object"])
    sigmas = torch.tensor([9.99, 4.0, 0.0])
    seen = []

    def sampler(noise, latent, sampler_object, sigmas, *rest, **kwargs):  # what ComfyUI's sampling does
        provider = patch.patches.contexts
        assert provider.precomputed == 2  # prepared before the first UNet call
        for sigma in sigmas[:-1].tolist():
            for layer in (0, 6, 15):
                n, context = torch.zeros(6, 4, 32), torch.randn(6, 16, 32)
                _, keys, values = patch.attn2_patch(n, context, context, _extra(layer, sigma, 3))
                assert torch.equal(keys[:3], context[:3]) and torch.equal(values[:3], context[:3])  # uncond kept
                t = round(sigma * 100)
                call = types.SimpleNamespace(layer=layer, chunk=COND, timesteps=torch.full((3,), float(t)), rows=3,
                                             shared_timestep=float(t))
                ref_keys, ref_values = reference.contexts(call)
                assert torch.allclose(keys[3:], ref_keys) and torch.allclose(values[3:], ref_values)
                seen.append((t, layer))
        return "latents"

    with torch.no_grad():
        assert patch.outer_sample(sampler, torch.zeros(3, 4, 8, 8), torch.zeros(3, 4, 8, 8), None, sigmas) == "latents"
    assert seen[0] == (999, 0) and len(seen) == 6
    assert backend.released == 1 and patch.patches.contexts.cache_bytes == 0
    with pytest.raises(ValueError, match="latent batch holds 1 latents but NVS ViewNeTI Apply was given 3 views"):
        patch.outer_sample(sampler, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), None, sigmas)
    assert patch.patches.contexts.precomputed == 2  # refused before any preparation


def test_apply_with_dtu_indices_and_a_free_prompt(host, calibration):
    mapper = _model(calibration)
    (patch, _, _), text = _apply(host, mapper, prompt_template="{view}. A photo of a red car", dtu_cameras="22, 25")
    provider = patch.patches.contexts
    assert provider.object_mapper is None and provider.rows == 2 and "DTU camera 22, DTU camera 25" in text
    assert host.encoded[0] == "view. A photo of a red car"


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_template="A photo of a red car"), r"prompt_template: the template has no \{view\}"),
    (dict(prompt_template="{view} {view}"), "prompt_template: {view} appears more than once"),
    (dict(prompt_template="{view}. {thing}"), "prompt_template: unknown field '{thing}'"),
    (dict(cameras="orbit"), "cameras: expected NVS_CAMERA cameras"),
    (dict(dtu_cameras="99"), "dtu_cameras: DTU camera 99 is not in the calibration"),
    (dict(object_token="<scan3>"), "object_token: '<scan3>' is not in the object mapper file"),
    (dict(reference_radius=float("nan")), "reference_radius must be a finite number"),
])
def test_apply_bad_inputs(host, calibration, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _apply(host, _model(calibration), **kwargs)


def test_apply_refuses_far_cameras_and_missing_pieces(host, calibration):
    mapper = _model(calibration)
    behind = cam.orbit(2, 0.0, math.radians(170), math.radians(20), 2.0, math.radians(23.5), 768, 576)
    with pytest.raises(ValueError, match="cameras: camera 0 is outside the camera range the view mapper was trained on"):
        _apply(host, mapper, cameras=behind)
    no_object = _model(calibration, with_object=False)
    with pytest.raises(ValueError, match=r"prompt_template: the template uses \{object\} but no object mapper"):
        _apply(host, no_object)
    numbers_only = ViewNetiModel(mapper.view, mapper.objects, {}, mapper.view_range)
    with pytest.raises(ValueError, match="dtu_cameras: choosing DTU cameras by index needs the calibration folder"):
        _apply(host, numbers_only)
    with pytest.raises(ValueError, match="view_mapper: expected the NVS_VIEW_MAPPER"):
        _apply(host, "mapper")


def test_apply_refuses_a_mapper_for_another_text_width(host, models_dir):
    published, _ = _load()  # 1024-wide (SD 2.1) words; the stand-in CLIP is 32 wide
    with pytest.raises(ValueError, match="view_mapper: the view mapper makes 1024-wide word embeddings.*32-wide tokens"):
        _apply(host, published)
    host.model.model.model_config.unet_config["context_dim"] = 64
    with pytest.raises(ValueError, match="clip: 32-wide tokens, but the MODEL's cross-attention takes 64"):
        _apply(host, _model(DTUCalibration.from_folder(models_dir / "cal18")))


# ------------------------------------------------------------------------------------------ workflows
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
CHECKPOINT_NAME = "v2-1_768-ema-pruned.safetensors"  # stabilityai/stable-diffusion-2-1 (768-v)
READ_ME = """## ViewNeTI {what}

**Files** (see the pack README):
* `ComfyUI/models/checkpoints/{checkpoint}`: Stable Diffusion 2.1 (768-v), the model ViewNeTI was trained with.
* `ComfyUI/models/nvs/viewneti/`: the published pretrained view mapper `mapper-steps-50000_view.pt`{object_line}.
* `ComfyUI/models/nvs/viewneti/cal18/`: the DTU SampleSet calibration folder `Calibration/cal18` (`pos_001.txt` ...
  `pos_064.txt`); its min/max normalise the view mapper's camera input (or type the 24 numbers into the loader).

{body}

**One latent per view**: the Empty Latent Image `batch_size` must equal the number of views ({count} here).
Published sampling: DPM-Solver++ 2M (`dpmpp_2m`, `normal` scheduler: the same 30 timesteps), guidance 7.5, 768x576."""


def _note(what, count, body, object_line=""):
    return READ_ME.format(what=what, checkpoint=CHECKPOINT_NAME, object_line=object_line, body=body, count=count)


def build_workflows():
    """The two example workflows (regenerate with ``python -m tests.test_nodes_viewneti``)."""
    from tests.ui_workflow import UIWorkflow

    out = {}
    # novel views of a trained object: pretrained view mapper + the scene's object mapper, an orbit of cameras
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt = wf.add("CheckpointLoaderSimple", (40, 40), size=(340, 100), ckpt_name=CHECKPOINT_NAME)
    loader = wf.add("NVSViewNeTILoader", (40, 190), size=(340, 180), view_mapper="mapper-steps-50000_view.pt",
                    object_mapper="mapper-steps-3000_object.pt", dtu_calibration="cal18")
    orbit = wf.add("NVSOrbitCameras", (40, 420), title="Target cameras (DTU-like)", size=(340, 260), count=5,
                   elevation=0.0, azimuth_start=-30.0, azimuth_sweep=60.0, radius=2.0, fov=23.5, width=768,
                   height=576)
    apply = wf.add("NVSViewNeTIApply", (420, 40), size=(400, 460), prompt_template="{view}. A photo of a {object}",
                   negative_prompt="", dtu_cameras="25")
    latent = wf.add("EmptyLatentImage", (420, 550), size=(400, 110), width=768, height=576, batch_size=5)
    sampler = wf.add("KSampler", (860, 40), size=(320, 270), seed=0, steps=30, cfg=7.5, sampler_name="dpmpp_2m",
                     scheduler="normal", denoise=1.0)
    decode = wf.add("VAEDecode", (860, 350), size=(220, 50))
    save = wf.add("SaveImage", (1220, 40), title="Novel views", size=(480, 400), filename_prefix="NVS/viewneti")
    wf.add("MarkdownNote", (860, 480), title="Read me", size=(840, 280), text=_note(
        "novel views", 5, "The object mapper comes from a trained scene (the published `view_neti_models.tar.gz`, "
        "e.g. `scan114/.../mapper-steps-3000_object.pt`, or NVS ViewNeTI Train). The orbit is placed around the "
        "middle of the DTU camera rig: azimuth/elevation 0 is the rig's central view and radius 2 its distance; "
        "DTU cameras have a 23.5 degree field of view. Views far outside the rig are refused (max_extrapolation).",
        ", the scene's object mapper `mapper-steps-3000_object.pt`"))
    for src, name, dst, slot in ((ckpt, "MODEL", apply, "model"), (ckpt, "CLIP", apply, "clip"),
                                 (loader, "view_mapper", apply, "view_mapper"), (orbit, "cameras", apply, "cameras"),
                                 (apply, "model", sampler, "model"), (apply, "positive", sampler, "positive"),
                                 (apply, "negative", sampler, "negative"), (latent, "LATENT", sampler, "latent_image"),
                                 (sampler, "LATENT", decode, "samples"), (ckpt, "VAE", decode, "vae"),
                                 (decode, "IMAGE", save, "images")):
        wf.connect(src, name, dst, slot)
    out["viewneti_novel_views.json"] = wf.to_json()

    # view control of a free prompt: the view token in front of any text, DTU cameras by index
    wf = UIWorkflow(pack.NODE_CLASS_MAPPINGS)
    ckpt = wf.add("CheckpointLoaderSimple", (40, 40), size=(340, 100), ckpt_name=CHECKPOINT_NAME)
    loader = wf.add("NVSViewNeTILoader", (40, 190), size=(340, 180), view_mapper="mapper-steps-50000_view.pt",
                    object_mapper="none", dtu_calibration="cal18")
    apply = wf.add("NVSViewNeTIApply", (420, 40), size=(400, 460), prompt_template="{view}. A photo of a red car",
                   negative_prompt="", dtu_cameras="22, 25, 28")
    latent = wf.add("EmptyLatentImage", (420, 550), size=(400, 110), width=768, height=576, batch_size=3)
    sampler = wf.add("KSampler", (860, 40), size=(320, 270), seed=0, steps=30, cfg=7.5, sampler_name="dpmpp_2m",
                     scheduler="normal", denoise=1.0)
    decode = wf.add("VAEDecode", (860, 350), size=(220, 50))
    save = wf.add("SaveImage", (1220, 40), title="Views of the prompt", size=(480, 400),
                  filename_prefix="NVS/viewneti_prompt")
    wf.add("MarkdownNote", (860, 480), title="Read me", size=(840, 280), text=_note(
        "view control of a free prompt", 3, "The view token goes in front of any prompt; no object mapper is "
        "needed. `dtu_cameras` picks DTU calibration cameras by index (22, 25, 28: the 3-view training set); "
        "connect NVS cameras to the Apply node's `cameras` input for other views."))
    for src, name, dst, slot in ((ckpt, "MODEL", apply, "model"), (ckpt, "CLIP", apply, "clip"),
                                 (loader, "view_mapper", apply, "view_mapper"), (apply, "model", sampler, "model"),
                                 (apply, "positive", sampler, "positive"), (apply, "negative", sampler, "negative"),
                                 (latent, "LATENT", sampler, "latent_image"), (sampler, "LATENT", decode, "samples"),
                                 (ckpt, "VAE", decode, "vae"), (decode, "IMAGE", save, "images")):
        wf.connect(src, name, dst, slot)
    out["viewneti_view_control_prompt.json"] = wf.to_json()
    return out


def test_example_workflows_are_the_built_ones():
    from tests.ui_workflow import assert_workflows_built

    assert_workflows_built(WORKFLOWS, build_workflows())


if __name__ == "__main__":
    from tests.ui_workflow import write_workflows

    write_workflows(WORKFLOWS, build_workflows())
