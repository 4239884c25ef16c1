"""Single-image textual inversion as RealFusion runs it (``lukemelas/realfusion:textual-inversion/textual_inversion.py``,
research Part C2), written once against the SD backend interface (diffusers headless, ComfyUI inside the host).

Recipe (defaults = the README command):
- one new token vector, initialised from a single-token ``initializer`` word, is the only thing trained
  (upstream adds a row to the embedding table and restores every other row after each step; AdamW with
  zero gradient elsewhere makes that the same as optimising the one vector, which is what we do: the
  vector is injected at the placeholder position by ``SDBackend.encode_text``);
- 27 ``imagenet_templates_small`` captions, one drawn per sample;
- noise-prediction MSE (v target for v-prediction models), t ~ U{0..999}, latents = posterior sample x
  scaling factor;
- batch 1, gradient accumulation 4, 3000 steps, lr 5e-4 scaled by batch x accumulation (= 2e-3),
  constant, AdamW betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, fp32;
- augmentations in the published order (kornia here, no torchvision): Resize(640) + CenterCrop(640);
  p=0.75 [rotation +-10 deg (nearest, white fill), CenterCrop(426), Resize(512)]; RandomResizedCrop(512,
  scale 0.85-1.15, ratio 3/4-4/3); p=0.75 ColorJitter(0.04 x 4); RandomGrayscale(0.1); p=0.1
  GaussianBlur(5, sigma 0.1-2); horizontal flip (0.5);
- **quirk** ``pixel_range="published"``: the augmented images reach the VAE in [0, 1] (upstream never
  rescales them); ``"fixed"`` rescales to [-1, 1] as the non-augmented path does. Without augmentations
  the image is resized (bicubic), flipped with p 0.5 and rescaled to [-1, 1], as published.
Upstream trains on the photo as a file (alpha dropped); ``background="white"`` composites the object on
white with its mask instead. ``choose_initializer`` is upstream's optional ``autoinit``: the candidate
noun whose CLIP text embedding is closest to the image's (needs full CLIP image+text weights).

Files: ``learned_embeds.bin`` (``{token: float32[D]}``, torch, loads with ``weights_only=True``) and a
ComfyUI embedding ``<name>.safetensors`` (``{"emb_params": [1, D]}``, the A1111 layout core ComfyUI reads for
``embedding:<name>``), with the token and recipe in its metadata. ``read_embedding`` reads both (and
``learned_embeds.bin`` files of RealFusion's examples).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .checkpoints import CheckpointError, atomic_path, load_safetensors, sniff_format
from .progress import ProgressFactory, resolve
from .sd.interface import SDBackend

PathLike = Union[str, Path]

# The 27 textual-inversion captions (RealFusion's script; ViewNeTI's mode 0 uses the same list).
IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
PIXEL_RANGES = ("published", "fixed")
BACKGROUNDS = ("photo", "white")
EMBEDDING_KEY = "emb_params"


@dataclass
class TextualInversionConfig:
    placeholder_token: str = "_object_"
    initializer_token: str = "object"
    steps: int = 3000
    learning_rate: float = 5e-4
    scale_lr: bool = True
    batch_size: int = 1
    gradient_accumulation: int = 4
    resolution: int = 512
    augmentations: bool = True
    pixel_range: str = "published"   # the [0,1]-vs-[-1,1] quirk of the augmented path
    background: str = "photo"        # photo: the image as given (published); white: composite with the mask
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    seed: int = 0
    save_every: int = 500            # learned_embeds-steps-N.bin into out_dir (0: only at the end)

    def __post_init__(self):
        if self.pixel_range not in PIXEL_RANGES:
            raise ValueError(f"pixel_range must be one of {PIXEL_RANGES}, got {self.pixel_range!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        for name in ("steps", "batch_size", "gradient_accumulation", "resolution"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not self.placeholder_token.strip() or any(c.isspace() for c in self.placeholder_token):
            raise ValueError(f"placeholder_token must be one word without spaces, got {self.placeholder_token!r}")
        if not self.initializer_token.strip() or any(c.isspace() for c in self.initializer_token.strip()):
            raise ValueError(f"initializer_token must be a single word, got {self.initializer_token!r}")

    @property
    def effective_learning_rate(self) -> float:
        scale = self.batch_size * self.gradient_accumulation if self.scale_lr else 1
        return self.learning_rate * scale

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class TextualInversionResult:
    token: str
    vector: torch.Tensor              # (D,) float32, CPU
    initializer_id: int
    step: int
    losses: List[float]
    skipped_steps: int
    seconds: float
    effective_learning_rate: float
    interrupted: bool = False
    files: Dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ augmentation

def _resize(x: torch.Tensor, size, interpolation: str = "bilinear") -> torch.Tensor:
    import kornia

    return kornia.geometry.transform.resize(x, size, interpolation=interpolation, antialias=True, side="short")


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    if top < 0 or left < 0:
        x = F.pad(x, (max(0, -left), max(0, size - w + left), max(0, -top), max(0, size - h + top)))
        top, left = max(0, top), max(0, left)
    return x[..., top:top + size, left:left + size]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand(1, generator=generator)) < p


def resized_crop_box(height: int, width: int, generator: torch.Generator, scale=(0.85, 1.15),
                     ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: 10 tries of area x U(scale) at a log-uniform aspect
    ratio that fit inside the image, else the central crop at the clamped aspect ratio (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class SingleImageAugment:
    """RealFusion's augmentation chain (module doc) on one image (3, H, W) in [0, 1] -> (3, S, S) in [0, 1].

    Every random draw comes from the caller's generator (kornia's colour jitter runs under a forked global
    RNG seeded from it), so a seed reproduces the sequence."""

    def __init__(self, size: int = 512):
        import kornia.augmentation as K

        self.size = int(size)
        self.big = int(self.size * 5 / 4)       # 640
        self.inner = int(self.size * 5 / 6)     # 426
        self.jitter = K.ColorJitter(0.04, 0.04, 0.04, 0.04, p=1.0)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import kornia

        x = image[None].float()
        x = _center_crop(_resize(x, self.big), self.big)
        if _chance(generator, 0.75):
            angle = _uniform(generator, -10.0, 10.0)
            # white fill: rotate (x - 1) with zero padding and add 1 back (nearest, as torchvision's default)
            x = kornia.geometry.transform.rotate(x - 1.0, torch.tensor([angle], device=x.device),
                                                 mode="nearest") + 1.0
            x = _resize(_center_crop(x, self.inner), self.size)
        top, left, h, w = resized_crop_box(x.shape[-2], x.shape[-1], generator)
        x = _resize(x[..., top:top + h, left:left + w], (self.size, self.size))
        if _chance(generator, 0.75):
            seed = int(torch.randint(1 << 62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.jitter(x.clamp(0, 1))
        if _chance(generator, 0.10):
            x = kornia.color.rgb_to_grayscale(x.clamp(0, 1)).expand(-1, 3, -1, -1)
        if _chance(generator, 0.10):
            sigma = _uniform(generator, 0.1, 2.0)
            x = kornia.filters.gaussian_blur2d(x, (5, 5), (sigma, sigma), border_type="reflect")
        if _chance(generator, 0.5):
            x = x.flip(-1)
        return x[0].clamp(0, 1)


def plain_resize(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The non-augmented path: bicubic resize to size x size and a horizontal flip with p 0.5, in [0, 1]."""
    x = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    if _chance(generator, 0.5):
        x = x.flip(-1)
    return x[0].clamp(0, 1)


def training_pixels(image: torch.Tensor, config: TextualInversionConfig, generator: torch.Generator,
                    augment: Optional[SingleImageAugment] = None) -> torch.Tensor:
    """One training sample (3, S, S) in the range the VAE receives (module doc, ``pixel_range``)."""
    if config.augmentations:
        x = (augment or SingleImageAugment(config.resolution))(image, generator)
        return x if config.pixel_range == "published" else x * 2 - 1
    return plain_resize(image, config.resolution, generator) * 2 - 1


def prepare_image(image: torch.Tensor, mask: Optional[torch.Tensor] = None, background: str = "photo") -> torch.Tensor:
    """(3, H, W) in [0, 1] from an image (H, W, 3|4) or (3|4, H, W); ``background="white"`` composites the
    object on white with ``mask`` (H, W) (or the image's alpha)."""
    if image.ndim != 3:
        raise ValueError(f"image: expected one image (H, W, C) or (C, H, W), got shape {tuple(image.shape)}")
    x = image.float()
    if x.shape[-1] in (3, 4) and x.shape[0] not in (3, 4):
        x = x.permute(2, 0, 1)
    if x.shape[0] not in (3, 4):
        raise ValueError(f"image: expected 3 (RGB) or 4 (RGBA) channels, got shape {tuple(image.shape)}")
    alpha = x[3] if x.shape[0] == 4 else None
    rgb = x[:3].clamp(0, 1)
    if background == "photo":
        return rgb
    if background != "white":
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if mask is None:
        mask = alpha
    if mask is None:
        raise ValueError("background 'white' needs a mask (or an image with alpha)")
    mask = mask.float().to(rgb.device)
    if tuple(mask.shape) != tuple(rgb.shape[-2:]):
        raise ValueError(f"mask: expected {tuple(rgb.shape[-2:])} pixels like the image, got {tuple(mask.shape)}")
    coverage = float(mask.mean())
    if coverage <= 0.0 or coverage >= 1.0:
        raise ValueError(f"mask: it covers {'nothing' if coverage <= 0 else 'the whole image'}; expected the "
                         "object's silhouette")
    return rgb * mask + (1 - mask)


# ------------------------------------------------------------------------------------ text

def single_token_id(backend: SDBackend, word: str) -> Tuple[int, int]:
    """(id of ``word``, end-of-text id) for a word the tokenizer keeps as one token (upstream requires it)."""
    from .viewneti.training import word_token_id

    word_id = word_token_id(backend, word)
    end_id = int(backend.tokenize([word])[0][2])
    return word_id, end_id


def caption_batch(backend: SDBackend, templates: Sequence[str], word: str, word_id: int, end_id: int):
    """Token ids of the captions with ``word`` in the placeholder slot, and one id per row that marks that
    slot uniquely (the word's id, or an id absent from the row when the template repeats the word)."""
    ids = backend.tokenize([t.format(word) for t in templates]).long()
    marks = []
    for row, template in zip(ids, templates):
        ends = (row == end_id).nonzero()
        if len(ends) == 0 or int(ends[0]) < 2:
            raise ValueError(f"caption {template.format(word)!r}: no end-of-text token; is it truncated?")
        slot = int(ends[0]) - 1  # every template ends with the placeholder
        if int(row[slot]) != word_id:
            raise ValueError(f"caption {template.format(word)!r}: the placeholder word is not the last token")
        if int((row == word_id).sum()) > 1:
            present = set(row.tolist())
            row[slot] = next(i for i in range(1, 1 << 20) if i not in present)
        marks.append(int(row[slot]))
    return ids, torch.tensor(marks)


def encode_with_vector(backend: SDBackend, ids: torch.Tensor, marks: torch.Tensor, vector: torch.Tensor):
    """The UNet context for ``ids`` with ``vector`` in the marked slot (differentiable w.r.t. ``vector``)."""
    from .viewneti.text import PlaceholderVectors

    return backend.encode_text(ids, object_vectors=PlaceholderVectors(marks, vector)).keys


def _features(value, name: str) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    value = value if isinstance(value, torch.Tensor) else getattr(value, "pooler_output", None)
    if not isinstance(value, torch.Tensor) or value.ndim != 2:
        raise ValueError(f"choose_initializer: the CLIP model gave no (batch, dim) {name} features")
    return value


def choose_initializer(image: torch.Tensor, clip_model, tokenizer, candidates: Sequence[str],
                       template: str = "a photo of a {}") -> str:
    """Upstream's ``autoinit``: the candidate noun whose CLIP text features are most similar to the image's
    (a transformers ``CLIPModel``, ViT-L/14 upstream, with its tokenizer). ``image`` (3, H, W) in [0, 1]."""
    import kornia

    if not candidates:
        raise ValueError("choose_initializer: give at least one candidate word")
    size = int(clip_model.config.vision_config.image_size)
    x = kornia.geometry.transform.resize(image[None].float(), size, interpolation="bicubic", antialias=True,
                                         side="short")
    x = _center_crop(x, size)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    x = kornia.enhance.normalize(x, mean, std)
    device = next(clip_model.parameters()).device
    with torch.no_grad():
        image_features = clip_model.get_image_features(pixel_values=x.to(device))
        ids = tokenizer([template.format(c) for c in candidates], padding="max_length", truncation=True,
                        max_length=getattr(tokenizer, "model_max_length", 77), return_tensors="pt").input_ids
        text_features = clip_model.get_text_features(input_ids=ids.to(device))
    image_features, text_features = _features(image_features, "image"), _features(text_features, "text")
    similarity = F.normalize(text_features.float(), dim=-1) @ F.normalize(image_features.float(), dim=-1).T
    return candidates[int(similarity[:, 0].argmax())]


# ------------------------------------------------------------------------------------ files

def save_learned_embeds_bin(path: PathLike, token: str, vector: torch.Tensor) -> Path:
    """``{token: float32[D]}`` with ``torch.save`` (the published ``learned_embeds.bin``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({token: vector.detach().float().cpu().clone()}, tmp)
    return path


def save_comfy_embedding(path: PathLike, token: str, vector: torch.Tensor,
                         meta: Optional[Dict[str, Any]] = None) -> Path:
    """A ComfyUI / A1111 embedding ``{"emb_params": [1, D]}`` (safetensors) with the token in the metadata;
    prompts use it as ``embedding:<file name without extension>``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"nvs_placeholder_token": token, "nvs_format": "textual_inversion"}
    if meta:
        metadata["nvs_recipe"] = json.dumps(meta, default=str)
    with atomic_path(path) as tmp:
        save_file({EMBEDDING_KEY: vector.detach().float().cpu().reshape(1, -1).contiguous()}, str(tmp), metadata)
    return path


def read_embedding(path: PathLike, expected_width: Optional[int] = None) -> Tuple[str, torch.Tensor]:
    """(token, float32 (D,)) of a one-vector embedding: a ``learned_embeds.bin`` (weights only), our
    ComfyUI ``.safetensors``, or a ``{token: vector}`` safetensors file."""
    from .viewneti.loading import load_learned_embeds

    path = Path(path)
    if sniff_format(path) == "safetensors":
        tensors, metadata = load_safetensors(path)
        if EMBEDDING_KEY in tensors:
            value = tensors[EMBEDDING_KEY]
            if value.ndim == 2 and value.shape[0] != 1:
                raise CheckpointError(path, f"{EMBEDDING_KEY} holds {value.shape[0]} vectors; expected one")
            token = metadata.get("nvs_placeholder_token") or path.stem
            embeds = {token: value.reshape(-1)}
        else:
            embeds = load_learned_embeds(path)
    else:
        embeds = load_learned_embeds(path)
    if len(embeds) != 1:
        raise CheckpointError(path, f"expected one token, found {len(embeds)}: {list(embeds)[:4]}")
    token, vector = next(iter(embeds.items()))
    if expected_width is not None and vector.numel() != expected_width:
        raise CheckpointError(path, f"embedding {token!r} has width {vector.numel()}; this text encoder expects "
                                    f"{expected_width} (SD 1.x: 768, SD 2.x: 1024)")
    return token, vector.float().reshape(-1).clone()


# ------------------------------------------------------------------------------------ training

def _text_width(backend: SDBackend) -> int:
    return int(backend.text_encoder.get_input_embeddings().weight.shape[1])


def train_textual_inversion(backend: SDBackend, image: torch.Tensor, config: Union[TextualInversionConfig, dict],
                            mask: Optional[torch.Tensor] = None, *, progress: Optional[ProgressFactory] = None,
                            callback: Optional[Callable[[Dict[str, Any]], None]] = None,
                            out_dir: Optional[PathLike] = None,
                            init_vector: Optional[torch.Tensor] = None) -> TextualInversionResult:
    """Learn one token vector for ``image`` (H, W, C) or (C, H, W) in [0, 1] (module doc).

    ``callback`` gets ``{"step", "loss", "lr"}`` after each optimizer step. The progress reporter's
    interrupt (ComfyUI's exception, or :class:`~nvs_core.progress.Interrupted`) propagates after the vector
    learned so far was saved to ``out_dir`` (``learned_embeds-interrupted.bin``), if given. Steps whose loss
    is not finite are skipped (no update) and counted.
    """
    cfg = config if isinstance(config, TextualInversionConfig) else TextualInversionConfig(**config)
    start_time = time.perf_counter()
    pixels_source = prepare_image(image, mask, cfg.background)
    encoder = backend.text_encoder
    encoder.requires_grad_(False)
    device = next(encoder.parameters()).device
    word_id, end_id = single_token_id(backend, cfg.initializer_token.strip())
    table = encoder.get_input_embeddings().weight
    width = int(table.shape[1])
    if init_vector is not None and init_vector.numel() != width:
        raise ValueError(f"init_vector: width {init_vector.numel()}, the text encoder expects {width}")
    start = (init_vector if init_vector is not None else table[word_id]).detach().float().reshape(-1)
    vector = torch.nn.Parameter(start.to(device).clone())
    lr = cfg.effective_learning_rate
    optimizer = torch.optim.AdamW([vector], lr=lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                                  eps=cfg.adam_epsilon)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    captions = random.Random(int(cfg.seed))
    augment = SingleImageAugment(cfg.resolution) if cfg.augmentations else None
    schedule = backend.schedule
    out = Path(out_dir) if out_dir is not None else None
    files: Dict[str, Path] = {}
    losses: List[float] = []
    skipped = 0
    step = 0

    def save(name: str) -> Path:
        return save_learned_embeds_bin(out / name, cfg.placeholder_token, vector.detach())

    reporter = resolve(progress, cfg.steps, "textual inversion")
    try:
        with reporter:
            for step in range(1, cfg.steps + 1):
                total = 0.0
                finite = True
                for _ in range(cfg.gradient_accumulation):
                    batch = torch.stack([training_pixels(pixels_source, cfg, generator, augment)
                                         for _ in range(cfg.batch_size)]).to(device)
                    with torch.no_grad():
                        latents = backend.encode_images(batch, sample=True, generator=generator).float()
                    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
                    timesteps = torch.randint(0, schedule.num_timesteps, (latents.shape[0],), generator=generator)
                    noisy = schedule.add_noise(latents, noise, timesteps)
                    templates = [captions.choice(IMAGENET_TEMPLATES_SMALL) for _ in range(latents.shape[0])]
                    ids, marks = caption_batch(backend, templates, cfg.initializer_token.strip(), word_id, end_id)
                    context = encode_with_vector(backend, ids.to(device), marks.to(device), vector)
                    prediction = backend.unet(noisy, timesteps.float().to(latents.device), context)
                    target = noise if backend.prediction_type == "epsilon" else schedule.velocity(latents, noise,
                                                                                                  timesteps)
                    loss = F.mse_loss(prediction.float(), target.float()) / cfg.gradient_accumulation
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                    total += float(loss.detach())
                if finite and vector.grad is not None and torch.isfinite(vector.grad).all():
                    optimizer.step()
                    losses.append(total)
                else:
                    skipped += 1
                    losses.append(float("nan"))
                optimizer.zero_grad(set_to_none=True)
                if callback is not None:
                    callback({"step": step, "loss": losses[-1], "lr": lr})
                if out is not None and cfg.save_every > 0 and step % cfg.save_every == 0:
                    files[f"steps-{step}"] = save(f"learned_embeds-steps-{step}.bin")
                reporter.update(1)
    except BaseException:
        if out is not None and losses:
            save("learned_embeds-interrupted.bin")
        raise
    result = TextualInversionResult(cfg.placeholder_token, vector.detach().float().cpu().clone(), word_id, step,
                                    losses, skipped, time.perf_counter() - start_time, lr, files=files)
    if out is not None:
        files["learned_embeds"] = save("learned_embeds.bin")
        files["config"] = out / "config.json"
        files["config"].write_text(json.dumps({**cfg.to_dict(), "effective_learning_rate": lr, "steps_done": step,
                                               "skipped_steps": skipped}, indent=2, default=str))
    return result
