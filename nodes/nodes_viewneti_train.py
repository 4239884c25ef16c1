"""ViewNeTI training node: trains view/object mappers on the host's own SD model (nvs_core.viewneti.training).

Runs inside the prompt worker under ``torch.inference_mode(False)`` with cloned inputs, through the ComfyUI SD
adapter's differentiable path (``ComfySDBackend(differentiable=True)``: ordinary-tensor aliases of ComfyUI's
inference-mode UNet weights, no copies), so gradients reach the mappers (research/comfyui-host.md section 8).
"""
from __future__ import annotations

import math
import os
import re

import torch

from ..nvs_core.cameras import Cameras
from ..nvs_core.checkpoints import CheckpointError
from ..nvs_core.multiview import MultiView
from ..nvs_core.viewneti import training
from ..nvs_core.viewneti.loading import ViewNetiModel

from . import host
from .common import CAMERA, MULTIVIEW, check_image, clone_views, copy_atomic, float_input, int_input, seed_input
from .nodes_viewneti import DEFAULT_CALIBRATION, read_calibration

CATEGORY = "NVS/ViewNeTI"
METHOD = "viewneti"
VIEW_MAPPER = "NVS_VIEW_MAPPER"
MODES = ["0: object only (NeTI-style)", "2: view + object, fresh", "3: shared view + one object per scene",
         "4: pretrained view (trained) + object", "5: pretrained view (frozen) + object"]
DTU_SUBSETS = ["1", "3", "6", "9"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_TOKEN = re.compile(r"^<[^<>\s]+>$")


def mode_number(choice) -> int:
    text = str(choice).strip()
    number = text.split(":", 1)[0].strip()
    if not number.isdigit() or int(number) not in training.LEARNABLE_MODES:
        raise ValueError(f"learnable_mode must be one of {MODES}, got {choice!r}")
    return int(number)


def _output_name(name: str) -> str:
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"output_name: {name!r} is not a plain file name; use letters, digits, '_', '-' and '.' "
                         "(files become models/nvs/viewneti/<output_name>_view.safetensors etc.)")
    return name


def _placeholders(text: str, count: int, mode: int):
    """Object placeholders from a comma-separated list; None lets the data decide (<object> / <scan{ID}>)."""
    tokens = [t.strip() for t in str(text or "").split(",") if t.strip()]
    if not tokens:
        return None
    for token in tokens:
        if not _TOKEN.match(token) or token.startswith("<view_"):
            raise ValueError(f"object_placeholder: {token!r} must look like <name> (no spaces, not <view_...>)")
    if len(tokens) == 1 and count > 1:
        raise ValueError(f"object_placeholder: {count} scenes need {count} comma-separated placeholders "
                         "(or leave it empty for <scan{ID}>)")
    if len(tokens) != count:
        raise ValueError(f"object_placeholder: {len(tokens)} placeholders for {count} scenes")
    return tokens


def _scan_list(text: str):
    try:
        scans = [int(s) for s in str(text).replace(";", ",").split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"dtu_scans: expected scan numbers like '114' or '8, 21, 30', got {text!r}") from None
    if not scans:
        raise ValueError("dtu_scans: give at least one DTU scan number, e.g. 114")
    return scans


def _range_text(model: ViewNetiModel) -> str:
    """How the trained model normalises views (saved with the view mapper)."""
    if model.view is None:
        return "none (no view mapper)"
    calibration = model.dtu_calibration
    if model.view.camera_representation == "dtu-12d":
        if calibration is not None:
            return (f"DTU calibration {calibration.source} ({len(calibration)} cameras: DTU indices and orbits "
                    "work in NVS ViewNeTI Apply)")
        return "DTU camera range from 24 numbers (cameras in DTU scene coordinates only)"
    r = model.view_range
    return (f"spherical {model.view.camera_representation}: theta {r.theta[0]:g}..{r.theta[1]:g}, phi "
            f"{r.phi[0]:g}..{r.phi[1]:g} (connect cameras in NVS ViewNeTI Apply)")


class NVSViewNeTITrain:
    DESCRIPTION = ("Train ViewNeTI mappers on the connected SD model (published: SD 2.1 768-v), as the paper's "
                   "code does: learnable mode 0 (object mapper only, ImageNet captions), 2 (fresh view + object), "
                   "3 (shared view mapper + one object mapper per scene), 4/5 (pretrained view mapper, trained / "
                   "frozen, + a fresh object mapper; the published DTU results use mode 5). Data: images with one "
                   "camera each, an NVS_MULTIVIEW, or a DTU scan folder with subset 1/3/6/9. v/eps MSE, AdamW, "
                   "lr x batch x accumulation, kornia augmentations. Checkpoints go to ComfyUI's output folder "
                   "(nvs_viewneti_training/<output_name>/) and resume from there; the mappers are saved to "
                   "models/nvs/viewneti/<output_name>_{view,object,learned_embeds}.safetensors.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (VIEW_MAPPER, "STRING")
    RETURN_NAMES = ("view_mapper", "summary")
    OUTPUT_TOOLTIPS = ("The trained mappers (view, object(s) and the camera normalisation) for NVS ViewNeTI Apply.",
                       "Mode, steps, loss, learning rate, time and the files written.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The frozen SD UNet (published: SD 2.1 768-v, v-prediction)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder; mapper outputs are injected at the placeholder tokens."}),
            "vae": ("VAE", {"tooltip": "Its VAE: training images are encoded (posterior sample x scaling factor)."}),
            "learnable_mode": (MODES, {"default": MODES[4], "tooltip": "What is trained (upstream learnable_mode): "
                               "0 object only; 2 fresh view + object; 3 shared view + one object per scene (each "
                               "micro-batch from one scene); 4 pretrained view, trained; 5 pretrained view, frozen "
                               "(needs pretrained_view_mapper)."}),
            "steps": int_input(3000, 1, 1_000_000, "Optimizer steps (published: 3000 for modes 2/4/5; a resumed run "
                               "continues up to this)."),
            "learning_rate": float_input(0.001, 0.000001, 1.0, 0.0001, "Base learning rate (published 1e-3)."),
            "scale_lr": ("BOOLEAN", {"default": True, "tooltip": "Multiply the learning rate by batch_size x "
                         "gradient_accumulation, as published (1e-3 x 3 x 3 = 9e-3)."}),
            "batch_size": int_input(3, 1, training.MAX_BATCH, "Images per micro-batch (the published code allows "
                                    "at most 3)."),
            "gradient_accumulation": int_input(3, 1, 256, "Micro-batches per optimizer step (published 3)."),
            "augmentation": (list(training.AUGMENTATIONS), {"default": "published-7", "tooltip": "published-7: "
                             "colour jitter, blur, rotation, resized crop 0.7-1.3 (modes 2/4/5); published-5: jitter, "
                             "blur, crop 0.95-1.05 (mode-3 pretraining); none."}),
            "width": int_input(512, 8, 4096, "Training width; images are resized (published DTU: 512).", step=8),
            "height": int_input(384, 8, 4096, "Training height (published DTU: 384).", step=8),
            "seed": seed_input("Seed of the new mappers and of every step's images, augmentation, noise and t."),
            "output_name": ("STRING", {"default": "viewneti_trained", "tooltip": "Run name: checkpoints in "
                            "output/nvs_viewneti_training/<name>/, mappers in models/nvs/viewneti/<name>_*.safetensors."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue the run's last checkpoint (same recipe and "
                       "data); off starts over and overwrites it."}),
        }, "optional": {
            "images": ("IMAGE", {"tooltip": "Training images (one camera each in 'cameras'; mode 0 needs none)."}),
            "cameras": (CAMERA, {"tooltip": "One camera per image (spherical view tokens around where they look)."}),
            "multiview": (MULTIVIEW, {"tooltip": "Training views; views loaded by NVS Load DTU Scan get DTU view "
                          "tokens (give dtu_calibration), others spherical ones. Mode 3 splits it by DTU scan."}),
            "pretrained_view_mapper": (VIEW_MAPPER, {"tooltip": "View mapper modes 4/5 start from (published: "
                                       "mapper-steps-50000_view.pt via NVS ViewNeTI Loader); its camera range is kept."}),
            "dtu_folder": ("STRING", {"default": "", "tooltip": "DTU folder with Rectified/scan{ID}/ and "
                           "Calibration/cal18/ (used when set, instead of images/multiview)."}),
            "dtu_scans": ("STRING", {"default": "114", "tooltip": "DTU scan number(s); several (comma-separated) "
                          "for mode 3."}),
            "dtu_subset": (DTU_SUBSETS, {"default": "3", "tooltip": "Training views of each scan: subset 1 [25], 3 "
                           "[25, 22, 28], 6 or 9 (RegNeRF/PixelNeRF train ids)."}),
            "dtu_calibration": ("STRING", {"default": "", "tooltip": "DTU views only: the DTU SampleSet "
                                "Calibration/cal18 folder (absolute or relative to models/nvs/viewneti/, as in NVS "
                                "ViewNeTI Loader) or the 24 range numbers. Empty = automatic: "
                                "<dtu_folder>/Calibration/cal18 with dtu_folder, else models/nvs/viewneti/cal18 (the "
                                "loader's default) if it exists. The cameras and range are saved with the mappers, so "
                                "the loader needs no calibration for them."}),
            "object_placeholder": ("STRING", {"default": "", "tooltip": "Object placeholder token(s), comma-separated "
                                   "per scene; empty: <object> (one scene) or <scan{ID}> (mode 3)."}),
            "checkpoint_every": int_input(500, 0, 1_000_000, "Save a resumable checkpoint every N steps (0: at the "
                                          "end and on interruption)."),
        }}

    @staticmethod
    def make_backend(model, clip, vae):
        """The SD backend the training runs on: ComfyUI's objects through the differentiable adapter."""
        from .sd_comfy import ComfySDBackend

        return ComfySDBackend(model, clip, vae, differentiable=True)

    @staticmethod
    def _calibration(text: str, with_dtu_folder: bool):
        """(DTUCalibration or None, DTUCameraRange or None, folder path or None) from the dtu_calibration input."""
        text = (text or "").strip()
        if not text:
            if with_dtu_folder:
                return None, None, None  # <dtu_folder>/Calibration/cal18
            try:
                calibration, dtu_range, _ = read_calibration(DEFAULT_CALIBRATION)
            except ValueError:
                return None, None, None  # no default calibration installed: only needed for DTU views
            return calibration, dtu_range, calibration.source
        calibration, dtu_range, _ = read_calibration(text)
        return calibration, dtu_range, calibration.source if calibration is not None else None

    def _data(self, mode, images, cameras, multiview, dtu_folder, dtu_scans, dtu_subset, dtu_calibration,
              object_placeholder):
        """(scenes, DTU camera range or None, DTU calibration or None, description)."""
        calib, dtu_range, calibration = self._calibration(dtu_calibration, bool(dtu_folder.strip()))
        if dtu_folder.strip():
            scans = _scan_list(dtu_scans)
            if mode != 3 and len(scans) != 1:
                raise ValueError(f"dtu_scans: learnable mode {mode} trains one scan, got {scans} (mode 3 takes several)")
            tokens = _placeholders(object_placeholder, len(scans), mode)
            scenes, used = training.scenes_from_dtu(dtu_folder.strip(), scans, int(dtu_subset), calibration,
                                                    tokens, return_calibration=True)
            if mode == 0:
                scenes = [training.TrainingScene(s.images, None, s.object_token, s.name) for s in scenes]
            return scenes, dtu_range or used.camera_range(), used, f"DTU scans {scans}, subset {dtu_subset}"
        representation = "none" if mode == 0 else "auto"
        if multiview is not None:
            if not isinstance(multiview, MultiView):
                raise ValueError(f"multiview: expected an NVS_MULTIVIEW, got {type(multiview).__name__}")
            if len(multiview) == 0:
                raise ValueError("multiview: the training set is empty")
            views = clone_views(multiview)
            groups = training.scenes_from_multiview(views, representation, None, calib, split_scans=(mode == 3))
            tokens = _placeholders(object_placeholder, len(groups), mode)
            if tokens is not None:
                groups = [training.TrainingScene(s.images, s.view_tokens, t, s.name) for s, t in zip(groups, tokens)]
            return groups, dtu_range, calib, f"multiview of {len(multiview)} views"
        if images is None:
            raise ValueError("images: connect training images (with cameras), an NVS_MULTIVIEW, or set dtu_folder")
        if images.shape[0] == 0:
            raise ValueError("images: the training set is empty")
        images = check_image(images, "images").detach().clone()
        if mode != 0:
            if not isinstance(cameras, Cameras):
                raise ValueError(f"cameras: learnable mode {mode} needs one NVS_CAMERA per image (mode 0 needs none)")
            if len(cameras) != images.shape[0]:
                raise ValueError(f"images/cameras: {images.shape[0]} images but {len(cameras)} cameras; expected one "
                                 "camera per image")
        tokens = _placeholders(object_placeholder, 1, mode)
        scene = training.scene_from_images(images, cameras, "none" if mode == 0 else "spherical",
                                           (tokens or [training.DEFAULT_OBJECT_TOKEN])[0])
        return [scene], dtu_range, calib, f"{images.shape[0]} images"

    def train(self, model, clip, vae, learnable_mode, steps, learning_rate, scale_lr, batch_size,
              gradient_accumulation, augmentation, width, height, seed, output_name, resume, images=None,
              cameras=None, multiview=None, pretrained_view_mapper=None, dtu_folder="", dtu_scans="114",
              dtu_subset="3", dtu_calibration="", object_placeholder="", checkpoint_every=500):
        mode = mode_number(learnable_mode)
        name = _output_name(output_name)
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
        if str(dtu_subset) not in DTU_SUBSETS:
            raise ValueError(f"dtu_subset must be one of {DTU_SUBSETS}, got {dtu_subset!r}")
        if pretrained_view_mapper is not None and not isinstance(pretrained_view_mapper, ViewNetiModel):
            raise ValueError(f"pretrained_view_mapper: expected an NVS_VIEW_MAPPER, got "
                             f"{type(pretrained_view_mapper).__name__}")
        if mode in training.PRETRAINED_VIEW_MODES and (pretrained_view_mapper is None
                                                       or pretrained_view_mapper.view is None):
            raise ValueError(f"pretrained_view_mapper: learnable mode {mode} starts from a pretrained view mapper; "
                             "connect one (NVS ViewNeTI Loader with the published mapper-steps-50000_view.pt)")
        run_dir = os.path.join(host.output_directory(), "nvs_viewneti_training", name)
        try:
            config = training.ViewNetiTrainConfig(
                learnable_mode=mode, steps=int(steps), learning_rate=float(learning_rate), scale_lr=bool(scale_lr),
                batch_size=int(batch_size), gradient_accumulation=int(gradient_accumulation),
                augmentation=augmentation, seed=int(seed), resolution=[int(width), int(height)],
                checkpoint_every=int(checkpoint_every), name=name, out_dir=run_dir, resume=bool(resume),
                reproduce=f"ComfyUI node NVSViewNeTITrain (mode {mode})")
        except ValueError as exc:
            raise ValueError(f"NVS ViewNeTI Train: {exc}") from None
        losses = []
        with torch.inference_mode(False):
            scenes, dtu_range, calibration, source = self._data(mode, images, cameras, multiview, dtu_folder, dtu_scans,
                                                   dtu_subset, dtu_calibration, object_placeholder)
            backend = self.make_backend(model, clip, vae)
            try:
                result = training.train_viewneti(backend, scenes, config, pretrained_view_mapper, dtu_range,
                                                 progress=host.progress_factory(),
                                                 callback=lambda info: losses.append(info["loss"]),
                                                 dtu_calibration=calibration)
            except CheckpointError as exc:
                raise ValueError(f"resume: {exc}") from None

        folder = host.model_folders(METHOD)[0]
        os.makedirs(folder, exist_ok=True)
        saved = []
        for kind in ("view", "object", "learned_embeds"):
            source_path = result.files.get(kind)
            if source_path is None:
                continue
            target = os.path.join(folder, f"{name}_{kind}.safetensors")
            copy_atomic(source_path, target)
            copy_atomic(source_path.with_suffix(".json"), os.path.join(folder, f"{name}_{kind}.json"))
            saved.append(target)
        recent = result.losses[-min(len(result.losses), 50):]
        finite = [x for x in recent if math.isfinite(x)]
        loss_text = f"{sum(finite) / len(finite):.4f} (mean of the last {len(finite)} steps)" if finite else "n/a"
        view = result.model.view
        view_text = "none" if view is None else f"{view.camera_representation} ({'frozen' if mode == 5 else 'trained'})"
        summary = (f"ViewNeTI training '{name}': mode {mode}, {source}, step {result.step}/{steps} ({len(losses)} "
                   f"this run, {result.seconds:.1f} s), batch {batch_size} x {gradient_accumulation}, lr "
                   f"{result.effective_learning_rate:g}{' (scaled)' if scale_lr else ''}, {augmentation}\n"
                   f"loss {loss_text}; skipped non-finite steps: {result.skipped_steps}\n"
                   f"view mapper: {view_text}; object placeholders: {', '.join(result.model.objects)}\n"
                   f"view range: {_range_text(result.model)}\n"
                   f"files: {', '.join(saved)}\ncheckpoint: {result.files.get('state')}")
        return {"ui": {"text": [summary]}, "result": (result.model, summary)}


NODE_CLASS_MAPPINGS = {"NVSViewNeTITrain": NVSViewNeTITrain}
NODE_DISPLAY_NAME_MAPPINGS = {"NVSViewNeTITrain": "NVS ViewNeTI Train"}
