"""NVS-Adapter nodes: load the adapter, patch an SD 2.1 base MODEL for stock samplers, or run the published sampler.

``NVSAdapterApply`` returns a patched clone of the MODEL (the adapter after every self-attention; a UNet-call
wrapper that puts the clean reference view in front of the target views and turns the sampler's negative chunk
into the published in-model unconditional branch), the empty-prompt CONDITIONING pair and one latent per target
camera: sample it with any stock sampler. ``NVSAdapterSampler`` runs the published 50-step Euler with in-model CFG
(``nvs_core.nvsadapter``) in groups of ``views_per_batch`` targets, all with the same reference view.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ..nvs_core.cameras import Cameras
from ..nvs_core.checkpoints import CheckpointError
from ..nvs_core.imageio import centre_crop_box, crop_cameras
from ..nvs_core.nvsadapter.cameras import FOCAL_MODES, IMAGE_RESOLUTION, rays_context_for_cameras
from ..nvs_core.nvsadapter.loading import load_nvs_adapter
from ..nvs_core.nvsadapter.model import NVSAdapter
from ..nvs_core.nvsadapter.network import AdapterCondition, AdapterUNetCall
from ..nvs_core.nvsadapter.pipeline import clip_image_embedding, generate_views, prepare_reference
from ..nvs_core.nvsadapter.sampler import DEFAULT_CFG, DEFAULT_STEPS

from . import host
from .common import CAMERA, check_image, float_input, int_input, seed_input

CATEGORY = "NVS/NVS-Adapter"
ADAPTER = "NVS_ADAPTER"
METHOD = "nvs_adapter"
PUBLISHED_FILE = "base_query_4_step_200000.ckpt"
SD_FILE = "v2-1_512-ema-pruned.safetensors"
CLIP_VISION_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
MASK_MEANINGS = ["1 = background (LoadImage)", "1 = object"]
EMPTY_PROMPT = ""


def _file_key(path: str):
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


class NVSAdapterLoader:
    DESCRIPTION = ("Load the NVS-Adapter from models/nvs/nvs_adapter/: the published Lightning checkpoint "
                   f"{PUBLISHED_FILE} (read weights-only; only the 344 adapter tensors are taken, from the EMA copy "
                   "by default, everything else in the file is ignored) or a converted .safetensors + .json "
                   "(python -m nvs_core convert ... --method nvsadapter). Stable Diffusion 2.1 base comes from your "
                   f"checkpoint loader ({SD_FILE}) and the CLIP ViT-H image encoder from Load CLIP Vision.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("nvs_adapter",)
    OUTPUT_TOOLTIPS = ("The adapter modules (per-block attention and ray projections), for NVS NVS-Adapter Apply "
                       "or Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = host.list_model_files(METHOD)
        default = PUBLISHED_FILE if PUBLISHED_FILE in files or not files else files[0]
        return {"required": {
            "adapter": (files, {"default": default, "nvs_model_folder": METHOD, "tooltip": "Adapter file in "
                        f"models/nvs/nvs_adapter/: the published {PUBLISHED_FILE} or a converted .safetensors."}),
            "use_ema": ("BOOLEAN", {"default": True, "tooltip": "Take the EMA weights of a Lightning checkpoint (the "
                        "published inference default); off = the raw training weights. Converted files hold one "
                        "set and ignore this."}),
            "dtype": (host.DTYPE_CHOICES, {"default": "auto", "tooltip": "Adapter weight precision; auto = fp16 on "
                      "a GPU (like the SD model), fp32 on CPU."}),
        }}

    @classmethod
    def IS_CHANGED(cls, adapter, use_ema=True, dtype="auto"):
        try:
            stamp = str(_file_key(host.model_path(METHOD, adapter)))
        except (OSError, TypeError):
            stamp = f"missing {adapter}"
        return f"{stamp}|{use_ema}|{dtype}"

    def load(self, adapter, use_ema=True, dtype="auto"):
        if not isinstance(adapter, str) or not adapter:
            raise ValueError(f"adapter: choose a file from models/nvs/nvs_adapter/ (e.g. {PUBLISHED_FILE})")
        try:
            path = host.model_path(METHOD, adapter)
        except FileNotFoundError as exc:
            raise ValueError(f"adapter: {exc}") from None
        torch_dtype = host.resolve_dtype(dtype, host.compute_device())
        try:
            model = load_nvs_adapter(path, use_ema=bool(use_ema), dtype=torch_dtype)
        except CheckpointError as exc:
            raise ValueError(f"adapter: {exc}") from None
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())
        info = (f"{os.path.basename(path)}: {len(model.state_dict())} tensors, {params:,} parameters, "
                f"{model.num_layers} blocks, {str(torch_dtype).replace('torch.', '')}; for SD with "
                f"{cfg.context_dim}-wide text and {cfg.image_context_dim}-d CLIP image embeddings, trained at "
                f"{cfg.latent_resolution * 8} px")
        return {"ui": {"text": [info]}, "result": (model,)}


# ------------------------------------------------------------------------------------------ shared inputs

def _common_inputs(extra: Optional[dict] = None) -> dict:
    required = {
        "model": ("MODEL", {"tooltip": f"Stable Diffusion 2.1 base (512 px, eps prediction: {SD_FILE}), the model "
                            "the NVS-Adapter was trained on. SD 1.x and SD 2.1-768 (v) models are refused."}),
        "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint: the adapter's text is always the empty "
                          "prompt encoded with it."}),
        "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint (encodes the reference view)."}),
        "clip_vision": ("CLIP_VISION", {"tooltip": f"CLIP ViT-H/14 vision model ({CLIP_VISION_FILE}, "
                                        "models/clip_vision/): its projected 1024-d image embedding."}),
        "nvs_adapter": (ADAPTER, {"tooltip": "The adapter from NVS NVS-Adapter Loader."}),
        "reference_image": ("IMAGE", {"tooltip": "One photo of the object (any size: centre-cropped to a square and "
                                      "resized to `resolution`). Works best with the object alone on a white or "
                                      "masked-out background, as in training."}),
        "reference_camera": (CAMERA, {"tooltip": "The reference photo's camera (one). Published: elevation 0, "
                                      "azimuth 0, radius 1.5, fov 49.1 (NVS Camera)."}),
        "target_cameras": (CAMERA, {"tooltip": "The cameras to render, one view each, any number (e.g. NVS Orbit "
                                    "Cameras at radius 1.5, fov 49.1). Only their pose relative to the reference "
                                    "camera and their field of view matter."}),
        "cfg": float_input(DEFAULT_CFG, 0.0, 30.0, 0.1, "Classifier-free guidance of the in-model CFG (published "
                           "3.0; the demo used 11)."),
    }
    required.update(extra or {})
    optional = {
        "reference_mask": ("MASK", {"tooltip": "Optional object mask of the reference: the background becomes white "
                                    "(as the original's alpha to white). See mask_meaning."}),
        "mask_meaning": (MASK_MEANINGS, {"default": MASK_MEANINGS[0], "tooltip": "What 1 means in reference_mask: "
                         "LoadImage's MASK is 1 where the photo is transparent (background); masks made by the pack "
                         "are 1 on the object."}),
        "resolution": int_input(IMAGE_RESOLUTION, 64, 1024, "Square image size the views are made at (published "
                                "256; latents are 1/8 of it).", step=64),
        "focal": (list(FOCAL_MODES), {"default": FOCAL_MODES[0], "tooltip": "'published': each camera's field of view "
                  "goes through the original's focal formula W / (2 tan(fov)), so a 49.1 degree camera gets exactly "
                  "the ray embedding the model was trained with. 'camera': the cameras' own intrinsics (not what the "
                  "model saw)."}),
    }
    return {"required": required, "optional": optional}


class _Prepared:
    """The checked inputs shared by Apply and the Sampler."""

    def __init__(self, adapter, backend, reference, alpha, prepared, ref_camera, targets, embedding, text, crop,
                 resolution):
        self.adapter, self.backend = adapter, backend
        self.reference, self.alpha, self.prepared = reference, alpha, prepared
        self.reference_camera, self.target_cameras = ref_camera, targets
        self.embedding, self.text, self.crop, self.resolution = embedding, text, crop, resolution


def _check_model(model, backend, adapter: NVSAdapter) -> None:
    from . import sd_comfy

    cfg = adapter.config
    if backend.prediction_type != "epsilon":
        raise ValueError(f"model: a {backend.prediction_type} model (SD 2.1-768?); the NVS-Adapter needs the "
                         f"eps-prediction SD 2.1 base ({SD_FILE}, 512 px)")
    unet = sd_comfy.model_unet_config(model)
    context = unet.get("context_dim")
    if context is not None and int(context) != cfg.context_dim:
        raise ValueError(f"model: its cross-attention takes {context}-wide text (an SD 1.x model?); this NVS-Adapter "
                         f"was trained on SD 2.1 base ({cfg.context_dim}-wide text, {SD_FILE})")
    channels, mult = unet.get("model_channels"), unet.get("channel_mult")
    if channels is not None and mult is not None:
        widths = tuple(int(channels) * int(m) for m in mult)
        if widths != cfg.widths:
            raise ValueError(f"model: UNet widths {widths}, the NVS-Adapter expects {cfg.widths} (SD 2.1 base)")
    if unet.get("in_channels") not in (None, 4):
        raise ValueError(f"model: a {unet['in_channels']}-channel UNet; the NVS-Adapter needs SD 2.1 base (4)")


def _mask(reference_image, reference_mask, mask_meaning, box) -> Optional[torch.Tensor]:
    """(1, side, side) object alpha (1 = object) from the MASK input, else the image's own alpha, else None."""
    if mask_meaning not in MASK_MEANINGS:
        raise ValueError(f"mask_meaning must be one of {MASK_MEANINGS}, got {mask_meaning!r}")
    height, width = reference_image.shape[1:3]
    if reference_mask is not None:
        mask = reference_mask[None] if reference_mask.ndim == 2 else reference_mask
        nothing_masked = 0.0 if mask_meaning == MASK_MEANINGS[0] else 1.0
        if mask.numel() and bool((mask == nothing_masked).all()):
            return None  # e.g. LoadImage's 64x64 zeros for a photo without transparency: nothing to mask
        if mask.ndim != 3 or mask.shape[0] != 1 or tuple(mask.shape[1:]) != (height, width):
            raise ValueError(f"reference_mask: expected one {height}x{width} mask for the reference image, got shape "
                             f"{tuple(reference_mask.shape)}")
        alpha = mask.float().clamp(0, 1)
        if mask_meaning == MASK_MEANINGS[0]:
            alpha = 1 - alpha
        name = "reference_mask"
    elif reference_image.shape[-1] == 4:
        alpha, name = reference_image[..., 3].float().clamp(0, 1), "reference_image alpha"
    else:
        return None
    alpha = alpha[:, box.top:box.top + box.side, box.left:box.left + box.side]
    if float(alpha.max()) <= 0:
        meaning = "1 = background" if reference_mask is not None and mask_meaning == MASK_MEANINGS[0] else "1 = object"
        raise ValueError(f"{name}: the mask leaves no object pixel ({meaning}); expected a mask that marks the object "
                         f"(check mask_meaning)")
    return alpha


def _prepare(model, clip, vae, clip_vision, nvs_adapter, reference_image, reference_camera, target_cameras, cfg,
             reference_mask=None, mask_meaning=MASK_MEANINGS[0], resolution=IMAGE_RESOLUTION,
             focal=FOCAL_MODES[0]) -> _Prepared:
    from . import sd_comfy

    if not isinstance(nvs_adapter, NVSAdapter):
        raise ValueError(f"nvs_adapter: expected the NVS_ADAPTER of NVS NVS-Adapter Loader, got "
                         f"{type(nvs_adapter).__name__}")
    for name, cams in (("reference_camera", reference_camera), ("target_cameras", target_cameras)):
        if not isinstance(cams, Cameras):
            raise ValueError(f"{name}: expected NVS_CAMERA cameras, got {type(cams).__name__}")
    if len(reference_camera) != 1:
        raise ValueError(f"reference_camera: expected exactly one camera, got {len(reference_camera)}")
    if len(target_cameras) == 0:
        raise ValueError("target_cameras: expected at least one camera, got an empty batch")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg must be a finite number >= 0, got {cfg!r}")
    if not isinstance(resolution, int) or resolution < 64 or resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (>= 64), got {resolution!r}")
    if focal not in FOCAL_MODES:
        raise ValueError(f"focal must be one of {list(FOCAL_MODES)}, got {focal!r}")
    image = check_image(reference_image, "reference_image", channels=None)
    if image.shape[-1] not in (3, 4):
        raise ValueError(f"reference_image: expected RGB or RGBA, got {image.shape[-1]} channels")
    if image.shape[0] != 1:
        raise ValueError(f"reference_image: expected one reference photo, got a batch of {image.shape[0]}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("reference_image: contains NaN or infinite values")
    box = centre_crop_box(image.shape[1], image.shape[2])
    alpha = _mask(image, reference_mask, mask_meaning, box)
    pixels = image[:, box.top:box.top + box.side, box.left:box.left + box.side, :3].float().movedim(-1, 1)
    try:
        backend = sd_comfy.ComfySDBackend(model, vae=vae)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    _check_model(model, backend, nvs_adapter)
    prepared = prepare_reference(pixels.cpu(), None if alpha is None else alpha.cpu(), resolution)
    embedding = clip_image_embedding(sd_comfy.clip_vision_encoder(clip_vision), prepared)
    if embedding.shape[-1] != nvs_adapter.config.image_context_dim:
        raise ValueError(f"clip_vision: {embedding.shape[-1]}-d image embeddings; the NVS-Adapter needs the "
                         f"{nvs_adapter.config.image_context_dim}-d projected embedding of CLIP ViT-H/14 "
                         f"({CLIP_VISION_FILE})")
    text = sd_comfy.encode_prompt(clip, EMPTY_PROMPT)[0][0].float()
    if text.shape[-1] != nvs_adapter.config.context_dim:
        raise ValueError(f"clip: {text.shape[-1]}-wide text encodings (an SD 1.x CLIP?); the NVS-Adapter needs the SD "
                         f"2.1 OpenCLIP text encoder ({nvs_adapter.config.context_dim})")
    ref_camera, _ = crop_cameras(reference_camera)
    targets, _ = crop_cameras(target_cameras)
    return _Prepared(nvs_adapter, backend, pixels.cpu(), None if alpha is None else alpha.cpu(), prepared,
                     ref_camera, targets, embedding, text, box, resolution)


def _describe(p: _Prepared) -> str:
    crop = p.crop.describe()
    mask = "no mask (used as is)" if p.alpha is None else "background made white from the mask"
    return f"reference {crop}, resized to {p.resolution}x{p.resolution}; {mask}; {len(p.target_cameras)} target views"


class NVSAdapterApply:
    DESCRIPTION = ("Patch an SD 2.1 base MODEL with the NVS-Adapter for ComfyUI's own samplers: returns a patched "
                   "copy of the MODEL, the positive/negative conditioning (the empty prompt, as published) and one "
                   "empty latent per target camera; connect them to a KSampler and decode with the VAE. All targets "
                   "are generated jointly with the reference view. The patched MODEL guides with `cfg` itself (in-"
                   "model CFG: the negative chunk becomes the published unconditional branch); the KSampler's cfg "
                   "value is ignored. euler + simple scheduler with 50 steps gives the published timesteps; "
                   "differences from NVS NVS-Adapter Sampler: ComfyUI picks the discrete timestep in log-sigma and "
                   "does not snap sigma to the table first, the initial noise comes from ComfyUI's RNG, the "
                   "reference latent is the VAE mean (published: a posterior sample), a non-empty negative prompt "
                   "would reach the unconditional rows (published: always empty), and ancestral/SDE samplers add "
                   "noise the original does not.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("A patched copy of the MODEL (the input is unchanged) for any stock sampler.",
                       "The empty prompt (the adapter's text).",
                       "The empty prompt: its chunk becomes the in-model unconditional branch.",
                       "One empty latent per target camera at `resolution` (the batch the patched MODEL expects).")

    @classmethod
    def INPUT_TYPES(cls):
        return _common_inputs()

    def apply(self, model, clip, vae, clip_vision, nvs_adapter, reference_image, reference_camera, target_cameras,
              cfg=DEFAULT_CFG, reference_mask=None, mask_meaning=MASK_MEANINGS[0], resolution=IMAGE_RESOLUTION,
              focal=FOCAL_MODES[0]):
        from . import sd_comfy

        p = _prepare(model, clip, vae, clip_vision, nvs_adapter, reference_image, reference_camera, target_cameras,
                     cfg, reference_mask, mask_meaning, resolution, focal)
        with torch.no_grad():
            latents = p.backend.encode_images(p.prepared, sample=False).float()  # model space (scaled)
        side = latents.shape[-1]
        rays = rays_context_for_cameras(p.reference_camera, p.target_cameras, p.resolution, p.resolution // side,
                                        focal)
        condition = AdapterCondition(latents[:, None], p.embedding, rays)
        call = AdapterUNetCall(nvs_adapter, condition)
        patched = p.backend.patched_model(call.patches)
        sd_comfy.set_guidance_scale(patched, float(cfg))
        positive = [[p.text, {}]]
        negative = [[p.text.clone(), {}]]
        samples = torch.zeros((len(p.target_cameras), latents.shape[1], side, side), dtype=torch.float32,
                              device=host.intermediate_device())
        info = (_describe(p) + f" in one batch; latents {side}x{side}; in-model guidance {float(cfg):g} (the "
                "sampler's cfg is ignored)")
        return {"ui": {"text": [info]}, "result": (patched, positive, negative, {"samples": samples})}


class NVSAdapterSampler:
    DESCRIPTION = ("Novel views of one reference photo with the NVS-Adapter, sampled as published: 50-step Euler on "
                   "the original's integer timesteps with in-model CFG (unconditional branch: no rays, no image "
                   "embedding, a random reference at t = 999), the empty prompt, the reference VAE latent drawn from "
                   "the posterior. Targets are generated in groups of views_per_batch (the released model was "
                   "trained with 4), each group with the same reference view; one seed draws everything, in order.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("One view per target camera, in camera order, resolution x resolution.",)

    @classmethod
    def INPUT_TYPES(cls):
        return _common_inputs({
            "steps": int_input(DEFAULT_STEPS, 1, 999, "Euler steps (published 50)."),
            "seed": seed_input(),
            "views_per_batch": int_input(4, 1, 64, "Target views generated jointly per group (published 4); every "
                                         "group sees the same reference view."),
        })

    def sample(self, model, clip, vae, clip_vision, nvs_adapter, reference_image, reference_camera, target_cameras,
               cfg=DEFAULT_CFG, steps=DEFAULT_STEPS, seed=0, views_per_batch=4, reference_mask=None,
               mask_meaning=MASK_MEANINGS[0], resolution=IMAGE_RESOLUTION, focal=FOCAL_MODES[0]):
        for name, value, low in (("steps", steps, 1), ("views_per_batch", views_per_batch, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        p = _prepare(model, clip, vae, clip_vision, nvs_adapter, reference_image, reference_camera, target_cameras,
                     cfg, reference_mask, mask_meaning, resolution, focal)
        with torch.no_grad():
            views = generate_views(p.backend, nvs_adapter, p.reference, p.reference_camera, p.target_cameras,
                                   p.embedding, p.text, alpha=p.alpha, cfg_scale=float(cfg), steps=steps,
                                   seed=seed, views_per_batch=views_per_batch, resolution=p.resolution, focal=focal,
                                   progress=host.progress_factory())
        images = views.movedim(1, -1).to(host.intermediate_device(), torch.float32)
        groups = -(-len(p.target_cameras) // views_per_batch)
        info = (_describe(p) + f" in {groups} group(s) of up to {views_per_batch}; {steps} Euler steps, in-model "
                f"guidance {float(cfg):g}, seed {seed}")
        return {"ui": {"text": [info]}, "result": (images,)}


NODE_CLASS_MAPPINGS = {
    "NVSAdapterLoader": NVSAdapterLoader,
    "NVSAdapterApply": NVSAdapterApply,
    "NVSAdapterSampler": NVSAdapterSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NVSAdapterLoader": "NVS NVS-Adapter Loader",
    "NVSAdapterApply": "NVS NVS-Adapter Apply",
    "NVSAdapterSampler": "NVS NVS-Adapter Sampler",
}
