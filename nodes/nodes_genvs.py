"""GeNVS nodes: load a GeNVS model, preview its feature render, sample novel views, generate orbits.

GeNVS lifts each source image into a camera-frustum feature volume, renders a feature image at the
target camera with a small NeRF averaged over the sources, and samples the novel view with a pixel
diffusion model conditioned on that render (``nvs_core.genvs``). Images of any size are composited over
white, centre-cropped to a square and resized to the model's size; cameras get the same crop. Scenes
live in the cube [-1, 1]^3 (after ``scene_scale``); cameras must be outside it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..nvs_core.cameras import Cameras
from ..nvs_core.checkpoints import CheckpointError
from ..nvs_core.genvs import inputs as gin
from ..nvs_core.imageio import CropBox, crop_cameras
from ..nvs_core.genvs.cameras import GeNVSCameras, circle_path, from_genvs, to_genvs
from ..nvs_core.genvs.config import NOISE_CONFIGS
from ..nvs_core.genvs.loading import load_genvs_checkpoint
from ..nvs_core.genvs.model import GeNVS
from ..nvs_core.genvs.orbit import autoregressive_orbit
from ..nvs_core.genvs.pipeline import generate_views, source_views
from ..nvs_core.multiview import MultiView
from ..nvs_core.progress import shared as shared_progress

from . import host
from .common import CAMERA, MULTIVIEW, float_input, int_input, seed_input

CATEGORY = "NVS/GeNVS"
GENVS = "NVS_GENVS"
METHOD = "genvs"
DEVICE_CHOICES = ["auto", "cpu"]
NOISE_CHOICES = ["auto"] + sorted(NOISE_CONFIGS)
# The bundled demo model, offered in the loader while the file exists.
DEMO_CHOICE = "demo/genvs_procedural.safetensors"
DEMO_PATH = Path(__file__).resolve().parents[1] / "models" / "demo" / "genvs_procedural.safetensors"
PUBLISHED_STEPS = 250
WORLD, FIRST_SOURCE = "world", "first source"
FRAME_CHOICES = ["auto", WORLD, FIRST_SOURCE]
# A target whose render has no pixel above this opacity sees only background (its rays miss the scene).
MISS_OPACITY = 0.01
# Device volumes kept by the orbit's cache (the rest go to host memory, at most MAX_OFFLOADED_VOLUMES).
MAX_OFFLOADED_VOLUMES = 64


# --------------------------------------------------------------------------------------------- NVS_GENVS
@dataclass
class GeNVSModel:
    """The ``NVS_GENVS`` type: a loaded GeNVS network and how to place cameras for it.

    ``scene_scale`` multiplies camera positions (scene units -> the model's cube [-1, 1]^3)."""

    model: GeNVS
    name: str = "<in memory>"
    scene_scale: float = 1.0
    info: Dict[str, object] = field(default_factory=dict)
    autocast_dtype: Optional[torch.dtype] = None   # fp16/bf16 compute; the weights stay float32
    first_source_frame: bool = False               # poses relative to the first source (normalize_first_view)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def bound(self) -> float:
        return float(self.model.config.nerf.bound)

    def describe(self) -> str:
        cfg = self.config
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        d = cfg.denoiser
        lines = [f"GeNVS {self.name}: {params:.3g}M parameters, source images {cfg.image_size} px, render "
                 f"{cfg.render_size} px x {cfg.nerf.color_feat_dim} features, views {cfg.diffusion_size} px",
                 f"noise sigma {d.sigma_min:g}..{d.sigma_max:g}, scene_scale {self.scene_scale:g} "
                 f"(cameras outside the cube [-{self.bound:g}, {self.bound:g}]^3), camera frame: "
                 f"{FIRST_SOURCE if self.first_source_frame else WORLD}",
                 f"device {self.device}, weights {str(self.dtype).replace('torch.', '')}, compute "
                 f"{str(self.autocast_dtype or self.dtype).replace('torch.', '')}"]
        fmt = self.info.get("format")
        if fmt:
            lines.insert(1, f"format: {fmt}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- loading
_CACHE: "OrderedDict[tuple, GeNVSModel]" = OrderedDict()
_CACHE_SIZE = 2


def clear_cache() -> None:
    _CACHE.clear()


def model_files() -> List[str]:
    files = host.list_model_files(METHOD)
    if DEMO_PATH.is_file() and DEMO_CHOICE not in files:
        files = files + [DEMO_CHOICE]
    return files


def model_path(name: str) -> str:
    """The file behind a loader choice: models/nvs/genvs/ first, then the bundled demo model."""
    try:
        return host.model_path(METHOD, name)
    except FileNotFoundError as exc:
        if name == DEMO_CHOICE and DEMO_PATH.is_file():
            return str(DEMO_PATH)
        if name == DEMO_CHOICE:
            raise ValueError(f"model: the bundled demo model {DEMO_PATH} is missing (reinstall the pack, or choose "
                             "a file from models/nvs/genvs/)") from None
        raise ValueError(f"model: {exc}") from None


def _file_key(path: str) -> Tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


def _file_first_source_frame(meta: dict) -> bool:
    """True when the file was trained with poses relative to the first view (our trainer records it)."""
    training = meta.get("training") if isinstance(meta, dict) else None
    return bool(isinstance(training, dict) and training.get("normalize_first_view"))


def _file_scene_scale(meta: dict) -> Optional[float]:
    value = meta.get("scene_scale") if isinstance(meta, dict) else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class NVSGeNVSLoader:
    DESCRIPTION = ("Load a GeNVS model from models/nvs/genvs/: the published genvs.pt (read safely with "
                   "torch.load(weights_only=True); its duplicated denoiser copies are checked and collapsed) or a "
                   "converted .safetensors + .json (python -m nvs_core convert, or NVS GeNVS Train). "
                   f"'{DEMO_CHOICE}' is the small model bundled with the pack, trained on procedural scenes. "
                   "Loaded models are cached while their files are unchanged.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (GENVS,)
    RETURN_NAMES = ("genvs",)
    OUTPUT_TOOLTIPS = ("The loaded model, for the GeNVS render, sampler and orbit nodes.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = model_files()
        opts = {"nvs_model_folder": METHOD}
        if DEMO_CHOICE in files:
            opts["default"] = DEMO_CHOICE
        return {"required": {
            "model": (files, {"tooltip": "genvs.pt (published) or a converted .safetensors from models/nvs/genvs/, or "
                              f"the bundled demo model ({DEMO_CHOICE}).", **opts}),
            "device": (DEVICE_CHOICES, {"default": "auto", "tooltip": "auto: ComfyUI's compute device (the GPU when "
                       "there is one); cpu: always the CPU."}),
            "dtype": (list(host.DTYPE_CHOICES), {"default": "auto", "tooltip": "Compute precision. auto and fp32: "
                      "float32; fp16 (GPU only) and bf16 compute the networks under autocast. Weights and camera "
                      "geometry stay float32/float64 either way."}),
            "noise": (NOISE_CHOICES, {"default": "auto", "tooltip": "Sigma limits of the sampler: auto = the "
                      "file's own (converted files) or the published 'mid' config (genvs.pt: sigma 0.03..50); low "
                      "and high: sigma 0.01..80 (the published low/high configs)."}),
            "scene_scale": float_input(0.0, 0.0, 1000.0, 0.001, "Multiplies camera positions (scene units -> the "
                                       "model's cube [-1, 1]^3). 0 = the file's value (the demo model's training "
                                       "scale), else 1 (SRN cars: cameras at distance 1.3)."),
            "camera_frame": (FRAME_CHOICES, {"default": "auto", "tooltip": "How poses reach the network. world: "
                             "as given (the published sampling scripts); first source: relative to the first source "
                             "camera, which becomes the identity at its distance from the origin (training-time "
                             "normalize_first_view); auto: what the file was trained with (world for genvs.pt)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, model, device, dtype, noise, scene_scale, camera_frame="auto"):
        try:
            stamp = str(_file_key(model_path(model)))
        except (OSError, TypeError, ValueError):
            stamp = f"missing {model}"
        return "|".join([stamp, str(device), str(dtype), str(noise), str(scene_scale), str(camera_frame)])

    def load(self, model, device="auto", dtype="auto", noise="auto", scene_scale=0.0, camera_frame="auto"):
        if not isinstance(model, str) or not model:
            raise ValueError("model: choose a GeNVS file from models/nvs/genvs/ (genvs.pt or a converted "
                             ".safetensors)")
        if device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
        if camera_frame not in FRAME_CHOICES:
            raise ValueError(f"camera_frame must be one of {FRAME_CHOICES}, got {camera_frame!r}")
        if noise not in NOISE_CHOICES:
            raise ValueError(f"noise must be one of {NOISE_CHOICES}, got {noise!r}")
        if not isinstance(scene_scale, (int, float)) or not math.isfinite(scene_scale) or scene_scale < 0:
            raise ValueError(f"scene_scale must be a finite number >= 0 (0 = the file's), got {scene_scale!r}")
        if dtype not in host.DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {host.DTYPE_CHOICES}, got {dtype!r}")
        run_device = host.compute_device() if device == "auto" else torch.device("cpu")
        compute = None if dtype in ("auto", "fp32") else host.resolve_dtype(dtype, run_device)
        if run_device.type == "cpu" and compute == torch.float16:
            raise ValueError("dtype: fp16 runs on a GPU only; choose fp32 or bf16 on the CPU")
        path = model_path(model)
        key = (_file_key(path), str(run_device), noise)
        if key in _CACHE:
            _CACHE.move_to_end(key)
            cached = _CACHE[key]
        else:
            try:
                ckpt = load_genvs_checkpoint(path, None if noise == "auto" else noise)
                net = ckpt.build(run_device, torch.float32)
            except CheckpointError as exc:
                raise ValueError(f"model: {model} is not a usable GeNVS checkpoint: {exc}") from None
            meta = ckpt.extras.get("meta", {}) if isinstance(ckpt.extras.get("meta"), dict) else {}
            fmt = ("published genvs.pt" if ckpt.extras.get("source_format") else "converted safetensors + JSON")
            cached = GeNVSModel(net, model, _file_scene_scale(meta) or 1.0, {"format": fmt, "meta": meta},
                                first_source_frame=_file_first_source_frame(meta))
            _CACHE[key] = cached
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        result = GeNVSModel(cached.model, cached.name, float(scene_scale) if scene_scale > 0 else cached.scene_scale,
                            cached.info, compute, cached.first_source_frame if camera_frame == "auto"
                            else camera_frame == FIRST_SOURCE)
        return {"ui": {"text": [result.describe()]}, "result": (result,)}


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class Sources:
    images01: torch.Tensor          # (N, 3, S, S) at the model's image size
    cameras: GeNVSCameras           # in the network's frame
    world: GeNVSCameras             # in GeNVS's world frame (Z up, scaled)
    transform: torch.Tensor         # world -> network frame (4, 4) float64
    box: CropBox
    alpha: bool


@dataclass
class Targets:
    cameras: Cameras                # cropped to their centre square
    groups: List[List[int]]         # runs of targets sharing intrinsics
    box: CropBox
    transform: torch.Tensor         # world -> network frame (the sources')


def _check_model(genvs) -> GeNVSModel:
    if not isinstance(genvs, GeNVSModel):
        raise ValueError(f"genvs: expected the NVS_GENVS output of NVS GeNVS Loader, got {type(genvs).__name__}")
    return genvs


def _check_cameras(value, name: str) -> Cameras:
    if not isinstance(value, Cameras):
        raise ValueError(f"{name}: expected NVS_CAMERA cameras, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: the camera batch is empty; give at least one camera")
    return value


def _refuse_inside(genvs: GeNVSModel, g: GeNVSCameras, name: str) -> None:
    inside = gin.inside_cube(g.poses[:, :3, 3].double(), genvs.bound)
    if inside:
        dist = float(g.poses[inside[0], :3, 3].norm())
        raise ValueError(f"{name}: camera {gin.describe_indices(inside)} is inside the scene cube "
                         f"[-{genvs.bound:g}, {genvs.bound:g}]^3 (distance {dist:.3g} from the centre after "
                         f"scene_scale {genvs.scene_scale:g}); GeNVS sees its scene from outside that cube: move the "
                         "camera further out or lower scene_scale in the loader")


def prepare_sources(genvs: GeNVSModel, source_images, source_cameras) -> Sources:
    if not isinstance(source_images, torch.Tensor) or source_images.ndim != 4:
        shape = tuple(source_images.shape) if isinstance(source_images, torch.Tensor) else type(source_images).__name__
        raise ValueError(f"source_images: expected an IMAGE batch [batch, height, width, channels], got {shape}")
    if source_images.shape[0] == 0:
        raise ValueError("source_images: the image batch is empty; give at least one source image")
    if source_images.shape[-1] not in (3, 4):
        raise ValueError(f"source_images: expected RGB or RGBA (3 or 4 channels), got {source_images.shape[-1]}")
    if not torch.isfinite(source_images).all():
        raise ValueError("source_images: contains NaN or infinite values")
    cams = _check_cameras(source_cameras, "source_cameras")
    n, height, width = source_images.shape[:3]
    if len(cams) != n:
        raise ValueError(f"source_images: {n} images but source_cameras has {len(cams)} cameras; expected one "
                         "camera per source image, in the same order")
    gin.check_aspect(cams, width, height, "source_cameras")
    if len(gin.intrinsics_groups(cams, rtol=1e-3)) > 1:
        raise ValueError("source_cameras: the cameras have different intrinsics; GeNVS lifts every source view "
                         "with one field of view (the first camera's): give the sources one shared intrinsics")
    cropped, _ = crop_cameras(cams)
    images01, box = gin.prepare_images(source_images, genvs.config.image_size)
    world = to_genvs(cropped, genvs.config.render_size, 0, genvs.scene_scale)
    transform = (gin.first_view_transform(world.poses[0]) if genvs.first_source_frame
                 else torch.eye(4, dtype=torch.float64))
    g = _in_frame(world, transform)
    _refuse_inside(genvs, g, "source_cameras")
    return Sources(images01, g, world, transform, box, source_images.shape[-1] == 4)


def _in_frame(g: GeNVSCameras, transform: torch.Tensor) -> GeNVSCameras:
    return GeNVSCameras(gin.transform_poses(transform, g.poses), g.intrinsics, g.camera_k, g.render_size, g.camera_d)


def prepare_targets(genvs: GeNVSModel, target_cameras, sources: Sources, name: str = "target_cameras") -> Targets:
    if isinstance(target_cameras, Cameras) and len(target_cameras) == 0:
        raise ValueError(f"{name}: the camera batch is empty; give at least one target camera")
    cams = _check_cameras(target_cameras, name)
    cropped, box = crop_cameras(cams)
    targets = Targets(cropped, gin.intrinsics_groups(cropped), box, sources.transform)
    _refuse_inside(genvs, _genvs_targets(genvs, targets, list(range(len(cropped))), genvs.config.render_size), name)
    return targets


def _genvs_targets(genvs: GeNVSModel, targets: Targets, group: List[int], render_size: int) -> GeNVSCameras:
    """Targets ``group`` in the network's frame, intrinsics of the group's first camera on the render grid."""
    return _in_frame(to_genvs(targets.cameras[group], render_size, 0, genvs.scene_scale), targets.transform)


def _misses(opacity: torch.Tensor) -> List[int]:
    """Targets whose render is background only (every ray misses the scene cube)."""
    peak = opacity.reshape(opacity.shape[0], -1).amax(dim=1)
    return [int(i) for i in torch.nonzero(peak < MISS_OPACITY).flatten()]


def _crop_text(sources: Sources, targets: Optional[Targets], size: int) -> str:
    text = f"sources {sources.box.describe()} -> {size} px"
    if sources.alpha:
        text += "; alpha composited over white"
    if targets is not None and targets.box.side != max(targets.box.width, targets.box.height):
        text += f"\ntarget cameras {targets.box.describe()} (the model renders squares)"
    return text


def _miss_text(misses: List[int]) -> str:
    if not misses:
        return ""
    return (f"\ntarget {gin.describe_indices(misses)}: every ray misses the scene cube, only background "
            "(check where the camera looks)")


def _to_image(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> IMAGE (N, H, W, C) float32 on the intermediate device."""
    return x.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).contiguous().to(host.intermediate_device())


def _source_inputs() -> dict:
    return {
        "genvs": (GENVS, {"tooltip": "Model from NVS GeNVS Loader."}),
        "source_images": ("IMAGE", {"tooltip": "Source views (any size; centre-cropped to a square, RGBA over "
                          "white), one per source camera."}),
        "source_cameras": (CAMERA, {"tooltip": "The cameras of the source images, in order (one shared field of "
                           "view)."}),
    }


# --------------------------------------------------------------------------------------------- render
def depth_image(depth: torch.Tensor, opacity: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[float, float]]]:
    """Expected depth (N,1,H,W) -> a viewable map: near white, far dark, background black; the depth range."""
    hit = opacity > MISS_OPACITY
    if not hit.any():
        return torch.zeros_like(depth), None
    d = depth / opacity.clamp_min(1e-6)
    near, far = float(d[hit].min()), float(d[hit].max())
    scaled = (far - d) / max(far - near, 1e-6) * 0.9 + 0.1 if far > near else torch.ones_like(d)
    return torch.where(hit, scaled, torch.zeros_like(d)).clamp(0, 1), (near, far)


class NVSGeNVSRender:
    DESCRIPTION = ("Preview what GeNVS sees before sampling: the feature image its NeRF renders at each target "
                   "camera from the source images (first three channels, which training ties to colour), the "
                   "depth and the opacity. Use it to check that the cameras frame the object: an empty (white) "
                   "render means the target looks away from the scene. Sources are composited over white, "
                   "centre-cropped and resized like the sampler's.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("features", "depth", "opacity", "info")
    OUTPUT_TOOLTIPS = ("The first three rendered feature channels per target camera (0..1; the background is "
                       "white).", "Depth per target (near = bright, far = dark, background black; the range is in "
                       "info).", "Accumulated opacity per target (1 = the ray hit the scene).",
                       "What was done: crops, sizes, depth range and targets that miss the scene.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_source_inputs(),
            "target_cameras": (CAMERA, {"tooltip": "Cameras to render, one preview each."}),
            "size": int_input(0, 0, 512, "Render size in pixels; 0 = the model's render size (the grid the denoiser "
                              "is conditioned on)."),
            "seed": seed_input("Seed of the renderer's ray jitter."),
        }}

    def render(self, genvs, source_images, source_cameras, target_cameras, size=0, seed=0):
        started = time.perf_counter()
        genvs = _check_model(genvs)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an integer >= 0 (0 = the model's render size), got {size!r}")
        sources = prepare_sources(genvs, source_images, source_cameras)
        targets = prepare_targets(genvs, target_cameras, sources)
        size = size or genvs.config.render_size
        model = genvs.model
        generator = torch.Generator().manual_seed(int(seed))
        feats, depths, opacities = [], [], []
        bar = host.progress_factory()(len(targets.groups) + 1, "GeNVS render")
        try:
            with torch.inference_mode(), model.mode(False), genvs.autocast():
                src = source_views(model, sources.images01, sources.cameras)
                bar.update(1)
                for group in targets.groups:
                    g = _genvs_targets(genvs, targets, group, size)
                    f, d, o = model.render(src, g.poses[None].to(genvs.device), g.intrinsics, size=size,
                                           generator=generator, check=bar.check)
                    feats.append(f[0].float())
                    depths.append(d[0].float())
                    opacities.append(o[0].float())
                    bar.update(1)
        finally:
            bar.close()
        f, d, o = torch.cat(feats), torch.cat(depths), torch.cat(opacities)
        depth, rng = depth_image(d, o)
        misses = _misses(o)
        info = (f"{_crop_text(sources, targets, genvs.config.image_size)}\n{len(sources.images01)} sources, "
                f"{len(o)} targets rendered at {size} px\n"
                + (f"depth {rng[0]:.3g} (white) .. {rng[1]:.3g} (dark)" if rng else "depth: no ray hits the scene")
                + _miss_text(misses) + f"\n{genvs.device}, {time.perf_counter() - started:.1f} s")
        opacity = o[:, 0].detach().to("cpu", torch.float32).clamp(0, 1).to(host.intermediate_device())
        features = _to_image(f[:, :3].clamp(0, 1))
        return {"ui": {"text": [info]}, "result": (features, _to_image(depth.expand(-1, 3, -1, -1)), opacity, info)}


# --------------------------------------------------------------------------------------------- sampling
def _sampling_inputs() -> dict:
    return {
        "steps": int_input(PUBLISHED_STEPS, 1, 10000, "Euler steps on the Karras noise schedule (published: 250; "
                           "one denoiser call per step, two with cfg != 1)."),
        "stochastic": ("BOOLEAN", {"default": True, "tooltip": "Churn noise at every step (published: on, gamma 0.4, "
                       "s_noise 1.003); off = deterministic Euler (noise is still drawn every step, as published)."}),
        "cfg": float_input(1.0, 0.0, 20.0, 0.05, "Classifier-free guidance: D = D_u + cfg (D_c - D_u), the "
                           "unconditional branch seeing uniform noise instead of the render (as in training); 1 = off "
                           "(one denoiser call per step)."),
        "seed": seed_input("Seed of the first target view; target i uses seed + i."),
    }


class NVSGeNVSSampler:
    DESCRIPTION = ("Novel views with GeNVS: one image per target camera. The source views are lifted into feature "
                   "volumes, a NeRF renders a feature image at each target, and the denoiser samples the view from "
                   "it (Karras sigmas, Euler with churn, as the published sampler). Target i uses its own noise "
                   "stream seeded seed + i, so a view does not depend on the other targets or on batch_size. Eval "
                   "mode by default; published_train_mode reproduces the original scripts (dropout and random "
                   "importance samples active).")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "info")
    OUTPUT_TOOLTIPS = ("One view per target camera, in camera order, at the model's view size (published: 128 px).",
                       "What was done: crops, seeds, steps, timing, and targets that miss the scene.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_source_inputs(),
            "target_cameras": (CAMERA, {"tooltip": "Cameras to generate, one image each."}),
            **_sampling_inputs(),
            "batch_size": int_input(4, 1, 256, "Target views through the denoiser together (memory vs speed); results "
                                    "do not depend on it."),
        }, "optional": {
            "published_train_mode": ("BOOLEAN", {"default": False, "tooltip": "Sample like the published scripts, "
                                     "which never leave train mode: denoiser dropout and random importance samples "
                                     "active. Off: eval mode (deterministic network)."}),
        }}

    def sample(self, genvs, source_images, source_cameras, target_cameras, steps=PUBLISHED_STEPS, stochastic=True,
               cfg=1.0, seed=0, batch_size=4, published_train_mode=False):
        started = time.perf_counter()
        genvs = _check_model(genvs)
        _check_sampling(steps, cfg, seed)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        sources = prepare_sources(genvs, source_images, source_cameras)
        targets = prepare_targets(genvs, target_cameras, sources)
        model = genvs.model
        images, opacities = [], []
        bar = host.progress_factory()(len(targets.groups) * steps, "GeNVS novel views")
        try:
            with torch.inference_mode(), genvs.autocast():
                volumes = model.encode(sources.images01)
                bar.check()
                for group in targets.groups:
                    g = _genvs_targets(genvs, targets, group, genvs.config.render_size)
                    out = generate_views(model, sources.images01, sources.cameras, g, steps=steps,
                                         stochastic=bool(stochastic), cfg=float(cfg), seed=int(seed) + group[0],
                                         noise="per_target", batch_size=batch_size,
                                         published_train_mode=bool(published_train_mode), volumes=volumes,
                                         progress=shared_progress(bar))
                    images.append(out["images"].float().cpu())
                    opacities.append(out["opacity"].float().cpu())
        finally:
            bar.close()
        result = torch.cat(images)
        count = len(result)
        seeds = f"{seed}" if count == 1 else f"{seed}..{seed + count - 1} (seed + index)"
        info = (f"{_crop_text(sources, targets, genvs.config.image_size)}\n{len(sources.images01)} sources, {count} "
                f"views of {result.shape[-1]} px, seeds {seeds}, {steps} steps, "
                f"{'stochastic' if stochastic else 'deterministic'}, cfg {cfg:g}, batch {batch_size}"
                + (", published train mode" if published_train_mode else "")
                + _miss_text(_misses(torch.cat(opacities)))
                + f"\n{genvs.device}, {time.perf_counter() - started:.1f} s")
        return {"ui": {"text": [info]}, "result": (_to_image(result), info)}


def _check_sampling(steps, cfg, seed) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg must be a finite number >= 0, got {cfg!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


# --------------------------------------------------------------------------------------------- orbit
class NVSGeNVSOrbit:
    DESCRIPTION = ("An autoregressive orbit with GeNVS (the published sample_ar.py schedule): views are generated "
                   "one at a time along the path, each conditioned on all sources, up to 4 earlier generated views "
                   "(drawn with Python's random seeded 123) and the latest one; every generated view joins the "
                   "conditioning pool. Without a path, the published circle: frames poses turning about the "
                   "vertical axis through the origin, starting next to the first source camera. Each view is "
                   "encoded once and cached, so the cost per frame does not grow with the orbit, and memory stays "
                   "bounded for any path length: at most max_cached_volumes volumes on the device and "
                   f"{MAX_OFFLOADED_VOLUMES} in host memory; others are re-encoded when the schedule needs them "
                   "again (same result).")
    CATEGORY = CATEGORY
    FUNCTION = "orbit"
    RETURN_TYPES = ("IMAGE", CAMERA, MULTIVIEW, "STRING")
    RETURN_NAMES = ("frames", "path", "multiview", "info")
    OUTPUT_TOOLTIPS = ("One generated view per pose of the path, in order.", "The path's cameras, one per frame "
                       "(square, at the frames' size).", "The generated views with their cameras, e.g. as "
                       "supervision for later nodes.", "What was done: crops, path, steps, cache use and timing.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_source_inputs(),
            **_sampling_inputs(),
            "frames": int_input(8, 1, 1000, "Frames of the built-in circle (used when no path is connected): the "
                                "circle through the first source camera split into frames + 1 poses, the source's "
                                "own pose skipped (the published script: 200 poses)."),
        }, "optional": {
            "path": (CAMERA, {"tooltip": "Any camera path to follow instead of the circle (one shared field of "
                     "view); one frame per camera."}),
            "published_train_mode": ("BOOLEAN", {"default": False, "tooltip": "Sample like the published scripts "
                                     "(train mode: dropout and random importance samples active)."}),
            "max_cached_volumes": int_input(8, 1, 1024, "Encoder volumes kept on the compute device (a full-size one "
                                            "is 64 MB); others wait in host memory or are re-encoded. Never changes "
                                            "a result."),
        }}

    def orbit(self, genvs, source_images, source_cameras, steps=PUBLISHED_STEPS, stochastic=True, cfg=1.0, seed=0,
              frames=8, path=None, published_train_mode=False, max_cached_volumes=8):
        started = time.perf_counter()
        genvs = _check_model(genvs)
        _check_sampling(steps, cfg, seed)
        if not isinstance(max_cached_volumes, int) or max_cached_volumes < 1:
            raise ValueError(f"max_cached_volumes must be an integer >= 1, got {max_cached_volumes!r}")
        sources = prepare_sources(genvs, source_images, source_cameras)
        render_size = genvs.config.render_size
        if path is not None:
            targets = prepare_targets(genvs, path, sources, "path")
            if len(targets.groups) > 1:
                raise ValueError("path: the cameras have different intrinsics; the orbit renders every pose with one "
                                 "field of view: give the path one shared intrinsics")
            g_path = _genvs_targets(genvs, targets, list(range(len(targets.cameras))), render_size)
            path_cams = targets.cameras
            path_text = f"path of {len(g_path)} cameras" + (f" ({targets.box.describe()})"
                                                            if targets.box.side != targets.box.width else "")
        else:
            if not isinstance(frames, int) or frames < 1:
                raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
            world = circle_path(sources.world.poses[0], frames + 1)[1:]   # about the world's vertical axis
            g_path = _in_frame(GeNVSCameras(world, sources.world.intrinsics, sources.world.camera_k, render_size),
                               sources.transform)
            path_cams = from_genvs(world, sources.world.intrinsics, render_size, scale=genvs.scene_scale)
            _refuse_inside(genvs, g_path, "frames (circle)")
            path_text = f"circle of {frames} frames around the vertical axis (published: 200 poses)"
        model = genvs.model
        with torch.inference_mode(), genvs.autocast():
            out = autoregressive_orbit(model, sources.images01, sources.cameras, g_path, steps=steps,
                                       stochastic=bool(stochastic), cfg=float(cfg), seed=int(seed),
                                       max_cached_volumes=max_cached_volumes,
                                       max_offloaded_volumes=MAX_OFFLOADED_VOLUMES,
                                       published_train_mode=bool(published_train_mode),
                                       progress=host.progress_factory())
        images = _to_image(out["images"].float())
        size = images.shape[1]
        cams = path_cams.with_size(size, size)
        views = MultiView(images.cpu(), cams, names=[f"genvs_orbit_{i:04d}" for i in range(len(images))])
        stats = out["stats"]
        info = (f"{_crop_text(sources, None, genvs.config.image_size)}\n{len(sources.images01)} sources, {path_text}\n"
                f"{len(images)} frames of {size} px, seed {seed}, {steps} steps, "
                f"{'stochastic' if stochastic else 'deterministic'}, cfg {cfg:g}"
                + (", published train mode" if published_train_mode else "")
                + f"\nencoder calls {stats.encoded} views (the published script: "
                  f"{sum(len(sources.images01) if e == 0 else 1 for s in out['schedule'] for e in s)})"
                + _miss_text(_misses(out["opacity"].float()))
                + f"\n{genvs.device}, {time.perf_counter() - started:.1f} s")
        return {"ui": {"text": [info]}, "result": (images, cams, views, info)}


NODE_CLASS_MAPPINGS = {
    "NVSGeNVSLoader": NVSGeNVSLoader,
    "NVSGeNVSRender": NVSGeNVSRender,
    "NVSGeNVSSampler": NVSGeNVSSampler,
    "NVSGeNVSOrbit": NVSGeNVSOrbit,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NVSGeNVSLoader": "NVS GeNVS Loader",
    "NVSGeNVSRender": "NVS GeNVS Render Preview",
    "NVSGeNVSSampler": "NVS GeNVS Sampler",
    "NVSGeNVSOrbit": "NVS GeNVS Orbit",
}
