"""Training ViewNeTI mappers (learnable modes 0, 2, 3, 4, 5), written once against ``nvs_core.sd.SDBackend``.

It runs headless with the diffusers adapter and inside ComfyUI with ``ComfySDBackend(differentiable=True)``
(under ``torch.inference_mode(False)``, inputs cloned). Facts from ``jmhb0/view_neti`` (research A2, A6):

Modes (``RunConfig.learnable_mode``; mode 1 is "no longer used" upstream and not offered):

| mode | object mapper(s) | view mapper | caption |
|---|---|---|---|
| 0 | 1, fresh, trained | none | one of 27 ImageNet templates with the object placeholder |
| 2 | 1, fresh, trained | fresh, trained | ``"{view}. A photo of a {object}"`` |
| 3 | one per scene, fresh, trained | one shared, fresh, trained | same; every micro-batch from one scene |
| 4 | 1, fresh, trained | loaded (pretrained), trained | same |
| 5 | 1, fresh, trained | loaded, frozen | same |

Both mappers are the arch-15 ``ViewNetiMapper`` (Fourier sigmas t 0.03, l 2.0, DTU 0.5, spherical 2.0; hidden
64; word + bypass outputs, bypass alpha 5; word renormalised to the norm of the super-category word's token
embedding, "object" / "view"). Upstream's README calls mode 0 "equivalent to NeTI", but with arch 15 its object
mapper is this Fourier mapper, not NeTI's (research A10); we train what the code trains.

One optimiser step (``Coach.train``): for each of ``gradient_accumulation`` micro-batches of ``batch_size`` (<= 3)
images: augment (kornia presets below) in [0, 1], map to [-1, 1], VAE-encode with a posterior *sample* times the
scaling factor (no grad), draw eps and t uniform in 0..999 per sample, noise with the model's DDPM schedule,
run the frozen UNet with every cross-attention layer's keys/values contexts computed from the mappers at
(t, layer) (16 text-encoder passes, differentiable; ``ViewNetiContexts(cache=False)``), loss = mean-squared
error against the prediction target (v for v-prediction models such as SD 2.1-768, eps otherwise) in fp32,
backward of loss / accumulation. Then AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8, constant lr; with
``scale_lr`` the lr is multiplied by batch x accumulation as published: 1e-3 -> 9e-3). Only mapper parameters
are optimised and get gradients: UNet, VAE and text encoder are frozen (``requires_grad`` off).

Augmentations (upstream applies torchvision transforms to the PIL image after resizing; ours are kornia):
- ``published-7`` (modes 2/4/5 runs): ColorJitter(.04, .04, .04, .04) p .75; GaussianBlur(5, sigma 0.1..0.2)
  p .2; RandomRotation(10 degrees) p .75 whose border is PIL ``fill=1``, i.e. pixel value 1/255 (near black,
  reproduced); RandomResizedCrop(scale 0.70..1.3) back to the training size;
- ``published-5`` (mode-3 pretraining): ColorJitter .04 p .75; GaussianBlur(5, 0.1..0.2) p .25;
  RandomResizedCrop(scale 0.95..1.05);
- ``none``. Horizontal flips stay off, as upstream (``flip_p`` 0 for modes != 0, never set for mode 0).

Views: DTU "dtu-12d" tokens (3x4 projection numbers, normalised on the 64-camera DTU range, which must be
given) or spherical tokens ``<view_theta_phi_r>`` for any other data, normalised on the training tokens' range.
Modes 4/5 use the pretrained mapper's representation and range.

Randomness: every step draws from a generator seeded by (seed, step) (kornia's global draws are forked and
seeded from it), so a resumed run continues exactly. NaN guard: a step whose loss or gradients are not finite
is skipped (no update, reported); ``max_bad_steps`` in a row stop the run with an error.

Files in ``out_dir`` (atomic, our safetensors + JSON format): ``{name}_view``, ``{name}_object`` (mappers,
``load_viewneti`` reads them), ``{name}_learned_embeds`` (the token registry: training view tokens and object
tokens, rows = super-category embeddings, as upstream) and ``training-state`` (mappers, AdamW state, step,
losses, config) to resume from. :func:`load_trained` reads a run back as a ``ViewNetiModel``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..cameras import Cameras
from ..checkpoints import CheckpointError, load_with_config, save_with_config
from ..multiview import MultiView
from ..progress import ProgressFactory, resolve
from ..sd.interface import COND, SDBackend, UNetPatches
from ..textual_inversion import IMAGENET_TEMPLATES_SMALL
from ..training_common import state_step, tensors_under, unpack_optimizer
from .camera_tokens import (DTUCalibration, DTUCameraRange, SphericalViewRange, dtu_view_tokens_for_cameras,
                            format_spherical_view_token, is_dtu_view_token, spherical_view_from_cameras)
from .config import fourier_sigmas
from .injection import ViewNetiContexts
from .loading import (METHOD, VIEW_MAPPER_KEY, VIEW_PLACEHOLDER, ViewNetiModel, calibration_to_config,
                      load_viewneti)
from .mapper import ViewNetiMapper

PathLike = Union[str, Path]
log = logging.getLogger(__name__)

LEARNABLE_MODES = (0, 2, 3, 4, 5)
PRETRAINED_VIEW_MODES = (4, 5)
AUGMENTATIONS = ("published-7", "published-5", "none")
CAMERA_REPRESENTATIONS = ("auto", "dtu-12d", "spherical")
MAX_BATCH = 3  # upstream's RunConfig.__post_init__ refuses larger batches
VIEW_CAPTION = "{view}. A photo of a {object}"
VIEW_WORD, OBJECT_WORD = "view", "object"  # the super-category words the placeholders stand on
DEFAULT_OBJECT_TOKEN = "<object>"
STATE_FILE = "training-state.safetensors"
STATE_METHOD = "viewneti-training-state"
ROTATION_FILL = 1.0 / 255.0  # torchvision RandomRotation(fill=1) on a uint8 PIL image

# Upstream's published run config (input_configs/train.yaml, arch 15).
PUBLISHED_MODEL_CFG: Dict[str, Any] = {
    "arch_view_net": 15, "arch_mlp_hidden_dims": 64, "output_bypass_view": True, "output_bypass_object": True,
    "output_bypass_alpha_view": 5.0, "output_bypass_alpha_object": 5.0, "bypass_unconstrained_view": False,
    "bypass_unconstrained_object": False, "use_nested_dropout": False, "nested_dropout_prob": 0.5,
    "original_ti": False, "arch_view_disable_tl": False, "pe_sigma_exp_key": 2, "pe_t_exp_key": 0, "pe_l_exp_key": 0,
    "pe_sigmas": {"sigma_t": 0.03, "sigma_l": 2.0, "sigma_theta": 2.0, "sigma_phi": 2.0, "sigma_r": 2.0,
                  "sigma_dtu12": 0.5},
}


# --------------------------------------------------------------------------------------------- data

@dataclass
class TrainingScene:
    """The images of one object/scene with one view token per image (None for mode 0)."""

    images: torch.Tensor                    # (N, H, W, 3) float 0..1 (ComfyUI IMAGE layout)
    view_tokens: Optional[List[str]] = None
    object_token: str = DEFAULT_OBJECT_TOKEN
    name: str = ""

    def __post_init__(self):
        images = torch.as_tensor(self.images)
        if images.ndim != 4 or images.shape[-1] not in (3, 4) or not images.is_floating_point():
            raise ValueError(f"images: expected a float tensor [N, H, W, 3] in 0..1, got {images.dtype} "
                             f"{list(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"images: the training set{f' of {self.name}' if self.name else ''} is empty")
        self.images = images[..., :3]
        if self.view_tokens is not None:
            self.view_tokens = [str(t) for t in self.view_tokens]
            if len(self.view_tokens) != images.shape[0]:
                raise ValueError(f"{images.shape[0]} images but {len(self.view_tokens)} view tokens/cameras; "
                                 "expected one camera per image")
        if not isinstance(self.object_token, str) or not self.object_token.strip():
            raise ValueError(f"object placeholder must be a non-empty string, got {self.object_token!r}")

    def __len__(self) -> int:
        return self.images.shape[0]


def _look_at_point(cameras: Cameras) -> torch.Tensor:
    """Least-squares point closest to all optical axes; the origin for one camera or parallel axes."""
    if len(cameras) >= 2:
        forward = cameras.c2w[:, :3, 2]
        projector = torch.eye(3, dtype=torch.float64) - forward[:, :, None] * forward[:, None, :]
        system = projector.sum(0)
        if torch.linalg.cond(system) < 1e6:
            return torch.linalg.solve(system, (projector @ cameras.centers[:, :, None]).sum(0)).reshape(3)
    return torch.zeros(3, dtype=torch.float64)


def spherical_view_tokens(cameras: Cameras, target=None) -> List[str]:
    """``<view_theta_phi_r>`` tokens of cameras around ``target`` (default: where the cameras look)."""
    target = _look_at_point(cameras) if target is None else torch.as_tensor(target, dtype=torch.float64)
    params = spherical_view_from_cameras(cameras, target)
    return [format_spherical_view_token(*row) for row in params.tolist()]


def scene_from_multiview(views: MultiView, representation: str = "spherical", object_token: str = DEFAULT_OBJECT_TOKEN,
                         name: str = "", dtu_calibration: Optional[DTUCalibration] = None,
                         dtu_keys: Optional[Sequence[int]] = None, target=None) -> TrainingScene:
    """A training scene from an ``NVS_MULTIVIEW``.

    ``representation``: "spherical" (any data; tokens around ``target``, default the point the cameras look at),
    "dtu-12d" (cameras in DTU's scene frame: with ``dtu_calibration`` and ``dtu_keys`` the tokens are made from
    the calibration files' own matrices, as upstream; otherwise from the cameras), or "none" (mode 0).
    """
    if not isinstance(views, MultiView):
        raise ValueError(f"multiview: expected an NVS_MULTIVIEW, got {type(views).__name__}")
    if len(views) == 0:
        raise ValueError("multiview: the training set is empty")
    if representation == "none":
        tokens = None
    elif representation == "spherical":
        tokens = spherical_view_tokens(views.cameras, target)
    elif representation == "dtu-12d":
        if dtu_calibration is not None and dtu_keys is not None:
            keys = list(dtu_keys)
            if len(keys) != len(views):
                raise ValueError(f"{len(views)} views but {len(keys)} DTU camera keys")
            tokens = [dtu_calibration.token(k) for k in keys]
        else:
            tokens = dtu_view_tokens_for_cameras(views.cameras, dtu_keys)
    else:
        raise ValueError(f"camera representation must be 'spherical', 'dtu-12d' or 'none', got {representation!r}")
    return TrainingScene(views.images, tokens, object_token, name)


def scene_from_images(images: torch.Tensor, cameras: Optional[Cameras], representation: str = "spherical",
                      object_token: str = DEFAULT_OBJECT_TOKEN, name: str = "", **kwargs) -> TrainingScene:
    """Images (N, H, W, 3) with N cameras (cameras may be None for representation "none")."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: the training set is empty or not an image batch (shape {list(images.shape)})")
    if representation == "none":
        return TrainingScene(images, None, object_token, name)
    if cameras is None:
        raise ValueError("cameras: this learnable mode needs one camera per image")
    if len(cameras) != images.shape[0]:
        raise ValueError(f"images/cameras: {images.shape[0]} images but {len(cameras)} cameras; expected one "
                         "camera per image")
    return scene_from_multiview(MultiView(images[..., :3], cameras), representation, object_token, name, **kwargs)


def scenes_from_dtu(root: PathLike, scans: Sequence[int], subset: int = 3, calibration: Optional[PathLike] = None,
                    object_tokens: Optional[Sequence[str]] = None, size: Optional[Sequence[int]] = (512, 384),
                    light=3, return_calibration: bool = False
                    ) -> Tuple[List[TrainingScene], Union[DTUCameraRange, DTUCalibration]]:
    """DTU scans (Rectified images of ``dtu_subset`` 1/3/6/9/...) with upstream's view tokens, made from the
    calibration files' own matrices, and the 64-camera range of that calibration (``nvs_core.dtu``), or the
    calibration itself with ``return_calibration``.

    Object placeholders default to ``<object>`` for one scan and ``<scan{ID}>`` for several (mode 3)."""
    from .. import dtu

    scans = [int(s) for s in scans]
    if not scans:
        raise ValueError("dtu_scans: give at least one DTU scan number, e.g. 114")
    if object_tokens is None:
        object_tokens = [DEFAULT_OBJECT_TOKEN] if len(scans) == 1 else [f"<scan{s}>" for s in scans]
    if len(object_tokens) != len(scans):
        raise ValueError(f"{len(scans)} DTU scans but {len(object_tokens)} object placeholders")
    scenes, calib = [], None
    for scan, token in zip(scans, object_tokens):
        views = dtu.load_dtu_scan(root, scan, views=int(subset), light=light,
                                  size=None if size is None else tuple(size), calibration=calibration)
        folder = Path(calibration) if calibration is not None else dtu.default_calibration_folder(
            root, dtu.find_scan_folder(root, scan))
        if calib is None:
            calib = DTUCalibration.from_folder(folder)
        scenes.append(scene_from_multiview(views, "dtu-12d", token, f"scan{scan}", calib, dtu.dtu_camera_ids(views)))
    return scenes, (calib if return_calibration else calib.camera_range())


def scenes_from_multiview(views: MultiView, representation: str = "auto", object_tokens: Optional[Sequence[str]] = None,
                          dtu_calibration: Optional[DTUCalibration] = None, split_scans: bool = False
                          ) -> List[TrainingScene]:
    """Scenes from one ``NVS_MULTIVIEW``. "auto": DTU tokens for views named by ``load_dtu_scan`` (``scan{ID}_cam{k}``),
    spherical tokens otherwise. ``split_scans`` (mode 3): one scene per DTU scan of a concatenated multi-view."""
    from .. import dtu

    if not isinstance(views, MultiView):
        raise ValueError(f"multiview: expected an NVS_MULTIVIEW, got {type(views).__name__}")
    if len(views) == 0:
        raise ValueError("multiview: the training set is empty")
    is_dtu = views.names is not None and all(dtu._VIEW_NAME_RE.match(n) for n in views.names)
    if representation == "auto":
        representation = "dtu-12d" if is_dtu else "spherical"
    groups = [list(range(len(views)))]
    names = [""]
    if split_scans and is_dtu:
        scan_ids = dtu.dtu_scan_ids(views)
        order = list(dict.fromkeys(scan_ids))
        groups = [[i for i, s in enumerate(scan_ids) if s == scan] for scan in order]
        names = [f"scan{scan}" for scan in order]
    if object_tokens is None:
        object_tokens = [DEFAULT_OBJECT_TOKEN] if len(groups) == 1 else [f"<{n}>" for n in names]
    if len(object_tokens) != len(groups):
        raise ValueError(f"{len(groups)} scenes but {len(object_tokens)} object placeholders")
    scenes = []
    for group, token, name in zip(groups, object_tokens, names):
        part = views[group]
        keys = dtu.dtu_camera_ids(part) if representation == "dtu-12d" and is_dtu else None
        scenes.append(scene_from_multiview(part, representation, token, name, dtu_calibration if keys else None, keys))
    return scenes


# --------------------------------------------------------------------------------------- config

@dataclass
class ViewNetiTrainConfig:
    """One training run (stored with its checkpoints). Defaults are the published mode-5 DTU recipe."""

    learnable_mode: int = 5
    steps: int = 3000
    learning_rate: float = 1e-3
    scale_lr: bool = True              # published: lr x batch x accumulation (1e-3 -> 9e-3)
    batch_size: int = 3
    gradient_accumulation: int = 3
    augmentation: str = "published-7"
    seed: int = 0
    resolution: Optional[List[int]] = None  # [width, height]; None keeps the images' size (published 512x384)
    bypass_alpha: float = 5.0
    checkpoint_every: int = 1500       # upstream save_steps for modes 2/4/5
    max_bad_steps: int = 10            # consecutive non-finite steps before giving up
    name: str = "viewneti"
    out_dir: Optional[str] = None
    resume: bool = True
    reproduce: str = ""

    def __post_init__(self):
        if self.learnable_mode not in LEARNABLE_MODES:
            raise ValueError(f"learnable_mode must be one of {LEARNABLE_MODES} (mode 1 is unused upstream), "
                             f"got {self.learnable_mode!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH} (the published code refuses larger batches; use "
                             f"gradient_accumulation), got {self.batch_size!r}")
        for label, value, low in (("steps", self.steps, 0), ("gradient_accumulation", self.gradient_accumulation, 1),
                                  ("checkpoint_every", self.checkpoint_every, 0),
                                  ("max_bad_steps", self.max_bad_steps, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")
        if self.resolution is not None:
            self.resolution = [int(v) for v in self.resolution]
            if len(self.resolution) != 2 or any(v < 8 or v % 8 for v in self.resolution):
                raise ValueError(f"resolution must be [width, height], multiples of 8 (>= 8), got {self.resolution}")

    @property
    def effective_learning_rate(self) -> float:
        scale = self.batch_size * self.gradient_accumulation if self.scale_lr else 1
        return float(self.learning_rate) * scale

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ViewNetiTrainConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# Fields a resumed run must share with the saved one.
RECIPE_FIELDS = ("learnable_mode", "learning_rate", "scale_lr", "batch_size", "gradient_accumulation",
                 "augmentation", "seed", "resolution", "bypass_alpha")


@dataclass
class TrainResult:
    model: ViewNetiModel           # trained mappers (inference mode, no grad): the NVS_VIEW_MAPPER
    step: int
    losses: List[float]
    skipped_steps: int
    seconds: float
    effective_learning_rate: float
    files: Dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------------- augmentations

class Augmenter:
    """The kornia version of upstream's augmentation presets, on (B, 3, H, W) in [0, 1], output size kept."""

    def __init__(self, preset: str, height: int, width: int):
        self.preset = preset
        self.blocks: List[Tuple[str, nn.Module]] = []
        if preset == "none":
            return
        import kornia.augmentation as K

        blur_p = 0.2 if preset == "published-7" else 0.25
        self.blocks = [("color", K.ColorJitter(0.04, 0.04, 0.04, 0.04, p=0.75)),
                       ("blur", K.RandomGaussianBlur((5, 5), (0.1, 0.2), p=blur_p))]
        if preset == "published-7":
            self.blocks.append(("rotate", K.RandomRotation(10.0, p=0.75)))
            scale = (0.70, 1.3)
        else:
            scale = (0.95, 1.05)
        self.blocks.append(("crop", K.RandomResizedCrop((height, width), scale=scale, p=1.0)))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.blocks:
            return images
        seed = int(torch.randint(1 << 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):  # kornia draws from the global RNG
            torch.manual_seed(seed)
            for kind, block in self.blocks:
                if kind == "rotate":  # border value 1/255: rotate (x - c) with zero padding, add c back
                    images = block(images - ROTATION_FILL) + ROTATION_FILL
                else:
                    images = block(images)
        return images.clamp(0, 1)


def _resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, H, W, 3) -> (N, 3, height, width), bicubic with antialiasing (upstream: PIL bicubic)."""
    x = images.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


# ------------------------------------------------------------------------------------- mappers

def text_width(backend: SDBackend) -> int:
    return int(backend.text_encoder.get_input_embeddings().weight.shape[1])


def word_token_id(backend: SDBackend, word: str) -> int:
    """The id of a super-category word, which must be a single token (as upstream requires)."""
    once = backend.tokenize([word])[0].tolist()
    twice = backend.tokenize([f"{word} {word}"])[0].tolist()
    # a single-token word gives [BOS, w, EOS, ...] and [BOS, w, w, EOS, ...]
    if len(once) < 4 or twice[1] != once[1] or twice[2] != once[1] or twice[3] != once[2]:
        raise ValueError(f"the super-category word {word!r} must be a single token for this model's tokenizer")
    return int(once[1])


def caption_ids(backend: SDBackend, captions: Sequence[str]) -> torch.Tensor:
    """Token ids of captions whose placeholders were written as their super-category words."""
    return backend.tokenize(list(captions)).long()


def new_mapper(kind: str, word_dim: int, target_norm: float, bypass_alpha: float,
               camera_representation: Optional[str], generator_seed: int) -> ViewNetiMapper:
    """A fresh arch-15 mapper (PyTorch's default init drawn from ``generator_seed``)."""
    sigmas = fourier_sigmas({"model": PUBLISHED_MODEL_CFG}, camera_representation if kind == "view" else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return ViewNetiMapper(sigmas, word_dim=word_dim, hidden_dim=64, output_bypass=True,
                              target_norm=float(target_norm), bypass_alpha=float(bypass_alpha),
                              camera_representation=camera_representation if kind == "view" else None)


def _trainable_copy(mapper: nn.Module) -> nn.Module:
    """An ordinary-tensor copy (inputs inside ComfyUI are inference tensors)."""
    with torch.inference_mode(False):
        copied = copy.deepcopy(mapper)
        for tensor in list(copied.parameters()) + list(copied.buffers()):
            tensor.data = tensor.data.clone()  # buffers include the Fourier matrix
    return copied


def _freeze_backend(backend: SDBackend) -> None:
    for name in ("unet_model", "_text_encoder", "vae"):
        module = getattr(backend, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
    backend.text_encoder.requires_grad_(False)


class _CurrentContexts:
    """One provider object for the whole run (adapters cache their patched model per provider), pointing
    at the current micro-batch's ``ViewNetiContexts``."""

    def __init__(self):
        self.current: Optional[ViewNetiContexts] = None

    def contexts(self, call):
        return self.current.contexts(call)


# ---------------------------------------------------------------------------------- saving

def _view_range_of(representation: str, tokens: Sequence[str], dtu_range: Optional[DTUCameraRange],
                   pretrained: Optional[ViewNetiModel]):
    if pretrained is not None and pretrained.view_range is not None:
        return pretrained.view_range
    if representation == "dtu-12d":
        if dtu_range is None:
            raise ValueError("DTU view tokens need the DTU camera range (the 64-camera min/max): give the DTU "
                             "calibration folder (Calibration/cal18) or the 24 numbers, or use spherical cameras")
        return dtu_range
    return SphericalViewRange.from_tokens(tokens)


def _range_tokens(view_range, training_tokens: Sequence[str], pretrained: Optional[ViewNetiModel]) -> List[str]:
    """View tokens whose min/max rebuild a spherical range when ``load_viewneti`` reads learned_embeds."""
    if not isinstance(view_range, SphericalViewRange):
        return list(training_tokens)
    if pretrained is not None:
        if pretrained.training_view_tokens:
            return list(pretrained.training_view_tokens)
        return [format_spherical_view_token(view_range.theta[i], view_range.phi[i], view_range.radius[i])
                for i in (0, 1)]
    return list(dict.fromkeys(training_tokens))


def _mapper_config(mapper: ViewNetiMapper) -> Dict[str, Any]:
    return {"sigmas": list(mapper.encoder.sigmas), "word_dim": mapper.word_dim,
            "hidden_dim": mapper.net[0].out_features, "fourier_dim": mapper.encoder.dim, "fourier_seed": 0,
            "output_bypass": mapper.output_bypass, "target_norm": mapper.target_norm,
            "bypass_alpha": mapper.bypass_alpha, "bypass_unconstrained": mapper.bypass_unconstrained,
            "use_nested_dropout": mapper.use_nested_dropout, "nested_dropout_prob": mapper.nested_dropout_prob,
            "num_unet_layers": mapper.num_unet_layers, "camera_representation": mapper.camera_representation}


def save_mappers(path: PathLike, kind: str, mappers: Dict[str, ViewNetiMapper], cfg: Dict[str, Any]) -> Path:
    """Our converted format (the one ``nvs_core convert --method viewneti`` writes), read by ``load_viewneti``."""
    path = Path(path)
    tensors, entries, constructor = {}, [], None
    for i, (token, mapper) in enumerate(mappers.items()):
        config = _mapper_config(mapper)
        if constructor is not None and config != constructor:
            raise ValueError("all mappers of one file must share their constructor arguments")
        constructor = config
        prefix = f"mappers.{i}."
        tensors.update({prefix + k: v.detach().to("cpu", torch.float32) for k, v in mapper.state_dict().items()})
        tensors[prefix + "encoder.w"] = mapper.encoder.w.detach().to("cpu", torch.float32)
        entries.append({"placeholder_token": VIEW_PLACEHOLDER if kind == "view" else token,
                        "stored_key": VIEW_MAPPER_KEY if kind == "view" else i})
    save_with_config(path, tensors, {"method": METHOD, "class": "ViewNetiMapper", "constructor": constructor,
                                     "meta": {"kind": kind, "entries": entries, "cfg": cfg,
                                              "source": "nvs_core.viewneti.training"}})
    return path


def save_learned_embeds(path: PathLike, embeds: Dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    save_with_config(path, {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in embeds.items()},
                     {"method": METHOD, "class": "LearnedEmbeds",
                      "meta": {"kind": "learned_embeds", "tokens": list(embeds), "source": "nvs_core.viewneti.training"}})
    return path


def output_paths(out_dir: PathLike, name: str) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    return {"view": out_dir / f"{name}_view.safetensors", "object": out_dir / f"{name}_object.safetensors",
            "learned_embeds": out_dir / f"{name}_learned_embeds.safetensors", "state": out_dir / STATE_FILE}


def load_trained(out_dir: PathLike, name: str = "viewneti") -> ViewNetiModel:
    """A finished (or checkpointed) run as a ``ViewNetiModel``, through ``load_viewneti`` (which restores the
    view range and DTU calibration cameras stored in the view file's config)."""
    paths = output_paths(out_dir, name)
    view = paths["view"] if paths["view"].is_file() else None
    obj = paths["object"] if paths["object"].is_file() else None
    if view is None and obj is None:
        raise FileNotFoundError(f"no trained ViewNeTI mappers {paths['view'].name} / {paths['object'].name} in "
                                f"{out_dir}")
    embeds = paths["learned_embeds"] if paths["learned_embeds"].is_file() else None
    return load_viewneti(view, obj, embeds)


def _state_tensors(mappers: Dict[str, nn.Module], optimizer: torch.optim.Optimizer, step: int):
    tensors = {}
    for prefix, mapper in mappers.items():
        tensors.update({f"{prefix}.{k}": v.detach().cpu() for k, v in mapper.state_dict().items()})
    for index, entries in optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
    tensors["meta.step"] = torch.tensor(step, dtype=torch.int64)
    return tensors


# ------------------------------------------------------------------------------------ training

def _check_scenes(scenes: Sequence[TrainingScene], mode: int) -> List[TrainingScene]:
    scenes = list(scenes)
    if not scenes:
        raise ValueError("images: no training scenes given (the training set is empty)")
    if mode != 3 and len(scenes) != 1:
        raise ValueError(f"learnable mode {mode} trains one object: give one scene (mode 3 trains one object "
                         f"mapper per scene), got {len(scenes)}")
    tokens = [s.object_token for s in scenes]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"mode 3 needs a distinct object placeholder per scene, got {tokens}")
    for scene in scenes:
        if mode != 0 and scene.view_tokens is None:
            raise ValueError(f"learnable mode {mode} needs a camera per image (scene {scene.name or scene.object_token})")
    return scenes


def _representation(scenes: Sequence[TrainingScene]) -> Optional[str]:
    tokens = [t for s in scenes for t in (s.view_tokens or [])]
    if not tokens:
        return None
    dtu = [is_dtu_view_token(t) for t in tokens]
    if any(dtu) and not all(dtu):
        raise ValueError("view tokens mix DTU and spherical cameras; use one camera representation")
    return "dtu-12d" if dtu[0] else "spherical"


def _recipe(config: ViewNetiTrainConfig, scenes: Sequence[TrainingScene]) -> Dict[str, Any]:
    saved = {k: config.to_dict()[k] for k in RECIPE_FIELDS}
    saved["scenes"] = [{"object_token": s.object_token, "images": len(s), "size": list(s.images.shape[1:3]),
                        "view_tokens": s.view_tokens} for s in scenes]
    return json.loads(json.dumps(saved))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (1 << 63))


def train_viewneti(backend: SDBackend, scenes: Sequence[TrainingScene], config: Union[ViewNetiTrainConfig, dict],
                   pretrained: Optional[ViewNetiModel] = None, dtu_camera_range: Optional[DTUCameraRange] = None,
                   progress: Optional[ProgressFactory] = None,
                   callback: Optional[Callable[[Dict[str, Any]], None]] = None,
                   dtu_calibration: Optional[DTUCalibration] = None) -> TrainResult:
    """Train (or resume) ViewNeTI mappers on ``scenes``; see the module docstring.

    ``pretrained``: a ``ViewNetiModel`` whose view mapper modes 4/5 start from (required there).
    ``dtu_camera_range``: the DTU normalisation for fresh view mappers on DTU tokens (modes 2/3).
    ``progress`` counts optimiser steps and stops on interrupt (a checkpoint is written first when ``out_dir``
    is set). ``callback`` gets {step, loss, lr, skipped, seconds} after every step.
    ``dtu_calibration``: the DTU calibration cameras of DTU data (default: the pretrained model's); they are
    stored in the view file and kept with the returned model, so DTU camera indices and orbits work on it.
    The view range (DTU numbers or spherical tokens) is stored too: the view file alone loads back complete.
    """
    config = ViewNetiTrainConfig.from_dict(config) if isinstance(config, dict) else config
    if torch.is_inference_mode_enabled():
        raise RuntimeError("ViewNeTI training needs autograd: call it under torch.inference_mode(False)")
    mode = config.learnable_mode
    scenes = _check_scenes(scenes, mode)
    word_dim = text_width(backend)
    if mode in PRETRAINED_VIEW_MODES:
        if pretrained is None or getattr(pretrained, "view", None) is None:
            raise ValueError(f"pretrained_view_mapper: learnable mode {mode} starts from a pretrained view mapper "
                             "(published: mapper-steps-50000_view.pt); connect an NVS_VIEW_MAPPER that has one")
    elif pretrained is not None:
        log.info("learnable mode %d trains a fresh view mapper: the pretrained one is not used", mode)
        pretrained = None
    if pretrained is not None and pretrained.view.word_dim != word_dim:
        raise ValueError(f"pretrained_view_mapper: its word vectors are {pretrained.view.word_dim} wide but the "
                         f"model's text encoder is {word_dim} wide (a mapper for another SD version, e.g. 768 for "
                         "SD 1.x, 1024 for SD 2.x)")

    _freeze_backend(backend)
    device = next(backend.text_encoder.parameters()).device
    representation = _representation(scenes) if mode != 0 else None
    view_mapper: Optional[ViewNetiMapper] = None
    view_range = None
    all_tokens = [t for s in scenes for t in (s.view_tokens or [])]
    view_id = object_id = None
    object_id = word_token_id(backend, OBJECT_WORD)
    embedding = backend.text_encoder.get_input_embeddings().weight
    object_norm = float(embedding[object_id].detach().float().norm())
    if mode != 0:
        view_id = word_token_id(backend, VIEW_WORD)
        if pretrained is not None:
            expected = pretrained.view.camera_representation
            if (expected == "dtu-12d") != (representation == "dtu-12d"):
                raise ValueError(f"pretrained_view_mapper: it takes {expected!r} cameras but the training views are "
                                 f"{representation!r}; give cameras in its representation")
            view_range = _view_range_of(representation, all_tokens, dtu_camera_range, pretrained)
            if isinstance(view_range, SphericalViewRange) and view_range.degrees_of_freedom != expected:
                raise ValueError(f"pretrained_view_mapper takes {expected!r} views, its range gives "
                                 f"{view_range.degrees_of_freedom!r}")
            view_mapper = _trainable_copy(pretrained.view).to(device)
        else:
            view_range = _view_range_of(representation, all_tokens, dtu_camera_range, None)
            mapper_repr = "dtu-12d" if representation == "dtu-12d" else view_range.degrees_of_freedom
            view_norm = float(embedding[view_id].detach().float().norm())
            view_mapper = new_mapper("view", word_dim, view_norm, config.bypass_alpha, mapper_repr,
                                     config.seed).to(device)
    objects = {s.object_token: new_mapper("object", word_dim, object_norm, config.bypass_alpha, None,
                                          config.seed + 1 + i).to(device)
               for i, s in enumerate(scenes)}

    trained: Dict[str, nn.Module] = {}
    if view_mapper is not None:
        view_mapper.train(mode != 5).requires_grad_(mode != 5)
        if mode != 5:
            trained["view"] = view_mapper
    for i, mapper in enumerate(objects.values()):
        mapper.train(True).requires_grad_(True)
        trained[f"object.{i}"] = mapper
    parameters = [p for m in trained.values() for p in m.parameters()]
    lr = config.effective_learning_rate
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    # data, prepared once: resized images and normalised camera numbers per scene
    height, width = (config.resolution[1], config.resolution[0]) if config.resolution else scenes[0].images.shape[1:3]
    if height % 8 or width % 8:
        raise ValueError(f"images are {width}x{height}: the VAE needs multiples of 8; set a resolution")
    pixels = [_resize(s.images.detach().float().cpu(), width, height) for s in scenes]
    view_inputs = [None] * len(scenes)
    if view_mapper is not None:
        holder = ViewNetiModel(view_mapper, {}, {}, view_range)
        view_inputs = [holder.view_inputs(s.view_tokens) for s in scenes]
    augment = Augmenter(config.augmentation, height, width)
    captions_fixed = VIEW_CAPTION.format(view=VIEW_WORD, object=OBJECT_WORD)
    fixed_ids = caption_ids(backend, [captions_fixed])[0] if mode != 0 else None
    template_ids = caption_ids(backend, [t.format(OBJECT_WORD) for t in IMAGENET_TEMPLATES_SMALL]) if mode == 0 else None

    # bookkeeping
    out_dir = Path(config.out_dir) if config.out_dir else None
    paths = output_paths(out_dir, config.name) if out_dir else {}
    model_cfg = dict(PUBLISHED_MODEL_CFG, word_embedding_dim=word_dim, target_norm_object=object_norm,
                     output_bypass_alpha_view=float(view_mapper.bypass_alpha if view_mapper else config.bypass_alpha),
                     output_bypass_alpha_object=float(config.bypass_alpha))
    if view_mapper is not None:
        model_cfg["target_norm_view"] = view_mapper.target_norm
    data_cfg: Dict[str, Any] = {"camera_representation": "dtu-12d" if representation == "dtu-12d" else "spherical",
                                "placeholder_object_tokens": list(objects), "training_view_tokens": all_tokens,
                                "augmentation": config.augmentation, "resolution": [width, height]}
    if dtu_calibration is None and pretrained is not None:
        dtu_calibration = getattr(pretrained, "dtu_calibration", None)
    if not isinstance(view_range, DTUCameraRange):
        dtu_calibration = None
    range_tokens = _range_tokens(view_range, all_tokens, pretrained) if view_mapper is not None else []
    if isinstance(view_range, DTUCameraRange):
        data_cfg["dtu_camera_range"] = view_range.to_numbers()
        if dtu_calibration is not None:
            data_cfg["dtu_calibration"] = calibration_to_config(dtu_calibration)
    elif isinstance(view_range, SphericalViewRange):
        data_cfg["view_range_tokens"] = range_tokens
    run_cfg = {"learnable_mode": mode, "model": model_cfg, "data": data_cfg,
               "optim": {"learning_rate": config.learning_rate, "scale_lr": config.scale_lr, "effective_lr": lr,
                         "train_batch_size": config.batch_size,
                         "gradient_accumulation_steps": config.gradient_accumulation},
               "nvs_training": config.to_dict()}
    recipe = _recipe(config, scenes)
    step, losses, skipped, bad_run = 0, [], 0, 0
    state_mappers = dict(trained, **({"view": view_mapper} if view_mapper is not None else {}))
    if config.resume and out_dir is not None and paths["state"].is_file():
        step, losses, skipped = _load_state(paths["state"], state_mappers, optimizer, recipe)

    embeds = {}
    if view_mapper is not None:
        for token in range_tokens:
            embeds[token] = embedding[view_id].detach().float().cpu()
    for token in objects:
        embeds[token] = embedding[object_id].detach().float().cpu()

    def checkpoint() -> None:
        if out_dir is None:
            return
        meta = {"step": step, "losses": [float(x) for x in losses], "skipped_steps": skipped, "recipe": recipe,
                "training": config.to_dict(), "param_groups": _param_groups(optimizer),
                "rng": {"scheme": "torch.Generator per step seeded from (seed, step)", "seed": config.seed},
                "torch": torch.__version__}
        save_with_config(paths["state"], _state_tensors(state_mappers, optimizer, step),
                         {"method": STATE_METHOD, "class": "ViewNetiMapper", "meta": meta})
        cfg = dict(run_cfg, step=step)
        if view_mapper is not None:
            save_mappers(paths["view"], "view", {"view": view_mapper}, cfg)
        save_mappers(paths["object"], "object", objects, cfg)
        save_learned_embeds(paths["learned_embeds"], embeds)

    patches = UNetPatches(contexts=_CurrentContexts())
    schedule = backend.schedule
    desc = f"ViewNeTI training (mode {mode})"
    start_time = time.perf_counter()
    bar = resolve(progress, config.steps, desc)
    saved_step = step
    try:
        bar.done = step
        bar.check()
        with torch.enable_grad():
            while step < config.steps:
                generator = step_generator(config.seed, step)
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for _ in range(config.gradient_accumulation):
                    s = int(torch.randint(len(scenes), (1,), generator=generator))  # mode 3: any scene
                    loss = _micro_batch(backend, patches, schedule, config, mode, scenes[s], pixels[s],
                                        view_inputs[s], view_mapper, view_id, objects[scenes[s].object_token],
                                        object_id, fixed_ids, template_ids, augment, generator, device)
                    (loss / config.gradient_accumulation).backward()
                    step_loss += float(loss.detach()) / config.gradient_accumulation
                finite = math.isfinite(step_loss) and all(
                    p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)
                if finite:
                    optimizer.step()
                    bad_run = 0
                else:
                    skipped += 1
                    bad_run += 1
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("ViewNeTI training step %d: non-finite loss or gradients, step skipped", step + 1)
                    if bad_run >= config.max_bad_steps:
                        raise FloatingPointError(f"ViewNeTI training diverged: {bad_run} steps in a row with "
                                                 f"non-finite loss or gradients (step {step + 1}); lower the "
                                                 f"learning rate (effective {lr:g})")
                step += 1
                losses.append(step_loss)
                if callback is not None:
                    callback({"step": step, "loss": step_loss, "lr": lr, "skipped": skipped,
                              "seconds": time.perf_counter() - start_time})
                if out_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                    checkpoint()
                    saved_step = step
                bar.desc = f"{desc} (loss {step_loss:.4f})"
                set_postfix = getattr(bar, "set_postfix", None)
                if set_postfix is not None:
                    set_postfix(step_loss)
                try:
                    bar.update()
                except BaseException:
                    if step != saved_step:
                        checkpoint()  # interrupted: resume from the last finished step
                    raise
    finally:
        patches.contexts.current = None
        bar.close()
    checkpoint()

    files = {k: v for k, v in paths.items() if v.is_file()}
    final_view = None
    if view_mapper is not None:
        final_view = _trainable_copy(view_mapper).train(False).requires_grad_(False)
    final_objects = {k: _trainable_copy(m).train(False).requires_grad_(False) for k, m in objects.items()}
    model = ViewNetiModel(final_view, final_objects, dict(run_cfg, step=step), view_range,
                          [t for t in embeds if t.startswith("<view_")], dtu_calibration)
    return TrainResult(model, step, losses, skipped, time.perf_counter() - start_time, lr, files)


def _micro_batch(backend, patches, schedule, config, mode, scene, pixels, view_inputs, view_mapper, view_id,
                 object_mapper, object_id, fixed_ids, template_ids, augment, generator, device):
    """The loss of one micro-batch of ``batch_size`` images of one scene."""
    batch = config.batch_size
    index = torch.randint(len(scene), (batch,), generator=generator)
    images = augment(pixels[index], generator) * 2 - 1
    with torch.no_grad():
        x0 = backend.encode_images(images.to(device), sample=True, generator=generator).float()
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    timesteps = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator)
    if mode == 0:
        ids = template_ids[torch.randint(len(template_ids), (batch,), generator=generator)]
    else:
        ids = fixed_ids[None].expand(batch, -1)
    noisy = schedule.add_noise(x0, noise, timesteps)
    target = schedule.velocity(x0, noise, timesteps) if backend.prediction_type == "v_prediction" else noise
    provider = ViewNetiContexts(
        backend, ids, view_mapper=view_mapper, view_token_ids=view_id if view_mapper is not None else None,
        view_params=None if view_inputs is None else view_inputs[index], object_mapper=object_mapper,
        object_token_id=object_id, cache=False)
    patches.contexts.current = provider
    width = text_width(backend)
    context = torch.zeros(batch, ids.shape[1], width, device=x0.device)  # replaced in every layer
    prediction = backend.unet(noisy, timesteps.float().to(x0.device), context, (COND,), patches)
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def _param_groups(optimizer):
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
            for g in optimizer.state_dict()["param_groups"]]


def _load_state(path: Path, mappers: Dict[str, nn.Module], optimizer, recipe) -> Tuple[int, List[float], int]:
    tensors, cfg = load_with_config(path)
    if cfg.get("method") != STATE_METHOD:
        raise CheckpointError(path, f"expected a ViewNeTI training state (method {STATE_METHOD!r}), got "
                                    f"{cfg.get('method')!r}")
    meta = cfg.get("meta") or {}
    saved = meta.get("recipe") or {}
    changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
    if changed:
        raise CheckpointError(path, f"resuming with a different recipe or data ({', '.join(changed)}); start a new "
                                    "run (another name/output folder) or turn resume off")
    step = state_step(path, tensors, meta)
    for prefix, mapper in mappers.items():
        part = tensors_under(tensors, prefix + ".")
        try:
            mapper.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise CheckpointError(path, f"mapper {prefix!r} does not match this run ({str(e).splitlines()[0]})") from None
    unpack_optimizer(optimizer, tensors, meta["param_groups"])
    return step, [float(x) for x in meta.get("losses", [])], int(meta.get("skipped_steps", 0))


# --------------------------------------------------------------------------------- command line

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``viewneti-train`` (``python -m nvs_core viewneti-train``)."""
    parser = subparsers.add_parser(
        "viewneti-train", help="train ViewNeTI mappers (learnable modes 0, 2, 3, 4, 5) on an SD model",
        description="Train or resume ViewNeTI view/object mappers with a frozen Stable Diffusion model "
                    "(diffusers folder, or a single-file checkpoint with --config and --tokenizer). Writes "
                    "<name>_view/_object/_learned_embeds .safetensors (+ .json) and a resumable training state.")
    parser.add_argument("--sd", required=True, help="SD model: a diffusers folder or a single-file .safetensors")
    parser.add_argument("--config", default="sd21", help="config for a single-file checkpoint: sd15, sd21, "
                                                         "sd21-base or a diffusers folder")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for a single-file checkpoint")
    parser.add_argument("--folder", action="append", default=[],
                        help="multi-view folder (images + cameras.json/transforms.json); repeat for mode 3")
    parser.add_argument("--object-token", action="append", default=[],
                        help="object placeholder per folder (default <object>, mode 3: <scene0>, <scene1>, ...)")
    parser.add_argument("--dtu-root", default=None,
                        help="DTU folder with Rectified/scan{ID}/ and Calibration/cal18/ (instead of --folder)")
    parser.add_argument("--dtu-scan", type=int, action="append", default=[],
                        help="DTU scan number (repeat for mode 3), e.g. 114")
    parser.add_argument("--dtu-subset", type=int, choices=(1, 3, 6, 9), default=3, help="training views per scan")
    parser.add_argument("--representation", choices=("spherical", "dtu-12d"), default="spherical",
                        help="camera tokens for the folders' cameras")
    parser.add_argument("--calibration", default=None,
                        help="DTU Calibration/cal18 folder (the view range for dtu-12d tokens)")
    parser.add_argument("--pretrained-view", default=None, help="view mapper file for modes 4/5 (.pt or ours)")
    parser.add_argument("--pretrained-embeds", default=None, help="its learned_embeds (spherical mappers)")
    d = ViewNetiTrainConfig()
    parser.add_argument("--mode", type=int, choices=LEARNABLE_MODES, default=d.learnable_mode)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="base learning rate")
    parser.add_argument("--no-scale-lr", action="store_true",
                        help="use --lr as is (published: lr x batch x accumulation)")
    parser.add_argument("--batch", type=int, default=d.batch_size, help=f"images per micro-batch (<= {MAX_BATCH})")
    parser.add_argument("--accumulation", type=int, default=d.gradient_accumulation)
    parser.add_argument("--augmentation", choices=AUGMENTATIONS, default=d.augmentation)
    parser.add_argument("--width", type=int, default=None, help="training width (published DTU: 512)")
    parser.add_argument("--height", type=int, default=None, help="training height (published DTU: 384)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default=d.name, help="file name prefix of the trained mappers")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.set_defaults(func=run_cli)
    return parser


def _load_backend(args):
    from ..sd.diffusers_backend import load_diffusers_folder, load_single_file

    path = Path(args.sd)
    if path.is_dir():
        return load_diffusers_folder(path, device=args.device)
    return load_single_file(path, args.config, device=args.device, tokenizer_folder=args.tokenizer)


def run_cli(args: argparse.Namespace) -> int:
    from ..multiview import load_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.folder and not args.dtu_root:
        raise SystemExit("viewneti-train: give --folder (images + cameras) or --dtu-root with --dtu-scan")
    representation = "none" if args.mode == 0 else args.representation
    tokens = list(args.object_token)
    calibration = DTUCalibration.from_folder(args.calibration) if args.calibration else None
    scenes = []
    if args.dtu_root:
        scenes, calibration = scenes_from_dtu(args.dtu_root, args.dtu_scan, args.dtu_subset, args.calibration,
                                              tokens or None, return_calibration=True)
    dtu_range = calibration.camera_range() if calibration is not None else None
    for i, folder in enumerate(args.folder):
        token = tokens[i] if i < len(tokens) else (f"<scene{i}>" if args.mode == 3 else DEFAULT_OBJECT_TOKEN)
        scenes.append(scene_from_multiview(load_folder(folder), representation, token, name=Path(folder).name))
    if args.mode == 0:
        scenes = [TrainingScene(s.images, None, s.object_token, s.name) for s in scenes]
    pretrained = None
    if args.pretrained_view:
        pretrained = load_viewneti(args.pretrained_view, learned_embeds=args.pretrained_embeds,
                                   calibration=args.calibration or (dtu_range.to_numbers() if dtu_range else None))
    resolution = [args.width, args.height] if args.width and args.height else None
    config = ViewNetiTrainConfig(learnable_mode=args.mode, steps=args.steps, learning_rate=args.lr,
                                 scale_lr=not args.no_scale_lr, batch_size=args.batch,
                                 gradient_accumulation=args.accumulation, augmentation=args.augmentation,
                                 seed=args.seed, resolution=resolution, checkpoint_every=args.checkpoint_every,
                                 name=args.name, out_dir=args.out, resume=not args.no_resume,
                                 reproduce=" ".join(sys.argv))
    backend = _load_backend(args)
    from ..training_common import LossProgress  # console bar with the loss and a log line every N steps

    result = train_viewneti(backend, scenes, config, pretrained, dtu_range,
                            progress=lambda total, desc: LossProgress(total, desc, log_every=50),
                            dtu_calibration=calibration)
    tail = result.losses[-50:]
    print(json.dumps({"steps": result.step, "seconds": round(result.seconds, 1),
                      "loss_last50": round(sum(tail) / max(len(tail), 1), 5), "skipped_steps": result.skipped_steps,
                      "effective_lr": result.effective_learning_rate,
                      "files": {k: str(v) for k, v in result.files.items()}}))
    return 0
