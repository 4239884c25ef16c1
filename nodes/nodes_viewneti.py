"""ViewNeTI nodes: load view/object mappers, and steer a stock SD 2.1 MODEL to render chosen views.

``NVSViewNeTIApply`` returns a patched clone of the MODEL and the two CONDITIONINGs for the stock KSampler:
the cond chunk's cross-attention keys/values become ViewNeTI's per-(layer, timestep) contexts (keys from
the text with the mapper words, values with the bypass added), the uncond chunk keeps the negative
prompt, as upstream's separate unconditional pass does. Contexts are computed when sampling starts, for
that run's sigmas, within a memory budget (``nvs_core.viewneti.prompting``).
"""
from __future__ import annotations

import math
import os
import torch

from ..nvs_core.cameras import Cameras
from ..nvs_core.checkpoints import CheckpointError
from ..nvs_core.sd.interface import UNetPatches
from ..nvs_core.viewneti import prompting
from ..nvs_core.viewneti.camera_tokens import DTUCalibration
from ..nvs_core.viewneti.config import ViewNetiLoadOptions
from ..nvs_core.viewneti.loading import ViewNetiModel, load_viewneti, stored_view_data

from . import host
from .common import CAMERA, float_input, int_input

CATEGORY = "NVS/ViewNeTI"
VIEW_MAPPER = "NVS_VIEW_MAPPER"
METHOD = "viewneti"
NONE = "none"
PUBLISHED_VIEW_MAPPER = "mapper-steps-50000_view.pt"
DEFAULT_CALIBRATION = "cal18"
ALPHA_CHOICES = ["object alpha (as published)", "view alpha"]
DEFAULT_CACHE_MB = 512


def _file_key(path: str):
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


def _resolve_file(input_name: str, name: str) -> str:
    try:
        return host.model_path(METHOD, name)
    except FileNotFoundError as exc:
        raise ValueError(f"{input_name}: {exc}") from None


def _resolve_folder(text: str) -> str:
    """An absolute folder, or one relative to models/nvs/viewneti/ (any registered folder)."""
    if os.path.isabs(text):
        return text
    for root in host.model_folders(METHOD):
        candidate = os.path.join(root, text)
        if os.path.isdir(candidate):
            return candidate
    raise ValueError(f"dtu_calibration: folder {text!r} not found in {', '.join(host.model_folders(METHOD))}; put the "
                     "DTU SampleSet folder Calibration/cal18 (pos_001.txt ... pos_064.txt) there, give an absolute "
                     "path, or give the 24 range numbers")


def read_calibration(text: str):
    """(DTUCalibration or None, DTUCameraRange or None, description) from the loader's text input."""
    text = (text or "").strip()
    if not text:
        return None, None, "no DTU calibration"
    numbers = prompting.parse_calibration_numbers(text)
    if numbers is not None:
        return None, prompting.camera_range_from_numbers(numbers), "DTU camera range from 24 numbers"
    folder = _resolve_folder(text)
    try:
        calibration = DTUCalibration.from_folder(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"dtu_calibration: {exc}") from None
    return calibration, calibration.camera_range(), f"DTU calibration {calibration.source} ({len(calibration)} cameras)"


def _same_range(a, b) -> bool:
    """Two DTU camera ranges agree (to the 4-decimal precision of view tokens)."""
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-4) for x, y in ((a.mins, b.mins), (a.maxs, b.maxs)))


def describe_model(model: ViewNetiModel, names: dict, calibration_text: str) -> str:
    lines = []
    if model.view is not None:
        v = model.view
        lines.append(f"view mapper: {names.get('view')} ({v.camera_representation}, {v.word_dim}-wide words, "
                     f"target norm {v.target_norm:.4g}, bypass alpha {v.bypass_alpha:g})")
    for token, mapper in model.objects.items():
        lines.append(f"object mapper {token}: {names.get('object')} ({mapper.word_dim}-wide words, target norm "
                     f"{mapper.target_norm:.4g}, bypass alpha {mapper.bypass_alpha:g})")
    if names.get("learned_embeds"):
        lines.append(f"learned_embeds: {names['learned_embeds']} ({len(model.training_view_tokens)} training views)")
    lines.append(calibration_text)
    mode = model.cfg.get("learnable_mode") if isinstance(model.cfg, dict) else None
    if mode is not None:
        lines.append(f"trained with learnable_mode {mode}")
    return "\n".join(lines)


class NVSViewNeTILoader:
    DESCRIPTION = ("Load ViewNeTI mappers from models/nvs/viewneti/: a view mapper (published "
                   "mapper-steps-N_view.pt, e.g. the pretrained mapper-steps-50000_view.pt, or a converted "
                   ".safetensors + .json), an optional object mapper (mapper-steps-N_object.pt of a trained scene) "
                   "and optional learned_embeds (training view tokens; needed for spherical view mappers). DTU view "
                   "mappers normalise cameras with the min/max of the DTU calibration: give the DTU SampleSet folder "
                   "Calibration/cal18 (default: models/nvs/viewneti/cal18) or the 24 numbers. Mappers saved by NVS ViewNeTI "
                   "Train carry their camera range (and DTU calibration cameras), so their _view file needs neither "
                   "the calibration nor learned_embeds. Published pickles are read safely (no code from the file "
                   "runs).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (VIEW_MAPPER,)
    RETURN_NAMES = ("view_mapper",)
    OUTPUT_TOOLTIPS = ("The mappers with their camera normalisation, for NVS ViewNeTI Apply.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = host.list_model_files(METHOD)
        folder = {"nvs_model_folder": METHOD}
        return {"required": {
            "view_mapper": ([NONE] + files, {"default": PUBLISHED_VIEW_MAPPER if PUBLISHED_VIEW_MAPPER in files
                            else NONE, "tooltip": "View mapper file from models/nvs/viewneti/ (published "
                            "mapper-steps-50000_view.pt, a scene's mapper-steps-3000_view.pt, or a converted "
                            ".safetensors); 'none' only with an object mapper.", **folder}),
            "object_mapper": ([NONE] + files, {"default": NONE, "tooltip": "Object mapper file (a trained scene's "
                              "mapper-steps-N_object.pt) for the {object} field; 'none' for view control of a free "
                              "prompt.", **folder}),
            "dtu_calibration": ("STRING", {"default": DEFAULT_CALIBRATION, "tooltip": "DTU view mappers: the DTU "
                                "SampleSet folder Calibration/cal18 (pos_001.txt ... pos_064.txt), absolute or "
                                "relative to models/nvs/viewneti/; or the 24 range numbers (12 minima, then 12 "
                                "maxima of P00..P23). The folder also gives DTU cameras by index and orbit placement. "
                                "Empty: none (spherical mappers). Mappers from NVS ViewNeTI Train use the range and "
                                "cameras stored with them when this is empty or the default folder is missing."}),
        }, "optional": {
            "learned_embeds": ([NONE] + files, {"default": NONE, "tooltip": "learned_embeds-steps-N.bin of the same "
                               "run: its training view tokens set the range of spherical (theta, phi) view mappers.",
                               **folder}),
            "view_bypass_alpha": (ALPHA_CHOICES, {"default": ALPHA_CHOICES[0], "tooltip": "Which stored alpha the "
                                  "view mapper's bypass uses: the published loader gives it the object mapper's alpha "
                                  "(a bug; both are 5 in every shipped config), or its own."}),
        }}

    @classmethod
    def IS_CHANGED(cls, view_mapper, object_mapper, dtu_calibration, learned_embeds=NONE,
                   view_bypass_alpha=ALPHA_CHOICES[0]):
        stamps = []
        for name in (view_mapper, object_mapper, learned_embeds):
            try:
                stamps.append(str(_file_key(host.model_path(METHOD, name))) if name not in (None, NONE) else NONE)
            except (OSError, TypeError):
                stamps.append(f"missing {name}")
        return "|".join(stamps + [str(dtu_calibration), str(view_bypass_alpha)])

    def load(self, view_mapper, object_mapper=NONE, dtu_calibration=DEFAULT_CALIBRATION, learned_embeds=NONE,
             view_bypass_alpha=ALPHA_CHOICES[0]):
        chosen = {k: v for k, v in (("view", view_mapper), ("object", object_mapper),
                                    ("learned_embeds", learned_embeds)) if v not in (None, "", NONE)}
        if "view" not in chosen and "object" not in chosen:
            raise ValueError(f"view_mapper: choose a view mapper file from models/nvs/viewneti/ (e.g. "
                             f"{PUBLISHED_VIEW_MAPPER}), or at least an object mapper")
        if view_bypass_alpha not in ALPHA_CHOICES:
            raise ValueError(f"view_bypass_alpha must be one of {ALPHA_CHOICES}, got {view_bypass_alpha!r}")
        paths = {k: _resolve_file(f"{k}_mapper" if k != "learned_embeds" else k, v) for k, v in chosen.items()}
        missing_default = None
        try:
            calibration, camera_range, calibration_text = read_calibration(dtu_calibration)
        except ValueError as exc:
            if (dtu_calibration or "").strip() != DEFAULT_CALIBRATION:
                raise
            # the default folder is not installed: mappers trained by NVS ViewNeTI Train carry their own
            missing_default, calibration, camera_range, calibration_text = exc, None, None, "no DTU calibration"
        options = ViewNetiLoadOptions(view_alpha_from_object=view_bypass_alpha == ALPHA_CHOICES[0])
        try:
            model = load_viewneti(paths.get("view"), paths.get("object"), paths.get("learned_embeds"),
                                  calibration=camera_range, options=options)
        except CheckpointError as exc:
            message = str(exc)
            which = next((k for k, p in paths.items() if p == getattr(exc, "path", None)), "view")
            if "expected an object-mapper file" in message:
                which = "object"
            elif "expected a view-mapper file" in message:
                which = "view"
            which = f"{which}_mapper" if which != "learned_embeds" else which
            raise ValueError(f"{which}: {exc}") from None
        stored = stored_view_data(model.cfg, paths.get("view", ""))
        if model.view is not None and model.view.camera_representation == "dtu-12d":
            if camera_range is None and stored.dtu_range is None:
                if missing_default is not None:
                    raise missing_default
                raise ValueError("dtu_calibration: this DTU view mapper needs the camera range: the DTU SampleSet "
                                 "folder Calibration/cal18 (put it in models/nvs/viewneti/cal18) or the 24 range "
                                 "numbers")
            if camera_range is not None and stored.dtu_range is not None and not _same_range(stored.dtu_range, camera_range):
                raise ValueError(f"dtu_calibration: its camera range differs from the one {view_mapper} was trained "
                                 "with (stored in the file); clear dtu_calibration to use the stored one")
            if camera_range is None:
                model.view_range = stored.dtu_range
                calibration = stored.dtu_calibration
                calibration_text = (f"DTU calibration stored with the mapper ({calibration.source}, {len(calibration)} "
                                    "cameras)" if calibration is not None else
                                    "DTU camera range stored with the mapper (no calibration cameras: cameras in "
                                    "DTU scene coordinates only)")
        if model.view is not None and model.view.camera_representation != "dtu-12d":
            calibration = None
            source = "learned_embeds" if chosen.get("learned_embeds") else "stored with the mapper"
            calibration_text = f"spherical views ({model.view.camera_representation}, range {source})"
            if model.view_range is None:
                raise ValueError(f"learned_embeds: {view_mapper} is a spherical view mapper whose range is not stored "
                                 "in it; choose the learned_embeds file of the same run")
        prompting.attach_calibration(model, calibration)
        names = {"view": view_mapper, "object": object_mapper, "learned_embeds": chosen.get("learned_embeds")}
        return {"ui": {"text": [describe_model(model, names, calibration_text)]}, "result": (model,)}


class NVSViewNeTIApply:
    DESCRIPTION = ("Steer an SD 2.1 (768-v) MODEL with ViewNeTI: returns a patched copy of the MODEL and positive/"
                   "negative CONDITIONING for the stock KSampler (any sampler and scheduler). The prompt template "
                   "holds {view} (the view token) and optionally {object} (the object mapper's token), e.g. "
                   "'{view}. A photo of a {object}' (novel views of a trained scene) or '{view}. A photo of a red car' "
                   "(view control). A batch of N cameras gives N views: the latent batch must be N. Cameras are "
                   "converted to DTU projection matrices: as an orbit around the middle of the DTU rig (azimuth/"
                   "elevation 0 = the rig's central view; DTU's own cameras have a 23.5 degree vertical field of view "
                   "and 4:3 images) or as given in DTU scene coordinates. Without cameras, DTU calibration cameras are "
                   "chosen by index. Contexts (16 layers x steps text encodings) are computed when sampling starts.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    OUTPUT_TOOLTIPS = ("A patched copy of the MODEL (the input is unchanged): sample it with positive/negative below "
                       "and a latent batch of one latent per view.",
                       "The positive conditioning (its cross-attention is replaced by the view contexts at sampling).",
                       "The negative prompt, encoded as usual (upstream's unconditional pass).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 2.1 768-v model (ViewNeTI was trained on "
                                           "stabilityai/stable-diffusion-2-1)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint (OpenCLIP ViT-H, 1024-wide tokens)."}),
            "view_mapper": (VIEW_MAPPER, {"tooltip": "Mappers from NVS ViewNeTI Loader."}),
            "prompt_template": ("STRING", {"default": prompting.DEFAULT_TEMPLATE, "multiline": True,
                                "tooltip": "Prompt with {view} where the view token goes and optionally {object} "
                                "(needs an object mapper), each once; e.g. '{view}. A photo of a {object}' or "
                                "'{view}. A photo of a red car'."}),
            "negative_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Negative prompt, encoded "
                                "as usual (published: empty)."}),
            "dtu_cameras": ("STRING", {"default": "25", "tooltip": "Used when no cameras are connected: DTU camera "
                            "indices (0-based), e.g. '25' or '22, 25, 28' or '0-63'; needs the calibration folder "
                            "in the loader. One view per index; the latent batch must match."}),
        }, "optional": {
            "cameras": (CAMERA, {"tooltip": "Target cameras, one view each (the latent batch must have one latent "
                                 "per camera). Placed in the DTU scene as set by camera_placement."}),
            "camera_placement": (list(prompting.PLACEMENTS), {"default": prompting.PLACEMENTS[0], "tooltip":
                                 "'orbit around the DTU rig': cameras around the origin (e.g. NVS Orbit Cameras) go "
                                 "around the DTU scene centre, azimuth/elevation 0 = the middle of the DTU rig, "
                                 "reference_radius = the rig's distance (needs the calibration folder). 'DTU scene "
                                 "coordinates': cameras already in DTU's scene (millimetres, +Y up)."}),
            "reference_radius": float_input(2.0, 0.001, 10000.0, 0.001, "Orbit placement: this camera distance "
                                            "(scene units) is the DTU rig's mean distance; closer cameras zoom in."),
            "object_token": ("STRING", {"default": "", "tooltip": "Which object of a multi-object mapper file fills "
                             "{object} (e.g. '<scan33>'); empty = the only one."}),
            "max_extrapolation": float_input(prompting.DEFAULT_MAX_EXTRAPOLATION, 0.0, 100.0, 0.1,
                                             "How far a view may leave the training views' camera range (normalised "
                                             "to -1..1): cameras beyond +-(1 + this) are refused."),
            "context_cache_mb": int_input(DEFAULT_CACHE_MB, 16, 65536, "Memory for precomputed contexts (about 5 MB "
                                          "per step and view at SD 2.1 size in fp32); steps beyond it are computed "
                                          "when sampling reaches them."),
        }}

    def apply(self, model, clip, view_mapper, prompt_template=prompting.DEFAULT_TEMPLATE, negative_prompt="",
              dtu_cameras="25", cameras=None, camera_placement=prompting.PLACEMENTS[0], reference_radius=2.0,
              object_token="", max_extrapolation=prompting.DEFAULT_MAX_EXTRAPOLATION,
              context_cache_mb=DEFAULT_CACHE_MB):
        from . import sd_comfy

        if not isinstance(view_mapper, ViewNetiModel):
            raise ValueError(f"view_mapper: expected the NVS_VIEW_MAPPER of NVS ViewNeTI Loader, got "
                             f"{type(view_mapper).__name__}")
        if cameras is not None and not isinstance(cameras, Cameras):
            raise ValueError(f"cameras: expected NVS_CAMERA cameras, got {type(cameras).__name__}")
        for name, value in (("reference_radius", reference_radius), ("max_extrapolation", max_extrapolation)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(context_cache_mb, int) or context_cache_mb < 1:
            raise ValueError(f"context_cache_mb must be an integer >= 1, got {context_cache_mb!r}")
        vocab, width = sd_comfy.clip_token_embedding_shape(clip)
        prompting.check_word_width(view_mapper, width)
        context_dim = sd_comfy.model_context_dim(model)
        if context_dim is not None and context_dim != width:
            raise ValueError(f"clip: {width}-wide tokens, but the MODEL's cross-attention takes {context_dim}; use "
                             "the CLIP of the same checkpoint")
        planned = prompting.plan_template(view_mapper, prompt_template, object_token)
        template = planned[0]
        views = None
        if template.has("view"):
            views = prompting.view_rows(view_mapper, cameras, dtu_cameras, prompting.calibration_of(view_mapper),
                                        camera_placement, float(reference_radius), float(max_extrapolation))
        try:
            backend = sd_comfy.ComfySDBackend(model, clip, text_dtype=sd_comfy.text_dtype_for(clip))
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from None
        prompt = prompting.build_prompt(view_mapper, prompt_template, backend.tokenize, vocab, views,
                                        planned=planned)
        provider = prompting.contexts_for_prompt(backend, view_mapper, prompt,
                                                 max_cache_bytes=int(context_cache_mb) * 2 ** 20,
                                                 cache_dtype=backend.text_dtype,
                                                 on_release=backend.release_text_encoder)
        patched = backend.patched_model(UNetPatches(contexts=provider))
        positive = sd_comfy.encode_prompt(clip, prompt.template.plain_text())
        negative = sd_comfy.encode_prompt(clip, negative_prompt)
        budget = provider.steps_in_budget()
        info = (prompt.describe() + f"\ncontexts: {provider.step_bytes() / 2 ** 20:.1f} MB per step, up to {budget} "
                "steps precomputed")
        return {"ui": {"text": [info]}, "result": (patched, positive, negative)}


NODE_CLASS_MAPPINGS = {
    "NVSViewNeTILoader": NVSViewNeTILoader,
    "NVSViewNeTIApply": NVSViewNeTIApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NVSViewNeTILoader": "NVS ViewNeTI Loader",
    "NVSViewNeTIApply": "NVS ViewNeTI Apply",
}
