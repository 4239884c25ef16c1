"""VIVID nodes: load the EDM2 pixel-space NVS nets (base, guidance, SR) and sample novel views.

The sampler follows the published pipeline (``generate_images.py``): the source view is centre-cropped
to a square and resized to the nets' resolutions, the camera label is VIVID's 20-d standardised
``tgt2src`` + intrinsics vector, each target view is sampled with EDM Heun steps and autoguidance, then
optionally refined by the 64 -> 256 super-resolution net.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..nvs_core.cameras import Cameras
from ..nvs_core.checkpoints import CheckpointError
from ..nvs_core.imageio import centre_crop_box, composite_on_white
from ..nvs_core.progress import shared as shared_progress
from ..nvs_core.vivid import loading
from ..nvs_core.vivid import sampler as vivid_sampler
from ..nvs_core.vivid import training
from ..nvs_core.vivid.geometry import geometry_from_cameras

from . import host
from .common import (CAMERA, MULTIVIEW, checkpoint_every_input, export_trained,
                     float_input, int_input, mean_loss_text, seed_input, train_output_name, train_run_inputs,
                     training_views)

CATEGORY = "NVS/VIVID"
VIVID = "NVS_VIVID"
METHOD = "vivid"
NONE = "none"
# Autoguidance weight of the published preset (``generate_images.py --preset vivid``: g = 1.5, with
# vivid-uncond as the guidance net).
PUBLISHED_GUIDANCE = 1.5
PUBLISHED_STEPS = 32
DEVICE_CHOICES = ["auto", "cpu"]
# A source image whose aspect ratio differs from its camera's by more than this is refused.
ASPECT_TOLERANCE = 0.02
# SR conditioning noise gets its own per-seed stream: seed + this offset (mod 2^32).
SR_CONDITIONING_SEED_OFFSET = 0x5EED


# --------------------------------------------------------------------------------------------- NVS_VIVID
@dataclass
class VividModels:
    """The ``NVS_VIVID`` type: the loaded nets and their roles.

    ``base``: the conditional 64-px net (required); ``guidance``: the autoguidance net (published:
    vivid-uncond), same resolution; ``sr``: the super-resolution net (published: 64 -> 256).
    ``autocast_dtype`` is set for bf16 (the nets then run under ``torch.autocast``); fp16 uses the nets'
    own float16 path (``use_fp16``) on CUDA.
    """

    base: torch.nn.Module
    guidance: Optional[torch.nn.Module] = None
    sr: Optional[torch.nn.Module] = None
    names: Dict[str, str] = field(default_factory=dict)
    autocast_dtype: Optional[torch.dtype] = None

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @property
    def resolution(self) -> int:
        return int(self.base.img_resolution)

    @property
    def sr_resolution(self) -> Optional[int]:
        return int(self.sr.img_resolution) if self.sr is not None else None

    def describe(self) -> str:
        def line(role: str, net) -> str:
            params = sum(p.numel() for p in net.parameters()) / 1e6
            return (f"{role}: {self.names.get(role, '<in memory>')} ({net.img_resolution} px, "
                    f"{params:.3g}M parameters)")

        lines = [line("base", self.base)]
        lines.append(line("guidance", self.guidance) if self.guidance is not None else "guidance: none")
        lines.append(line("sr", self.sr) if self.sr is not None else "sr: none")
        compute = str(self.autocast_dtype or (torch.float16 if getattr(self.base, "use_fp16", False)
                                              and self.device.type == "cuda" else torch.float32))
        lines.append(f"device {self.device}, weights {str(self.dtype).replace('torch.', '')}, "
                     f"compute {compute.replace('torch.', '')}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- loading
_CACHE: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_CACHE_SIZE = 4  # base + guidance + SR, plus one being swapped in


def clear_cache() -> None:
    _CACHE.clear()


def _file_key(path: str) -> Tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


def _describe_kind(kwargs: dict) -> str:
    if kwargs.get("super_res"):
        return "a super-resolution VIVID net (super_res=True)"
    if kwargs.get("uncond"):
        return "an unconditional VIVID guidance net (uncond=True)"
    return "a conditional base VIVID net"


def _check_role(role: str, input_name: str, name: str, kwargs: dict) -> None:
    kind = _describe_kind(kwargs)
    if role == "base" and (kwargs.get("super_res") or kwargs.get("uncond")):
        fix = "sr_model" if kwargs.get("super_res") else "guidance_model"
        raise ValueError(f"{input_name}: {name} is {kind}; expected a conditional base net such as vivid-base "
                         f"(choose {name} as {fix} instead)")
    if role == "guidance" and kwargs.get("super_res"):
        raise ValueError(f"{input_name}: {name} is {kind}; expected a guidance net at the base resolution such as "
                         f"vivid-uncond (choose {name} as sr_model instead)")
    if role == "sr" and not kwargs.get("super_res"):
        raise ValueError(f"{input_name}: {name} is {kind}; expected a super-resolution net such as vivid-sr "
                         f"(super_res=True)")


def _check_finite(input_name: str, name: str, state_dict: Dict[str, torch.Tensor]) -> None:
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{input_name}: {name} has {bad} NaN/infinite values in {key!r}; the file is "
                             "damaged or was saved from a diverged training run")


def load_net(role: str, input_name: str, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """One net for ``role`` ('base', 'guidance', 'sr') from models/nvs/vivid/, validated and cached."""
    try:
        path = host.model_path(METHOD, name)
    except FileNotFoundError as exc:
        raise ValueError(f"{input_name}: {exc}") from None
    key = (_file_key(path), role, str(device), dtype)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        ckpt = loading.load_vivid_checkpoint(path)
    except CheckpointError as exc:
        raise ValueError(f"{input_name}: {name} is not a usable VIVID checkpoint: {exc}") from None
    _check_role(role, input_name, name, ckpt.init_kwargs)
    _check_finite(input_name, name, ckpt.state_dict)
    try:
        net = ckpt.build(device=device, dtype=dtype)
    except (CheckpointError, TypeError, ValueError) as exc:
        raise ValueError(f"{input_name}: {name} could not be built as a VIVID net: {exc}") from None
    # The Fourier frequencies/phases stay float32 (exactly the stored values): rounding them to bf16
    # would shift the noise embedding.
    for buffer_name, buffer in list(net.named_buffers()):
        if buffer_name in ckpt.state_dict and buffer.is_floating_point():
            module_name, _, attr = buffer_name.rpartition(".")
            net.get_submodule(module_name).register_buffer(attr, ckpt.state_dict[buffer_name].to(device, torch.float32))
    # fp16 runs the nets' own float16 path on CUDA (as published); fp32/bf16 keep float32 activations
    # (bf16 then computes under autocast).
    net.use_fp16 = dtype == torch.float16
    _CACHE[key] = net
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return net


def _model_files() -> List[str]:
    return host.list_model_files(METHOD)


class NVSVIVIDLoader:
    DESCRIPTION = ("Load VIVID nets from models/nvs/vivid/: the conditional base net (vivid-base, 64 px), an optional "
                   "guidance net for autoguidance (vivid-uncond) and an optional super-resolution net (vivid-sr, "
                   "64 -> 256 px). Reads the published .pkl snapshots safely (no code from the file runs) and the "
                   "converted .safetensors + .json. Loaded nets are cached while their files are unchanged.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (VIVID,)
    RETURN_NAMES = ("vivid",)
    OUTPUT_TOOLTIPS = ("The loaded nets with their roles, for NVS VIVID Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = _model_files()
        model_opts = {"nvs_model_folder": METHOD}
        return {"required": {
            "base_model": (files, {"tooltip": "Conditional base net (e.g. vivid-base.pkl), from models/nvs/vivid/.",
                                   **model_opts}),
            "guidance_model": ([NONE] + files, {"default": NONE, "tooltip": "Autoguidance net (e.g. "
                               "vivid-uncond.pkl) at the base resolution; 'none' samples without guidance "
                               "(then set the sampler's guidance to 1).", **model_opts}),
            "sr_model": ([NONE] + files, {"default": NONE, "tooltip": "Super-resolution net (e.g. vivid-sr.pkl); "
                         "'none' gives base-resolution (64 px) views only.", **model_opts}),
            "device": (DEVICE_CHOICES, {"default": "auto", "tooltip": "auto: ComfyUI's compute device (the GPU "
                       "when there is one); cpu: always the CPU."}),
            "dtype": (list(host.DTYPE_CHOICES), {"default": "auto", "tooltip": "Weight and compute precision. "
                      "auto: fp16 on a GPU, fp32 on the CPU; fp16 uses the nets' published float16 path on CUDA "
                      "(weights normalised in fp32); bf16 computes under autocast."}),
        }}

    @classmethod
    def IS_CHANGED(cls, base_model, guidance_model, sr_model, device, dtype):
        stamps = []
        for name in (base_model, guidance_model, sr_model):
            try:
                stamps.append(str(_file_key(host.model_path(METHOD, name))) if name not in (None, NONE) else NONE)
            except (OSError, TypeError):
                stamps.append(f"missing {name}")
        return "|".join(stamps + [str(device), str(dtype)])

    def load(self, base_model, guidance_model=NONE, sr_model=NONE, device="auto", dtype="auto"):
        if not isinstance(base_model, str) or not base_model or base_model == NONE:
            raise ValueError("base_model: choose a VIVID base net file from models/nvs/vivid/ (e.g. vivid-base.pkl)")
        if device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
        run_device = host.compute_device() if device == "auto" else torch.device("cpu")
        weight_dtype = host.resolve_dtype(dtype, run_device)
        base = load_net("base", "base_model", base_model, run_device, weight_dtype)
        names = {"base": base_model}
        guidance = sr = None
        if guidance_model not in (None, "", NONE):
            guidance = load_net("guidance", "guidance_model", guidance_model, run_device, weight_dtype)
            names["guidance"] = guidance_model
            if (guidance.img_resolution, guidance.img_channels) != (base.img_resolution, base.img_channels):
                raise ValueError(f"guidance_model: {guidance_model} works at {guidance.img_resolution} px but the "
                                 f"base net {base_model} at {base.img_resolution} px; expected a guidance net of "
                                 "the base net's resolution (vivid-uncond for vivid-base)")
        if sr_model not in (None, "", NONE):
            sr = load_net("sr", "sr_model", sr_model, run_device, weight_dtype)
            names["sr"] = sr_model
            if sr.img_resolution <= base.img_resolution:
                raise ValueError(f"sr_model: {sr_model} works at {sr.img_resolution} px, not above the base net's "
                                 f"{base.img_resolution} px; expected a super-resolution net (vivid-sr: 256 px)")
        models = VividModels(base, guidance, sr, names,
                             autocast_dtype=torch.bfloat16 if weight_dtype == torch.bfloat16 else None)
        return {"ui": {"text": [models.describe()]}, "result": (models,)}


# --------------------------------------------------------------------------------------------- sampling
def source_pixels(image: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE (1, H, W, 3|4) -> integer-valued 0..255 pixels (1, 3, H, W); alpha over white."""
    pixels = (composite_on_white(image) * 255).round()
    return pixels.permute(0, 3, 1, 2).contiguous()


def crop_and_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The original's ``resize(center_crop(img, min(H, W)), size)`` on uint8 images: bilinear with
    antialias in float, rounded back to integers (torchvision's tensor path)."""
    box = centre_crop_box(pixels.shape[-2], pixels.shape[-1])
    square = pixels[..., box.top:box.top + box.side, box.left:box.left + box.side]
    if box.side == size:
        return square.clone()
    resized = vivid_sampler.resize_bilinear_antialias(square, (size, size))
    return resized.round().clamp(0, 255)


def target_seeds(seed: int, count: int) -> List[int]:
    """Seed of each target view: seed + index (the original driver's seed list, e.g. '0-63')."""
    return [int(seed) + i for i in range(count)]


class NVSVIVIDSampler:
    DESCRIPTION = ("Novel views with VIVID: one image per target camera from one source image and its camera. "
                   "The source is centre-cropped to a square (side min(H, W), offsets as torchvision's center_crop) "
                   "and resized (bilinear, antialiased, rounded to 8-bit) to the nets' resolutions, as the original "
                   "data pipeline does; the crop is reported in 'info'. Target i uses seed + i, so each view is "
                   "reproducible and does not depend on batch_size. Defaults follow the published sampler: 32 EDM "
                   "Heun steps, autoguidance weight 1.5 (needs a guidance net), 64 -> 256 super-resolution (its "
                   "conditioning noise, global-RNG upstream, comes from per-target streams here).")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "info")
    OUTPUT_TOOLTIPS = ("One view per target camera, in camera order: 64 px, or the SR net's 256 px with "
                       "super_resolution on.", "What was done: the source crop, sizes, seeds and timing.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vivid": (VIVID, {"tooltip": "Nets from NVS VIVID Loader."}),
            "source_image": ("IMAGE", {"tooltip": "One source photo, any size and aspect (centre-cropped to a "
                             "square). RGBA is composited over white."}),
            "source_camera": (CAMERA, {"tooltip": "The camera of the source photo (exactly one); its width/height "
                              "must have the photo's aspect ratio."}),
            "target_cameras": (CAMERA, {"tooltip": "Cameras to render, one output image each."}),
            "steps": int_input(PUBLISHED_STEPS, 2, 256, "EDM Heun steps per stage (published: 32; each step but "
                               "the last calls the nets twice)."),
            "guidance": float_input(PUBLISHED_GUIDANCE, 0.0, 20.0, 0.05, "Autoguidance weight g: D = D_guide + "
                                    "g (D_base - D_guide). Published: 1.5 with vivid-uncond; 1 = no guidance (no "
                                    "guidance net needed)."),
            "seed": seed_input("Seed of the first target view; target i uses seed + i."),
            "batch_size": int_input(4, 1, 256, "Target views sampled together (memory vs speed); results do not "
                                    "depend on it."),
            "super_resolution": ("BOOLEAN", {"default": True, "tooltip": "Refine every view with the SR net "
                                 "(needs sr_model in the loader), as published; off gives base-resolution views."}),
        }, "optional": {
            "translation_scale": float_input(1.0, 0.001, 1000.0, 0.001, "Multiplies camera translations: scene "
                                             "units -> the training data's scale (RealEstate10K SfM units for the "
                                             "published nets)."),
            "sr_steps": int_input(0, 0, 256, "EDM steps of the SR stage; 0 = the same as steps."),
            "published_intrinsics_quirk": ("BOOLEAN", {"default": False, "tooltip": "Give the nets the intrinsics "
                                           "the published data pipeline computed (cropped/resized twice: 64-px focal "
                                           "about 0.71x too small for 640x360 frames), which the released weights may "
                                           "have been trained on; off gives the geometrically correct intrinsics."}),
        }}

    def sample(self, vivid, source_image, source_camera, target_cameras, steps=PUBLISHED_STEPS,
               guidance=PUBLISHED_GUIDANCE, seed=0, batch_size=4, super_resolution=True, translation_scale=1.0,
               sr_steps=0, published_intrinsics_quirk=False):
        started = time.perf_counter()
        models = self._check_models(vivid)
        image = self._check_source(source_image)
        source_camera, target_cameras = self._check_cameras(source_camera, target_cameras, image)
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an integer >= 2 (the EDM schedule needs two noise levels), got {steps!r}")
        if not isinstance(sr_steps, int) or sr_steps < 0 or sr_steps == 1:
            raise ValueError(f"sr_steps must be 0 (same as steps) or an integer >= 2, got {sr_steps!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        guided = not math.isclose(guidance, 1.0, abs_tol=1e-9)
        if guided and models.guidance is None:
            raise ValueError(f"guidance: {guidance} needs a guidance net; choose guidance_model (vivid-uncond) in the "
                             "VIVID loader, or set guidance to 1 to sample without guidance")
        if not math.isfinite(translation_scale) or translation_scale <= 0:
            raise ValueError(f"translation_scale must be a finite number > 0, got {translation_scale}")
        if super_resolution and models.sr is None:
            raise ValueError("super_resolution: no SR net loaded; choose sr_model (vivid-sr) in the VIVID loader, or "
                             "turn super_resolution off for base-resolution views")

        count = len(target_cameras)
        res = models.resolution
        pixels = source_pixels(image)
        src = crop_and_resize(pixels, res)
        sr = models.sr if super_resolution else None
        # The published pipeline cropped K to the SR size (256 = 4 x 64), then again to the base size.
        aliased = None
        if published_intrinsics_quirk:
            aliased = (int(sr.img_resolution) if sr is not None else 4 * res, res)
        labels = geometry_from_cameras(source_camera, target_cameras, res, translation_scale, aliased)
        sr_src = sr_labels = None
        if sr is not None:
            sr_res = int(sr.img_resolution)
            sr_src = crop_and_resize(pixels, sr_res)
            sr_labels = geometry_from_cameras(source_camera, target_cameras, sr_res, translation_scale, aliased)
        seeds = target_seeds(seed, count)
        gnet = models.guidance if guided else None
        guidance = guidance if guided else 1.0
        sr_count = (sr_steps or steps) if sr is not None else 0
        batches = vivid_sampler.split_seed_batches(count, batch_size)

        device = models.device
        images = []
        bar = host.progress_factory()(len(batches) * (steps + sr_count), "VIVID novel views")
        try:
            autocast = (torch.autocast(device.type, dtype=models.autocast_dtype) if models.autocast_dtype is not None
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                for batch in batches:
                    idx = list(batch)
                    batch_seeds = [seeds[i] for i in idx]
                    cond_noise = vivid_sampler.SeededNoise(
                        [s + SR_CONDITIONING_SEED_OFFSET for s in batch_seeds]).randn_like
                    out = vivid_sampler.generate_views(
                        models.base, src.expand(len(idx), -1, -1, -1), labels[idx], batch_seeds, gnet=gnet,
                        guidance=guidance, num_steps=steps, max_batch_size=len(idx), sr_net=sr,
                        sr_src_pixels=sr_src.expand(len(idx), -1, -1, -1) if sr is not None else None,
                        sr_labels=sr_labels[idx] if sr is not None else None, sr_num_steps=sr_count or None,
                        sr_conditioning_randn_like=cond_noise, progress=shared_progress(bar))
                    images.append(out["images"].to("cpu"))
        finally:
            bar.close()

        result = torch.cat(images).permute(0, 2, 3, 1).to(torch.float32) / 255.0
        info = self._info(image, models, src.shape[-1], sr_src.shape[-1] if sr is not None else None, seeds, steps,
                          sr_count, guidance if gnet is not None else 1.0, batch_size, translation_scale,
                          time.perf_counter() - started)
        return {"ui": {"text": [info]}, "result": (result.to(host.intermediate_device()), info)}

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def _check_models(vivid) -> VividModels:
        if not isinstance(vivid, VividModels):
            raise ValueError(f"vivid: expected the NVS_VIVID output of NVS VIVID Loader, got {type(vivid).__name__}")
        return vivid

    @staticmethod
    def _check_source(image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"source_image: expected an IMAGE tensor [batch, height, width, channels], got {shape}")
        if image.shape[0] != 1:
            raise ValueError(f"source_image: expected exactly one source image, got a batch of {image.shape[0]} "
                             "(pick one, e.g. with an image-from-batch node)")
        if image.shape[-1] not in (3, 4):
            raise ValueError(f"source_image: expected RGB or RGBA (3 or 4 channels), got {image.shape[-1]}")
        if image.shape[1] < 2 or image.shape[2] < 2:
            raise ValueError(f"source_image: image of {image.shape[2]}x{image.shape[1]} pixels is too small")
        if not torch.isfinite(image).all():
            raise ValueError("source_image: contains NaN or infinite values")
        return image

    @staticmethod
    def _check_cameras(source_camera, target_cameras, image) -> Tuple[Cameras, Cameras]:
        for name, value in (("source_camera", source_camera), ("target_cameras", target_cameras)):
            if not isinstance(value, Cameras):
                raise ValueError(f"{name}: expected NVS_CAMERA cameras, got {type(value).__name__}")
        if len(source_camera) != 1:
            raise ValueError(f"source_camera: expected exactly one camera (the source photo's), "
                             f"got {len(source_camera)}")
        if len(target_cameras) == 0:
            raise ValueError("target_cameras: the camera batch is empty; give at least one target camera")
        height, width = image.shape[1], image.shape[2]
        image_aspect = width / height
        camera_aspect = source_camera.width / source_camera.height
        if abs(image_aspect / camera_aspect - 1) > ASPECT_TOLERANCE:
            raise ValueError(f"source_camera: made for {source_camera.width}x{source_camera.height} images but the "
                             f"source image is {width}x{height} (aspect {image_aspect:.3f} vs {camera_aspect:.3f}); "
                             "set the camera's width and height to the photo's size")
        return source_camera, target_cameras

    @staticmethod
    def _info(image, models, res, sr_res, seeds, steps, sr_steps, guidance, batch_size, translation_scale,
              seconds) -> str:
        height, width = image.shape[1], image.shape[2]
        box = centre_crop_box(height, width)
        sizes = f"{res}x{res}" + (f" (base) and {sr_res}x{sr_res} (SR)" if sr_res else "")
        note = " (upscaled: the crop is smaller than the net's resolution)" if box.side < (sr_res or res) else ""
        alpha = "; alpha composited over white" if image.shape[-1] == 4 else ""
        seed_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}..{seeds[-1]} (seed + index)"
        guide = f"autoguidance {guidance:g} with {models.names.get('guidance', 'the guidance net')}" \
            if guidance != 1 else "no guidance"
        stages = f"{steps} steps" + (f" + {sr_steps} SR steps" if sr_res else "")
        return (f"source {width}x{height}: centre crop {box.side}x{box.side} at x={box.left}, y={box.top}, "
                f"resized to {sizes}{note}"
                f"{alpha}\n{len(seeds)} views, seeds {seed_text}, {stages}, {guide}, batch {batch_size}, "
                f"translation x{translation_scale:g}\n{models.device}, {seconds:.1f} s")


# --------------------------------------------------------------------------------------------- training
_NETWORK_COMMON = {k: v for k, v in training.DEMO_NETWORK.items()
                   if k not in ("img_resolution", "model_channels", "channel_mult", "attn_resolutions",
                                "channels_per_head")}
TRAIN_NETWORKS = {
    # The 32-px demo architecture (models/demo/vivid_procedural.safetensors): trains in about an hour on a CPU.
    "demo 32px": copy.deepcopy(training.DEMO_NETWORK),
    # A toy for trying the pipeline in minutes.
    "tiny 16px": dict(_NETWORK_COMMON, img_resolution=16, model_channels=16, channel_mult=[1, 2],
                      attn_resolutions=[8], channels_per_head=16),
    # The published base architecture (250M parameters): a GPU job.
    "vivid-base 64px": copy.deepcopy(loading.VIVID_PRESETS["vivid-base"]),
}
DATA_SOURCES = ["procedural", "multiview"]


class NVSVIVIDTrain:
    DESCRIPTION = ("Train a VIVID network (EDM2 recipe: log-normal noise levels, learned loss weighting, Adam with "
                   "1/sqrt decay, power-function EMA) on pairs of views: random procedural objects rendered on the "
                   "fly, or a connected NVS_MULTIVIEW. Checkpoints go to ComfyUI's output folder "
                   "(nvs_vivid_training/<output_name>/) and training resumes from there; the EMA network is copied "
                   "to models/nvs/vivid/<output_name>.safetensors for NVS VIVID Loader.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (VIVID, "STRING")
    RETURN_NAMES = ("vivid", "summary")
    OUTPUT_TOOLTIPS = ("The trained (EMA) network as base net, ready for NVS VIVID Sampler (guidance 1, no SR).",
                       "Steps, loss, time and the files written.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "data_source": (DATA_SOURCES, {"default": "procedural", "tooltip": "procedural: endless random objects "
                            "with exact cameras (white background, orbit radius 2.6, fov 45); multiview: the "
                            "connected multiview input (pairs of its views)."}),
            "network": (list(TRAIN_NETWORKS), {"default": "demo 32px", "tooltip": "Architecture and resolution: "
                        "demo 32px (the pack's demo model), tiny 16px (minutes on a CPU), vivid-base 64px (the "
                        "published base net, 250M parameters: a GPU job)."}),
            "steps": int_input(200, 1, 10_000_000, "Total optimizer steps (a resumed run continues up to this)."),
            "learning_rate": float_input(0.01, 0.00001, 1.0, 0.0001, "EDM2 reference learning rate (decays as "
                                         "1/sqrt(t) after 2000 steps, 100-step ramp-up)."),
            "batch_size": int_input(16, 1, 4096, "View pairs per step."),
            "seed": seed_input("Seed of the initial weights and of every step's data and noise."),
            **train_run_inputs("vivid_trained", "vivid"),
        }, "optional": {
            "multiview": (MULTIVIEW, {"tooltip": "Training views for data_source 'multiview' (at least 2 views)."}),
            "translation_scale": float_input(training.DEMO_TRANSLATION_SCALE, 0.001, 1000.0, 0.001,
                                             "Scene units -> label units for camera translations (use the same "
                                             "value in the sampler); 0.25 suits the procedural orbit of radius 2.6."),
            "checkpoint_every": checkpoint_every_input(),
        }}

    def train(self, data_source, network, steps, learning_rate, batch_size, seed, output_name, resume,
              multiview=None, translation_scale=training.DEMO_TRANSLATION_SCALE, checkpoint_every=100):
        name = train_output_name(output_name, "vivid")
        if data_source not in DATA_SOURCES:
            raise ValueError(f"data_source must be one of {DATA_SOURCES}, got {data_source!r}")
        if network not in TRAIN_NETWORKS:
            raise ValueError(f"network must be one of {list(TRAIN_NETWORKS)}, got {network!r}")
        for label, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("checkpoint_every",
                                                                                       checkpoint_every, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
        if not math.isfinite(translation_scale) or translation_scale <= 0:
            raise ValueError(f"translation_scale must be a finite number > 0, got {translation_scale}")
        data = None
        if data_source == "multiview":
            data, spec = training_views(multiview, "to make training pairs")
        else:
            spec = {"kind": "procedural"}

        device = host.compute_device()
        run_dir = os.path.join(host.output_directory(), "nvs_vivid_training", name)
        config = training.TrainConfig(network=copy.deepcopy(TRAIN_NETWORKS[network]), data=spec,
                                      translation_scale=float(translation_scale), total_steps=steps,
                                      batch_size=batch_size, ref_lr=float(learning_rate), seed=int(seed),
                                      out_dir=run_dir, checkpoint_every=checkpoint_every, resume=bool(resume),
                                      device=str(device), reproduce=f"ComfyUI node NVSVIVIDTrain ({network})")
        losses = []
        with torch.inference_mode(False):
            try:
                result = training.train(config, progress=host.progress_factory(),
                                        callback=lambda info: losses.append(info["loss"]), data=data)
            except CheckpointError as exc:
                raise ValueError(f"resume: {exc}") from None

        target = export_trained(result.ema_path, host.model_folders(METHOD)[0], name)
        net = result.ema.to(device).train(False).requires_grad_(False)
        models = VividModels(net, names={"base": f"{name}.safetensors"})
        loss_text = mean_loss_text(result.losses)
        summary = (f"VIVID training '{name}': {network}, {data_source} data, step {result.step}/{steps} "
                   f"({len(losses)} this run, {result.seconds:.1f} s), batch {batch_size}, lr {learning_rate:g}\n"
                   f"loss {loss_text}\nnetwork: {target}\ncheckpoint: {result.state_path}\n"
                   f"sample with translation_scale {translation_scale:g}, guidance 1, super_resolution off")
        return {"ui": {"text": [summary]}, "result": (models, summary)}


NODE_CLASS_MAPPINGS = {
    "NVSVIVIDLoader": NVSVIVIDLoader,
    "NVSVIVIDSampler": NVSVIVIDSampler,
    "NVSVIVIDTrain": NVSVIVIDTrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NVSVIVIDLoader": "NVS VIVID Loader",
    "NVSVIVIDSampler": "NVS VIVID Sampler",
    "NVSVIVIDTrain": "NVS VIVID Train",
}
