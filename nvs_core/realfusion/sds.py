"""Score distillation (SDS) through the SD backend seam (``sd/sd.py:StableDiffusion.train_step``).

One SDS step, as published (research Part C6):

1. the synthetic render [B, 3, h, w] in 0..1 is bilinearly resized to ``resolution`` (512) and mapped
   to [-1, 1];
2. the frozen VAE encodes it *with gradient* (``posterior.sample() * 0.18215``);
3. ``t ~ randint[20, 980]`` (uniform, not annealed), ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``
   with the model's own ``alphas_cumprod`` (SD 1.5: scaled_linear 0.00085..0.012);
4. classifier-free guidance at scale 100 (one batched UNet call [uncond, cond], no gradient);
5. ``grad = lambda (1 - abar_t) (eps_hat - eps)``, then ``nan_to_num`` (NaN -> 0, +-inf -> +-float32 max);
6. the gradient is injected at the latents (``latents.backward(gradient=grad)``); here
   :attr:`SDSStep.surrogate` = ``sum(latents * grad)`` has exactly that gradient, so the training loop
   can add it to its other losses and run one backward.

Non-finite entries of the raw gradient are counted (:attr:`SDSStep.nonfinite`) before ``nan_to_num``
so that a run can report them instead of silently training on zeros.

Text: :class:`TextConditioning` holds the uncond context and one cond context per direction label
(front, side, back, side, overhead, bottom). :func:`encode_direction_prompts` builds it with the backend's
tokenizer and text encoder; a learned token (textual inversion) is injected as a word vector. Inside
ComfyUI the node builds the same object from core CLIP encodings (``embedding:<name>`` handled by ComfyUI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .cameras import DIRECTIONS, direction_prompts
from .losses import SDS_T_RANGE

SD15_CONTEXT_DIM = 768


@dataclass
class SDSConfig:
    guidance_scale: float = 100.0
    t_range: Tuple[int, int] = SDS_T_RANGE   # inclusive: int(1000 * 0.02) .. int(1000 * 0.98)
    resolution: int = 512                    # the render is resized to this before the VAE
    sample_posterior: bool = True            # posterior.sample() (published) or its mean


@dataclass
class TextConditioning:
    """Uncond context [1, T, D] and direction-conditioned contexts [6, T, D] (labels of ``DIRECTIONS``)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    prompt: str = ""

    def __post_init__(self):
        if self.cond.ndim != 3 or self.cond.shape[0] != len(DIRECTIONS):
            raise ValueError(f"direction contexts must be [{len(DIRECTIONS)}, tokens, width], got "
                             f"{tuple(self.cond.shape)}")
        if self.uncond.ndim == 2:
            self.uncond = self.uncond[None]
        if self.uncond.ndim != 3 or self.uncond.shape[-1] != self.cond.shape[-1]:
            raise ValueError(f"uncond context {tuple(self.uncond.shape)} does not match the cond width "
                             f"{self.cond.shape[-1]}")

    @property
    def width(self) -> int:
        return int(self.cond.shape[-1])

    def for_direction(self, label: int) -> torch.Tensor:
        return self.cond[int(label)][None]

    def to(self, device=None, dtype=None) -> "TextConditioning":
        return TextConditioning(self.cond.to(device=device, dtype=dtype), self.uncond.to(device=device, dtype=dtype),
                                self.prompt)


def _placeholder_id(backend, token: str) -> int:
    """The id of a learned token: added to a real tokenizer, else the tokenizer's single id for it."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "add_tokens") and hasattr(backend, "add_placeholder_tokens"):
        return int(backend.add_placeholder_tokens([token])[0])
    ids, empty = backend.tokenize([token, ""])
    eos = int(empty[1])
    inner = []
    for i in ids[1:].tolist():
        if i == eos:
            break
        inner.append(int(i))
    if len(inner) != 1:
        raise ValueError(f"the learned token {token!r} is {len(inner)} tokens for this tokenizer; expected one")
    return inner[0]


@torch.no_grad()
def encode_prompts(backend, prompts: Sequence[str], learned: Optional[Mapping[str, torch.Tensor]] = None
                   ) -> torch.Tensor:
    """Contexts [B, T, D] of ``prompts`` through the backend's text encoder; ``learned`` maps a token
    string (e.g. ``"<cat>"``) to its word vector [D], injected where the token occurs (once per prompt)."""
    from ..viewneti.text import PlaceholderVectors

    ids = backend.tokenize(list(prompts))
    vectors = None
    for token, vector in (learned or {}).items():
        if vectors is not None:
            raise ValueError("one learned token per prompt is supported")
        if not any(token in p for p in prompts):
            continue
        width = backend.text_encoder.get_input_embeddings().weight.shape[1]
        if vector.reshape(-1).numel() != width:
            raise ValueError(f"learned token {token!r} has {vector.reshape(-1).numel()} values; this text encoder "
                             f"expects {width}")
        vectors = PlaceholderVectors(_placeholder_id(backend, token), vector.reshape(-1))
        ids = backend.tokenize(list(prompts))
    return backend.encode_text(ids, object_vectors=vectors).keys.float()


def encode_direction_prompts(backend, text: str, learned: Optional[Mapping[str, torch.Tensor]] = None,
                             negative: str = "") -> TextConditioning:
    """The published text embeddings: ``"{text}, {direction} view"`` for the six labels, negative ``""``."""
    cond = encode_prompts(backend, direction_prompts(text), learned)
    uncond = encode_prompts(backend, [negative])
    return TextConditioning(cond, uncond, text)


def check_sd15_backend(backend) -> None:
    """Refuse backends that are not SD 1.x shaped (epsilon prediction, 768-wide text context)."""
    found = []
    width = None
    unet = getattr(backend, "unet_model", None)
    if unet is not None:
        width = getattr(unet.config, "cross_attention_dim", None)
    if width is not None and int(width) != SD15_CONTEXT_DIM:
        found.append(f"a {width}-wide text context")
    if getattr(backend, "prediction_type", "epsilon") != "epsilon":
        found.append(f"{backend.prediction_type} prediction")
    if found:
        raise ValueError(f"RealFusion's SDS expects Stable Diffusion 1.5 (epsilon prediction, 768-wide CLIP text "
                         f"context); found {' and '.join(found)}")


@dataclass
class SDSStep:
    surrogate: torch.Tensor     # sum(latents * grad): its backward injects grad at the latents
    latents: torch.Tensor       # [B, 4, h, w], attached to the render
    grad: torch.Tensor          # after nan_to_num
    t: int
    nonfinite: int              # non-finite entries of the raw gradient (before nan_to_num)
    loss: float                 # mean |grad| (the published detached "loss")


class SDSGuidance:
    """SDS against any :class:`nvs_core.sd.interface.SDBackend` (diffusers or ComfyUI)."""

    def __init__(self, backend, text: TextConditioning, config: Optional[SDSConfig] = None,
                 device: Optional[torch.device] = None):
        self.backend = backend
        self.config = config or SDSConfig()
        lo, hi = self.config.t_range
        if not 0 <= lo <= hi < backend.schedule.num_timesteps:
            raise ValueError(f"t_range {self.config.t_range} outside the model's 0..{backend.schedule.num_timesteps - 1}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.alphas_cumprod = backend.schedule.alphas_cumprod.to(torch.float32).to(self.device)
        self.text = text.to(self.device, torch.float32)

    def encode(self, rgb: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Latents (with gradient) of a render [B, 3, h, w] in 0..1."""
        size = int(self.config.resolution)
        x = rgb if rgb.shape[-2:] == (size, size) else F.interpolate(rgb, (size, size), mode="bilinear",
                                                                     align_corners=False)
        return self.backend.encode_images(2 * x - 1, sample=self.config.sample_posterior, generator=generator).float()

    def sample_t(self, generator: Optional[torch.Generator] = None) -> int:
        lo, hi = self.config.t_range
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def gradient(self, latents: torch.Tensor, context: torch.Tensor, t: int, noise: torch.Tensor,
                 lambda_grad: float = 1.0) -> Tuple[torch.Tensor, int]:
        """(nan_to_num'd gradient at the latents, count of non-finite raw entries)."""
        abar = self.alphas_cumprod[t]
        with torch.no_grad():
            z = latents.detach()
            noisy = abar.sqrt() * z + (1 - abar).sqrt() * noise
            uncond = self.text.uncond.expand(z.shape[0], -1, -1)
            eps = self.backend.predict_noise(noisy, torch.full((z.shape[0],), float(t), device=z.device),
                                             context.expand(z.shape[0], -1, -1), uncond,
                                             self.config.guidance_scale).float()
            raw = lambda_grad * (1 - abar) * (eps - noise)
            nonfinite = int((~torch.isfinite(raw)).sum())
            return torch.nan_to_num(raw), nonfinite

    def step(self, rgb: torch.Tensor, direction: int = 0, lambda_grad: float = 1.0,
             generator: Optional[torch.Generator] = None, t: Optional[int] = None,
             noise: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None) -> SDSStep:
        """One SDS evaluation for a render [B, 3, h, w] in 0..1 seen from direction label ``direction``."""
        latents = self.encode(rgb, generator)
        t = self.sample_t(generator) if t is None else int(t)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator,
                                device=generator.device if generator is not None else "cpu")
        noise = noise.to(latents)
        context = self.text.for_direction(direction) if context is None else context
        grad, nonfinite = self.gradient(latents, context.to(latents), t, noise, lambda_grad)
        surrogate = (latents * grad).sum()
        return SDSStep(surrogate, latents, grad, t, nonfinite, float(grad.abs().mean()))
