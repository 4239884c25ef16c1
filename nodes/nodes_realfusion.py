"""RealFusion nodes: fit a radiance field to one photo with SDS (``NVS_FIELD``), render it, load and save it.

- **NVS RealFusion Reconstruct**: photo + mask (or alpha) + an SD 1.5 MODEL/CLIP/VAE + prompt -> ``NVS_FIELD``.
  Runs :func:`nvs_core.realfusion.training.train` under ``torch.inference_mode(False)`` with ComfyUI's progress
  bar, a live preview of the input view and interrupt. The prompt is encoded by ComfyUI's CLIP, so a
  textual-inversion token is written ``embedding:<name>`` (a file in ``models/embeddings``); the six
  direction prompts are ``"<prompt>, front view"`` ... ``"<prompt>, bottom view"``. Runs are resumable: the
  field and training state are written to ``output/nvs_realfusion/<run_name>/``. On interrupt the state is
  saved there (queue again with ``resume`` on to continue) and ComfyUI's interrupt propagates.
- **NVS Field Render**: ``NVS_FIELD`` + ``NVS_CAMERA`` -> image, depth, normals, mask (four shading modes).
- **NVS Field Loader** / **NVS Field Save**: ``models/nvs/realfusion/`` (published ``df.pth`` or our
  ``.safetensors`` + ``.json``).

``NVS_FIELD`` is a :class:`nvs_core.realfusion.RealFusionField` (RealFusion's world: the input photo is seen
from the NVS camera at azimuth 0, elevation 15 degrees, radius 1.8, fov 55 degrees; the object lives in the
box [-0.75, 0.75]^3).
"""
from __future__ import annotations

import logging
import math
import os
import re

import torch

from ..nvs_core.checkpoints import CheckpointError
from ..nvs_core.realfusion import FieldConfig, RealFusionField, load_field, render_cameras, save_field
from ..nvs_core.realfusion.cameras import DIRECTIONS, direction_prompts
from ..nvs_core.realfusion.sds import SD15_CONTEXT_DIM, SDSConfig, SDSGuidance, TextConditioning
from ..nvs_core.realfusion.training import PRESETS, TrainConfig, input_rgba, train

from . import host
from .common import CAMERA, MULTIVIEW, check_image, check_mask, float_input, int_input, seed_input

log = logging.getLogger("ComfyUI-NVS")

CATEGORY = "NVS/RealFusion"
FIELD = "NVS_FIELD"
METHOD = "realfusion"
SHADINGS = ["albedo", "textureless", "lambertian", "normal"]
DEFAULT_PROMPT = "A high-resolution DSLR image of a embedding:cat_statue"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def _name(value: str, label: str) -> str:
    value = value.strip() if isinstance(value, str) else ""
    for suffix in (".safetensors", ".json"):
        if value.lower().endswith(suffix):
            value = value[: -len(suffix)]
    if not _NAME.match(value):
        raise ValueError(f"{label}: {value!r} is not a plain file name; use letters, digits, '_', '-' and '.'")
    return value


def _check_field(field, label: str = "field") -> RealFusionField:
    if not isinstance(field, RealFusionField):
        raise ValueError(f"{label}: expected an NVS_FIELD (a RealFusion field from NVS RealFusion Reconstruct or "
                         f"NVS Field Loader), got {type(field).__name__}")
    return field


# ------------------------------------------------------------------------------ host objects -> nvs_core

def check_sd15_model(model) -> None:
    """A ComfyUI MODEL must be SD 1.x shaped (eps prediction, 4 latent channels, 768-wide text context)."""
    from . import sd_comfy

    config = sd_comfy.model_unet_config(model)
    width = sd_comfy.model_context_dim(model)
    found = []
    if width is not None and width != SD15_CONTEXT_DIM:
        found.append(f"a {width}-wide text context")
    if config.get("in_channels", 4) != 4:
        found.append(f"{config.get('in_channels')} latent input channels")
    if config.get("adm_in_channels"):
        found.append("a class/pooled-embedding input (SDXL-style UNet)")
    try:
        prediction = sd_comfy.prediction_type_of(model)
    except ValueError as e:
        found.append(str(e))
    else:
        if prediction != "epsilon":
            found.append(f"{prediction} prediction")
    if width is None and not config:
        found.append(f"an unknown model ({type(getattr(model, 'model', model)).__name__})")
    if found:
        raise ValueError(f"model: RealFusion's SDS expects Stable Diffusion 1.5 (epsilon prediction, 4 latent "
                         f"channels, 768-wide CLIP text context); found {', '.join(found)}")


def host_guidance(model, clip, vae, prompt: str, sds_config: SDSConfig, device) -> SDSGuidance:
    """SDS with ComfyUI's MODEL (differentiable clone) / VAE, the six direction prompts encoded by its CLIP."""
    from . import sd_comfy

    check_sd15_model(model)
    backend = sd_comfy.ComfySDBackend(model, None, vae, differentiable=True)
    contexts = []
    for text in list(direction_prompts(prompt)) + [""]:
        cond = sd_comfy.encode_prompt(clip, text)[0][0]
        contexts.append(cond.detach().clone().float())
    lengths = {c.shape[1] for c in contexts}
    widths = {c.shape[-1] for c in contexts}
    if widths != {SD15_CONTEXT_DIM}:
        raise ValueError(f"clip: RealFusion expects the SD 1.5 CLIP (768-wide text encodings); found width(s) "
                         f"{sorted(widths)}")
    if len(lengths) != 1:
        raise ValueError(f"prompt: too long ({max(lengths)} tokens with the direction suffix); keep it under 70 "
                         "tokens so that every direction prompt fits one 77-token chunk")
    text = TextConditioning(torch.cat(contexts[:len(DIRECTIONS)]), contexts[-1], prompt)
    return SDSGuidance(backend, text, sds_config, device)


def _photo(image: torch.Tensor, mask) -> torch.Tensor:
    image = check_image(image, "image", channels=None)
    if image.shape[-1] not in (3, 4):
        raise ValueError(f"image: expected 3 (RGB) or 4 (RGBA) channels, got {image.shape[-1]}")
    if image.shape[0] != 1:
        log.warning("NVS RealFusion Reconstruct: %d images given, using the first", image.shape[0])
    image = image[:1]
    if mask is not None:
        if isinstance(mask, torch.Tensor) and mask.numel() and float(mask.max()) <= 0.01:
            raise ValueError("image/mask: the object mask is empty (LoadImage gives an all-zero mask for a photo "
                             "without alpha): connect the object's silhouette, e.g. from a background-removal node")
        mask = check_mask(mask, "mask", 1, image.shape[1], image.shape[2])[0]
        # ComfyUI's LoadImage gives MASK = 1 - alpha (1 on the background); accept both, say which
        border = torch.cat([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        if float(border.float().mean()) > 0.5 and float(mask.min()) < 0.5:
            log.info("mask: background is 1 (LoadImage's inverted alpha); using 1 - mask as the silhouette")
            mask = 1 - mask
    try:
        return input_rgba(image[0].float().cpu().clone(), None if mask is None else mask.float().cpu().clone())
    except ValueError as e:
        raise ValueError(f"image/mask: {e}") from None


class NVSRealFusionReconstruct:
    DESCRIPTION = ("RealFusion: fit a radiance field to one photo of an object. The photo (with its mask or alpha) "
                   "is reconstructed from the input camera while every other view is pulled toward what Stable "
                   "Diffusion 1.5 expects (score distillation, CFG 100). Use a prompt with the object's "
                   "textual-inversion token (embedding:<name>). Shows the input view while it trains; interrupt "
                   "saves the run (queue again to resume). Published run: 5000 iterations, a GPU job.")
    CATEGORY = CATEGORY
    FUNCTION = "reconstruct"
    RETURN_TYPES = (FIELD, "IMAGE", "STRING")
    RETURN_NAMES = ("field", "preview", "log")
    OUTPUT_TOOLTIPS = ("The fitted radiance field (live weights, as the published df.pth).",
                       "The field rendered from the input camera at the end.",
                       "Losses, NaN counts and where the run is saved.")

    FIELD_CONFIG = FieldConfig()  # the published field (1,806,983 parameters)
    TRAIN_OVERRIDES: dict = {}    # extra TrainConfig values (tests use a tiny, fast setup)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The object photo (first image used). RGBA uses its alpha as the "
                                           "silhouette unless a mask is connected."}),
            "model": ("MODEL", {"tooltip": "A Stable Diffusion 1.5 model (epsilon prediction)."}),
            "clip": ("CLIP", {"tooltip": "The SD 1.5 CLIP that encodes the prompt (embedding:<name> tokens work)."}),
            "vae": ("VAE", {"tooltip": "The SD 1.5 VAE; renders are encoded through it with gradient."}),
            "prompt": ("STRING", {"default": DEFAULT_PROMPT, "multiline": True,
                                  "tooltip": "Object prompt; ', <direction> view' is appended per view. Published: "
                                             "'A high-resolution DSLR image of a <token>' with the learned token "
                                             "written embedding:<name>."}),
            "preset": (list(PRESETS), {"default": "published",
                                       "tooltip": "published: the quirks as coded (front prompt with noisy random "
                                                  "cameras on 9 of 10 steps, SDS weighted 1/loss-scale as under "
                                                  "fp16, constant 4-entry schedules). fixed: the evident intent."}),
            "iterations": int_input(5000, 1, 100000, "Training steps (published 5000)."),
            "seed": seed_input("Seed for cameras, rays, noise and timesteps (published 101)."),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Object silhouette (1 = object). A mask that is mostly 1 along the image border "
                                         "(LoadImage's MASK is 1 - alpha) is inverted."}),
            "multiview": (MULTIVIEW, {"tooltip": "Extra views with cameras (NVS-Adapter, VIVID, GeNVS or photos) "
                                                 "in the input view's frame (object within 0.75 of the origin, "
                                                 "input camera at azimuth 0, elevation 15, radius 1.8)."}),
            "multiview_weight": float_input(1.0, 0.0, 100.0, 0.01, "Weight of the multi-view reconstruction "
                                            "losses (same terms as the input view)."),
            "sds_resolution": int_input(512, 64, 1024, "Renders are resized to this before the VAE (published 512; "
                                        "lower for quick previews).", step=8),
            "render_size": int_input(96, 16, 512, "Synthetic view size in pixels (published 96)."),
            "input_size": int_input(128, 16, 1024, "The photo is resized to this (published 128)."),
            "guidance_scale": float_input(100.0, 1.0, 200.0, 0.5, "Classifier-free guidance of SDS (published 100)."),
            "preview_every": int_input(100, 0, 100000, "Show the input view every N steps (0: off)."),
            "run_name": ("STRING", {"default": "realfusion", "tooltip": "Run folder output/nvs_realfusion/<run_name>/ "
                                                                        "(resumable checkpoints)."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue the run in run_name if one is there."}),
        }}

    def reconstruct(self, image, model, clip, vae, prompt, preset, iterations, seed, mask=None, multiview=None,
                    multiview_weight=1.0, sds_resolution=512, render_size=96, input_size=128, guidance_scale=100.0,
                    preview_every=100, run_name="realfusion", resume=True):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt: empty; describe the object (e.g. 'A high-resolution DSLR image of a "
                             "embedding:<name>')")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if not math.isfinite(multiview_weight) or multiview_weight < 0:
            raise ValueError(f"multiview_weight must be a finite number >= 0, got {multiview_weight!r}")
        if multiview is not None:
            from ..nvs_core.multiview import MultiView

            if not isinstance(multiview, MultiView):
                raise ValueError(f"multiview: expected an NVS_MULTIVIEW, got {type(multiview).__name__}")
        name = _name(run_name, "run_name")
        device = host.compute_device()
        run_dir = os.path.join(host.output_directory(), "nvs_realfusion", name)
        config = TrainConfig(preset=preset, iters=iterations, seed=int(seed), synthetic_size=int(render_size),
                             multiview_weight=float(multiview_weight), preview_every=int(preview_every),
                             checkpoint_every=500, **self.TRAIN_OVERRIDES)
        config.input_view.size = int(input_size)
        sds_config = SDSConfig(guidance_scale=float(guidance_scale), resolution=int(sds_resolution))
        send = host.preview_sender(iterations)
        previews = []

        def on_preview(step, picture):
            previews.append(picture)
            if send is not None:
                send(step, picture)

        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; inputs are cloned
            rgba = _photo(image, mask)
            guidance = self.guidance(model, clip, vae, prompt.strip(), sds_config, device)
            field = RealFusionField(self.FIELD_CONFIG).to(device)
            views = _clone_multiview(multiview) if multiview is not None else None
            try:
                result = train(field, rgba=rgba, multiview=views, guidance=guidance, config=config, device=device,
                               progress=host.progress_factory(), on_preview=on_preview, run_dir=run_dir,
                               resume=bool(resume))
            except CheckpointError as e:
                raise ValueError(f"resume: {e} (turn resume off or change run_name)") from None
            field.requires_grad_(False)
        summary = (f"RealFusion ({preset}) '{prompt.strip()}': {result.summary()}\nrun folder: {run_dir}")
        if result.sds_nonfinite:
            summary += (f"\nwarning: {result.sds_nonfinite} non-finite SDS gradient values were zeroed "
                        f"(nan_to_num) in {result.sds_nonfinite_steps} steps")
        if result.interrupted:
            log.warning("NVS RealFusion Reconstruct interrupted at step %d; the field so far is saved in %s "
                        "(queue again with resume on to continue)", result.global_step, run_dir)
            raise result.interrupt
        from ..nvs_core.realfusion.training import preview_render

        final = preview_render(field, config.input_view, config.input_view.size, device)[None]
        return {"ui": {"text": [summary]}, "result": (field, final.to(host.intermediate_device()), summary)}

    # seam for tests (stand-in SD objects) and other hosts
    @staticmethod
    def guidance(model, clip, vae, prompt, sds_config, device) -> SDSGuidance:
        return host_guidance(model, clip, vae, prompt, sds_config, device)


def _clone_multiview(multiview):
    import dataclasses

    return dataclasses.replace(multiview, images=multiview.images.clone(),
                               masks=None if multiview.masks is None else multiview.masks.clone(),
                               depth=None if multiview.depth is None else multiview.depth.clone())


class NVSFieldRender:
    DESCRIPTION = ("Render an NVS_FIELD from NVS cameras: colour (white background), normalised depth, world "
                   "normals and coverage mask. Shading: albedo, textureless, lambertian (light from the camera) "
                   "or normal.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "MASK")
    RETURN_NAMES = ("image", "depth", "normals", "mask")
    OUTPUT_TOOLTIPS = ("Colour renders on white.", "Depth between the box's near and far (white = far).",
                       "World normals as (n + 1) / 2, premultiplied by coverage (black background).",
                       "Coverage (accumulated opacity).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "field": (FIELD, {"tooltip": "A fitted RealFusion field."}),
            "cameras": (CAMERA, {"tooltip": "Cameras to render (NVS world; the input photo's camera is azimuth 0, "
                                            "elevation 15, radius 1.8, fov 55)."}),
            "shading": (SHADINGS, {"default": "albedo", "tooltip": "albedo: colour; textureless: grey lambertian; "
                                                                   "lambertian: colour x lighting; normal: normals."}),
        }, "optional": {
            "ambient_ratio": float_input(0.1, 0.0, 1.0, 0.01, "Ambient share of the lighting in textureless and "
                                         "lambertian shading (published 0.1)."),
            "resolution": int_input(0, 0, 2048, "Square render size in pixels; 0 uses the cameras' own size."),
            "ray_batch": int_input(16384, 256, 1 << 20, "Rays per evaluation batch (bounds memory)."),
        }}

    def render(self, field, cameras, shading, ambient_ratio=0.1, resolution=0, ray_batch=16384):
        field = _check_field(field)
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
        from ..nvs_core.cameras import Cameras

        if not isinstance(cameras, Cameras) or len(cameras) == 0:
            raise ValueError("cameras: expected a non-empty NVS_CAMERA batch")
        height, width = (resolution, resolution) if resolution else (cameras.height, cameras.width)
        ratio = 1.0 if shading == "albedo" else float(ambient_ratio)
        progress = host.progress_factory()(len(cameras), "NVS Field Render")
        try:
            with torch.no_grad():
                out = render_cameras(field, cameras, height, width, shading=shading, ambient_ratio=ratio,
                                     ray_batch=int(ray_batch), progress=lambda done, total: progress.update(),
                                     interrupt=progress.check)
        finally:
            progress.close()
        dev = host.intermediate_device()
        image = out["image"].clamp(0, 1).float().to(dev)
        depth = out["depth"].clamp(0, 1).float()[..., None].expand(-1, -1, -1, 3).contiguous().to(dev)
        normals = out["normals"] if out["normals"] is not None else torch.zeros_like(out["image"])
        return (image, depth, normals.clamp(0, 1).float().to(dev), out["alpha"].clamp(0, 1).float().to(dev))


class NVSFieldLoader:
    DESCRIPTION = ("Load a RealFusion field from models/nvs/realfusion/: a published df.pth (read safely, level "
                   "mask off, live weights) or a converted/saved .safetensors (+ .json).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (FIELD,)
    RETURN_NAMES = ("field",)
    OUTPUT_TOOLTIPS = ("The loaded radiance field.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "field_file": (host.list_model_files(METHOD), {"tooltip": "A field in models/nvs/realfusion/ (df.pth "
                                                                      "or .safetensors)."}),
        }}

    def load(self, field_file):
        path = host.model_path(METHOD, field_file)
        with torch.inference_mode(False):
            field = load_field(path, device=host.compute_device())
        return (field.requires_grad_(False),)


class NVSFieldSave:
    DESCRIPTION = ("Save an NVS_FIELD to models/nvs/realfusion/<name>.safetensors + .json (atomic), loadable by "
                   "NVS Field Loader and convertible back with python -m nvs_core.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The written .safetensors file.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "field": (FIELD, {"tooltip": "The field to save."}),
            "name": ("STRING", {"default": "realfusion_field", "tooltip": "File name (no folders); an existing file "
                                                                          "of that name is replaced."}),
        }}

    def save(self, field, name):
        field = _check_field(field)
        stem = _name(name, "name")
        folder = host.model_folders(METHOD)[0]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{stem}.safetensors")
        save_field(path, field, meta={"saved_by": "NVSFieldSave"})
        return {"ui": {"text": [path]}, "result": (path,)}


NODE_CLASS_MAPPINGS = {
    "NVSRealFusionReconstruct": NVSRealFusionReconstruct,
    "NVSFieldRender": NVSFieldRender,
    "NVSFieldLoader": NVSFieldLoader,
    "NVSFieldSave": NVSFieldSave,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NVSRealFusionReconstruct": "NVS RealFusion Reconstruct",
    "NVSFieldRender": "NVS Field Render",
    "NVSFieldLoader": "NVS Field Loader",
    "NVSFieldSave": "NVS Field Save",
}
