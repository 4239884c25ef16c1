"""The one interface method code uses to steer a Stable Diffusion 1.x/2.x model (ARCHITECTURE.md section 2).

Terms:
- **layer** 0..15: the 16 cross-attention transformer blocks in call order, named as in LDM/ComfyUI
  (``LAYER_NAMES``): IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03..OUT11. ``LDM_BLOCKS`` and
  ``DIFFUSERS_ATTENTIONS`` give the physical block of each index in the two layouts.
- **chunk**: a UNet batch is made of equal-size row chunks, each labelled ``COND`` or ``UNCOND`` (ComfyUI's
  ``cond_or_uncond`` 0/1). Patches look chunks up by label, never by position.
- **timestep / sigma**: the discrete DDPM schedule of the model (``NoiseSchedule``), with
  ``sigma_t = sqrt((1 - abar_t) / abar_t)``. Latents at noise level t are ``x_t = sqrt(abar_t) x0 +
  sqrt(1 - abar_t) eps`` (the "DDPM scale" the UNet takes); in sigma space ``x_sigma = x0 + sigma eps =
  x_t * sqrt(1 + sigma^2)`` (k-diffusion/ComfyUI). ``NoiseSchedule.timestep(sigma)`` is the nearest table
  index in log-sigma, exactly what ComfyUI feeds its UNet.
- **prediction type**: ``"epsilon"`` (SD 1.x, SD 2.x base) or ``"v_prediction"`` (SD 2.x 768-v), the raw
  UNet output; ``predict_noise`` always returns eps.

Capabilities (``SDBackend``):
(a) per-layer, per-step, per-chunk cross-attention context override with separate keys and values
    contexts, supplied lazily by a ``CrossAttentionContexts`` provider;
(b) a hook right after the self-attention residual of every transformer block (``AfterSelfAttention``);
(c) noise prediction with classifier-free guidance, differentiable when grad is enabled;
(d) text encoding with vectors injected at placeholder positions (keys and bypassed values contexts);
(e) VAE encode (differentiable) / decode with the model's latent scaling;
(f) a wrapper around the whole UNet call that may rebuild the batch (``UNetCallWrapper``).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

NUM_LAYERS = 16
LAYER_NAMES = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
               "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
# (block kind, block id) of each layer in LDM / ComfyUI ``transformer_options["block"]`` terms.
LDM_BLOCKS = (("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
              ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8),
              ("output", 9), ("output", 10), ("output", 11))
# The Transformer2DModel of each layer in a diffusers UNet2DConditionModel (SD 1.x/2.x block layout).
DIFFUSERS_ATTENTIONS = tuple(
    [f"down_blocks.{b}.attentions.{j}" for b in range(3) for j in range(2)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{j}" for b in range(1, 4) for j in range(3)])

COND = "cond"
UNCOND = "uncond"
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ------------------------------------------------------------------------------ what patches see

@dataclass(frozen=True)
class LayerCall:
    """One cross-attention call, for one chunk: what a context provider is asked about."""

    layer: int                # 0..15
    chunk: str                # COND or UNCOND
    timesteps: torch.Tensor   # (n,) the UNet's timestep for each row of the chunk
    sigmas: torch.Tensor      # (n,) the matching sigmas
    rows: int                 # n
    shared_timestep: Optional[float] = None  # the timestep if every row has the same one (sampling), else None


@runtime_checkable
class CrossAttentionContexts(Protocol):
    """Supplies (keys context, values context) per (layer, step, chunk); None leaves the chunk untouched.

    Contexts are (n, T, D) or (1, T, D) (broadcast over the chunk's rows). Optional methods:
    ``prepare(timesteps, progress=None)`` before a sampling run with the schedule's timesteps, ``release()``
    after it; ``check_batch(batch)`` before ``prepare`` with the run's latent batch size (raise to refuse it).
    """

    def contexts(self, call: LayerCall) -> Optional[Tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class BlockCall:
    """What the after-self-attention hook sees besides the hidden states."""

    layer: int
    chunks: Tuple[str, ...]        # labels of the equal-size row chunks, in batch order
    timesteps: torch.Tensor        # (n,) per row of one chunk (the same for every chunk)
    sigmas: torch.Tensor           # (n,)
    spatial_shape: Tuple[int, int]  # (h, w) of the block's tokens (hidden states are (B, h*w, C))


# hidden (B, h*w, C) after ``x = attn1(norm1(x)) + x``, before norm2/attn2 -> new hidden, same shape
AfterSelfAttention = Callable[[torch.Tensor, BlockCall], torch.Tensor]


# A UNet call that rebuilds its batch (e.g. NVS-Adapter's clean reference rows with their own timesteps):
# ``wrapper(latents, timesteps, context, chunks, run)`` gets the rows the caller (or a host sampler) passes --
# DDPM-scale latents (B, 4, h, w), timesteps (B,), context (B, T, D), the chunk labels -- and returns the raw
# output for exactly those rows; ``run(latents, timesteps, context)`` evaluates the UNet (with the other patches)
# on any batch it builds. Hosts install it around the diffusion model (ComfyUI: a ``DIFFUSION_MODEL`` wrapper),
# so their own samplers go through it too.
UNetCallWrapper = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[str, ...],
                            Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]], torch.Tensor]


@dataclass
class UNetPatches:
    contexts: Optional[CrossAttentionContexts] = None
    after_self_attention: Optional[AfterSelfAttention] = None
    unet_wrapper: Optional[UNetCallWrapper] = None

    def __bool__(self) -> bool:
        return (self.contexts is not None or self.after_self_attention is not None
                or self.unet_wrapper is not None)


def chunk_rows(batch: int, chunks: Sequence[str]) -> int:
    if not chunks or batch % len(chunks):
        raise ValueError(f"a batch of {batch} rows cannot be split into the chunks {list(chunks)}")
    return batch // len(chunks)


def _repeat_tokens(context: torch.Tensor, length: int) -> torch.Tensor:
    # Repeating every token r times leaves softmax attention unchanged; ComfyUI pads conds the same way.
    if context.shape[1] == length:
        return context
    return context.repeat(1, length // context.shape[1], 1)


def shared_timestep(timesteps: torch.Tensor) -> Optional[float]:
    """The common value of a (n,) timestep tensor, or None (one device sync; adapters call it once per step)."""
    values = timesteps.detach().reshape(-1).tolist()
    return float(values[0]) if values and all(v == values[0] for v in values) else None


def override_cross_attention_context(context: torch.Tensor, chunks: Sequence[str], layer: int,
                                     timesteps: torch.Tensor, sigmas: torch.Tensor,
                                     provider: CrossAttentionContexts, shared: Optional[float] = None
                                     ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values contexts for a whole batch: each chunk's own context unless the provider overrides
    it. None if no chunk is overridden. Token counts that differ are brought to their least common
    multiple by repetition (exact for softmax attention). ``shared``: see ``LayerCall.shared_timestep``."""
    rows = chunk_rows(context.shape[0], chunks)
    keys, values, changed = [], [], False
    for index, label in enumerate(chunks):
        own = context[index * rows:(index + 1) * rows]
        override = provider.contexts(LayerCall(layer, label, timesteps, sigmas, rows, shared))
        if override is None:
            keys.append(own)
            values.append(own)
            continue
        changed = True
        for name, part in zip(("keys", "values"), override):
            if part.ndim != 3 or part.shape[0] not in (1, rows) or part.shape[-1] != context.shape[-1]:
                raise ValueError(f"layer {layer}, chunk {label!r}: {name} context of shape {tuple(part.shape)} "
                                 f"does not fit {rows} rows of width {context.shape[-1]}")
        keys.append(override[0].to(context).expand(rows, -1, -1))
        values.append(override[1].to(context).expand(rows, -1, -1))
    if not changed:
        return None
    lengths = {part.shape[1] for part in keys + values}
    length = lengths.pop() if len(lengths) == 1 else math.lcm(*lengths)
    return (torch.cat([_repeat_tokens(part, length) for part in keys]),
            torch.cat([_repeat_tokens(part, length) for part in values]))


# ------------------------------------------------------------------------------------ schedule

class NoiseSchedule:
    """The discrete DDPM schedule of an SD model and its sigma <-> timestep maps (see module doc)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_train_timesteps: int = 1000) -> "NoiseSchedule":
        """SD's schedule (LDM "linear" = diffusers "scaled_linear"), computed in float64 like ComfyUI."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> "NoiseSchedule":
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        return cls(1 / (1 + sigmas ** 2))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def timestep(self, sigma) -> torch.Tensor:
        """Nearest table index in log-sigma (float tensor); sigma 0 maps to 0."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = sigma.clamp_min(1e-30).log().to(self.log_sigmas.device)
        index = (log_sigma.reshape(-1, 1) - self.log_sigmas[None]).abs().argmin(dim=1)
        return index.reshape(sigma.shape).to(torch.float32)

    def sigma(self, timestep) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep, log-linear between table entries (float32)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(torch.float32)

    def _abar(self, timestep, like: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(torch.as_tensor(timestep).detach().cpu()).double()
        abar = (1 / (1 + sigma ** 2)).to(device=like.device, dtype=like.dtype)
        return abar.reshape(-1, *([1] * (like.ndim - 1))) if abar.ndim else abar

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        abar = self._abar(timestep, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """The v-prediction target sqrt(abar) eps - sqrt(1 - abar) x0."""
        abar = self._abar(timestep, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def eps_from_output(self, output: torch.Tensor, latents: torch.Tensor, timestep, prediction_type: str):
        """eps from the raw UNet output at DDPM-scale latents x_t."""
        if prediction_type == "epsilon":
            return output
        if prediction_type == "v_prediction":
            abar = self._abar(timestep, latents)
            return abar.sqrt() * output + (1 - abar).sqrt() * latents
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def x0_from_output(self, output: torch.Tensor, latents: torch.Tensor, timestep, prediction_type: str):
        abar = self._abar(timestep, latents)
        if prediction_type == "v_prediction":
            return abar.sqrt() * latents - (1 - abar).sqrt() * output
        eps = self.eps_from_output(output, latents, timestep, prediction_type)
        return (latents - (1 - abar).sqrt() * eps) / abar.sqrt()


# ------------------------------------------------------------------------------------- backend

class SDBackend(ABC):
    """An SD 1.x/2.x UNet + CLIP text encoder + VAE, seen through the capabilities method code needs.

    Adapters implement ``unet``, ``text_encoder``/``tokenize``, ``encode_images`` and ``decode_latents``;
    ``predict_noise`` and ``encode_text`` are written once here on top of them.
    """

    prediction_type: str = "epsilon"
    schedule: NoiseSchedule
    latent_scaling_factor: float = 0.18215
    num_layers: int = NUM_LAYERS

    # ---- (a) (b): the UNet, optionally patched
    @abstractmethod
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
             chunks: Optional[Sequence[str]] = None, patches: Optional[UNetPatches] = None) -> torch.Tensor:
        """Raw UNet output (eps or v, see ``prediction_type``) for DDPM-scale ``latents`` (B, 4, h, w) at
        ``timesteps`` (B,) or scalar, with cross-attention ``context`` (B, T, D). ``chunks`` labels equal
        row chunks of the batch (default: one COND chunk); ``patches`` apply to this call only."""

    # ---- (c): noise prediction with classifier-free guidance
    def predict_noise(self, latents: torch.Tensor, timestep, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None,
                      guidance_scale: float = 1.0, patches: Optional[UNetPatches] = None) -> torch.Tensor:
        """eps_u + g (eps_c - eps_u) for DDPM-scale latents (B, 4, h, w); ``cond``/``uncond`` (B or 1, T, D).

        Without ``uncond`` (or g == 1) only the cond chunk runs. One batched UNet call [uncond, cond],
        labelled by chunk; differentiable w.r.t. latents/contexts when grad is enabled.
        """
        batch = latents.shape[0]
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=latents.device).reshape(-1).expand(batch)
        cond = cond.expand(batch, -1, -1) if cond.shape[0] == 1 else cond
        if uncond is None or guidance_scale == 1.0:
            output = self.unet(latents, timesteps, cond, (COND,), patches)
            return self.schedule.eps_from_output(output, latents, timesteps, self.prediction_type)
        uncond = uncond.expand(batch, -1, -1) if uncond.shape[0] == 1 else uncond
        length = math.lcm(cond.shape[1], uncond.shape[1])
        context = torch.cat([_repeat_tokens(uncond, length), _repeat_tokens(cond, length)])
        doubled = torch.cat([latents, latents])
        output = self.unet(doubled, torch.cat([timesteps, timesteps]), context, (UNCOND, COND), patches)
        eps_uncond, eps_cond = self.schedule.eps_from_output(output, doubled, torch.cat([timesteps, timesteps]),
                                                             self.prediction_type).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    # ---- (d): text
    @property
    @abstractmethod
    def text_encoder(self) -> torch.nn.Module:
        """A transformers ``CLIPTextModel`` whose ``last_hidden_state`` is the UNet's context."""

    @abstractmethod
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77) token ids, padded as the model was trained."""

    def encode_text(self, input_ids: torch.Tensor, view_vectors=None, object_vectors=None):
        """Contexts for ``input_ids`` with ``PlaceholderVectors`` injected (word replaces the token embedding;
        bypass, if any, changes the values context at that row). Returns ``viewneti.text.TextEncoding``
        (keys = the context ``to_k`` sees, values = the one ``to_v`` sees). Differentiable w.r.t. the vectors."""
        from ..viewneti.text import encode_text_with_mapper_outputs

        encoder = self.text_encoder
        device = next(encoder.parameters()).device
        return encode_text_with_mapper_outputs(encoder, input_ids.to(device), view_vectors=view_vectors,
                                               object_vectors=object_vectors)

    # ---- (e): VAE
    @abstractmethod
    def encode_images(self, images: torch.Tensor, sample: bool = True,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents for images (B, 3, H, W) in [-1, 1]; a posterior sample or its mean."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in about [-1, 1] from scaled latents."""


@contextmanager
def prepared(provider, timesteps, progress=None):
    """``provider.prepare(timesteps)`` for the length of a sampling run, then ``release()`` (if it has them).

    ``progress`` (a progress factory) is passed on when given, for providers whose preparation is long.
    """
    if hasattr(provider, "prepare"):
        if progress is None:
            provider.prepare(timesteps)
        else:
            provider.prepare(timesteps, progress=progress)
    try:
        yield provider
    finally:
        if hasattr(provider, "release"):
            provider.release()
