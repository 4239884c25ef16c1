"""One NVS-Adapter network evaluation through the SD backend interface (``ThreeDiMAdapter.forward``).

``build_batch`` turns per-object inputs into the UNet batch the published code runs:
- rows ``[reference of object 0..B-1, then query views b0q0, b0q1, ..., b1q0, ...]`` (V = B (1+Q));
- per-row timesteps: queries get the object's t; the reference row gets 0 and its latents enter clean and
  *unscaled* (no c_in);
- unconditional objects (``uncond`` mask, the in-model CFG drop ``ThreeDiMCondDrop``): rays 0 (so posemb is
  the pe-conv bias), image embedding 0, reference latents replaced by fresh unscaled N(0, 1) and reference
  timestep 999; text and query latents unchanged;
- text and image contexts repeated per view, rays split into reference and query rows.

``adapter_eps`` runs the frozen SD UNet through ``SDBackend.unet`` (one COND chunk: the CFG halves are
objects of the batch, not ComfyUI chunks) with an ``after_self_attention`` patch (``AdapterHook``) that runs
the adapter's steps 2-4 at every wrapped block, and returns the query rows' eps (B, Q, 4, h, w).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..sd.interface import COND, UNCOND, BlockCall, SDBackend, UNetPatches, chunk_rows
from .model import NVSAdapter

MAX_TIMESTEP = 999
# (number of unconditional objects, reference latent shape (1, 4, h, w)) -> N(0, 1) draw of that shape
NoiseSource = Callable[[torch.Size], torch.Tensor]


@dataclass
class AdapterBatch:
    latents: torch.Tensor     # (V, 4, h, w)
    timesteps: torch.Tensor   # (V,) int64
    text: torch.Tensor        # (V, T, D)
    image: torch.Tensor       # (V, 1, D_img)
    rays: torch.Tensor        # (V, 144, h, w)
    objects: int
    queries: int


def build_batch(query_latents: torch.Tensor, timesteps: torch.Tensor, text_context: torch.Tensor,
                image_context: torch.Tensor, rays_context: torch.Tensor, reference_latents: torch.Tensor,
                uncond: Optional[torch.Tensor] = None, noise: Optional[NoiseSource] = None,
                generator: Optional[torch.Generator] = None) -> AdapterBatch:
    """The published row layout (see module doc). Shapes: query_latents (B, Q, 4, h, w), timesteps (B,),
    text (B, T, D), image (B, 1, D_img), rays (B, 1+Q, 144, h, w), reference_latents (B, 1, 4, h, w),
    uncond (B,) bool. The unconditional reference latents come from ``noise(shape)`` if given, else
    ``torch.randn`` with ``generator``."""
    objects, queries = query_latents.shape[:2]
    if queries < 1:
        raise ValueError("query latents: expected at least one target view, got 0")
    if reference_latents.shape[:2] != (objects, 1) or reference_latents.shape[2:] != query_latents.shape[2:]:
        raise ValueError(f"reference latents: expected shape {(objects, 1, *query_latents.shape[2:])}, "
                         f"got {tuple(reference_latents.shape)}")
    if rays_context.shape[:2] != (objects, 1 + queries):
        raise ValueError(f"rays context: expected ({objects}, {1 + queries}, 144, h, w) for {queries} target views, "
                         f"got {tuple(rays_context.shape)}")
    device = query_latents.device
    uncond = (torch.zeros(objects, dtype=torch.bool) if uncond is None
              else torch.as_tensor(uncond, dtype=torch.bool).reshape(-1)).to(device)
    timesteps = torch.as_tensor(timesteps, device=device).reshape(-1).long().expand(objects)
    rays, reference, image = rays_context.clone(), reference_latents.clone(), image_context.clone()
    rays[uncond] = 0.0
    if bool(uncond.any()):
        shape = reference[uncond].shape
        drawn = noise(shape) if noise is not None else torch.randn(shape, generator=generator,
                                                                   device=generator.device if generator else device)
        if tuple(drawn.shape) != tuple(shape):
            raise ValueError(f"reference noise: expected shape {tuple(shape)}, got {tuple(drawn.shape)}")
        reference[uncond] = drawn.to(reference)
    image[uncond] = 0.0
    reference_t = torch.zeros_like(timesteps)
    reference_t[uncond] = MAX_TIMESTEP
    return AdapterBatch(
        latents=torch.cat([reference.flatten(0, 1), query_latents.flatten(0, 1)]),
        timesteps=torch.cat([reference_t, timesteps.repeat_interleave(queries)]),
        text=torch.cat([text_context, text_context[:, None].repeat((1, queries, 1, 1)).flatten(0, 1)]),
        image=torch.cat([image, image[:, None].repeat((1, queries, 1, 1)).flatten(0, 1)]),
        rays=torch.cat([rays[:, 0], rays[:, 1:].flatten(0, 1)]),
        objects=objects, queries=queries)


class AdapterHook:
    """The ``after_self_attention`` patch of one adapter (one object per adapter, so hosts that cache patched
    models by patch identity keep one); ``bind(batch)`` supplies the batch of the running UNet call."""

    def __init__(self, adapter: NVSAdapter):
        self.adapter = adapter
        self.layers = adapter.layers
        self.batch: Optional[AdapterBatch] = None
        self._posemb: Dict[int, torch.Tensor] = {}
        # the ray embeddings of the last bound batch: the rays are the same at every sampling step, so later
        # calls with equal rays (and unchanged pe_blocks weights) reuse them instead of re-running the convs
        self._posemb_cache: Optional[Tuple[torch.Tensor, tuple, Dict[int, torch.Tensor]]] = None
        self.patches = UNetPatches(after_self_attention=self)

    def __deepcopy__(self, memo):
        return self  # hosts deep-copy their patch options: share the adapter, never copy it

    @contextmanager
    def bind(self, batch: AdapterBatch):
        previous = (self.batch, self._posemb)
        self.batch, self._posemb = batch, self._cached_posemb(batch.rays)
        try:
            yield self
        finally:
            self.batch, self._posemb = previous

    def _weights_key(self) -> tuple:
        # the pe_blocks tensors themselves (kept alive, so their storage is never reused) and their versions;
        # inference tensors (weights loaded under ComfyUI's inference mode) keep no version counter
        return tuple((p.detach(), None if p.is_inference() else p._version)
                     for p in self.adapter.pe_blocks.parameters())

    def _cached_posemb(self, rays: torch.Tensor) -> Dict[int, torch.Tensor]:
        """The per-level posemb dict for ``rays``: the cached one when the rays are equal (bit for bit, so the
        convs would give the same tokens) to the cached batch's and the pe_blocks weights are the same tensors
        at the same versions; else a fresh dict that becomes the cache."""
        key = self._weights_key()
        cached = self._posemb_cache
        if cached is not None:
            cached_rays, cached_key, posemb = cached
            if (len(key) == len(cached_key)
                    and all(a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device
                            and a.shape == b.shape and va == vb for (a, va), (b, vb) in zip(key, cached_key))
                    and cached_rays.shape == rays.shape and cached_rays.dtype == rays.dtype
                    and cached_rays.device == rays.device and torch.equal(cached_rays, rays)):
                return posemb
        posemb: Dict[int, torch.Tensor] = {}
        self._posemb_cache = (rays.clone(), key, posemb)  # a private copy: later in-place edits of rays can't hide
        return posemb

    def posemb_tokens(self, level: int) -> torch.Tensor:
        if level not in self._posemb:
            posemb = self.adapter.posemb(self.batch.rays, level)
            self._posemb[level] = posemb.flatten(2).transpose(1, 2)  # (V, h*w, C), row-major like "b (h w) c"
        return self._posemb[level]

    def __call__(self, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        if self.batch is None:
            raise ValueError("the NVS-Adapter patch ran outside an adapter UNet call (no batch bound)")
        if call.layer >= len(self.layers):
            raise ValueError(f"the UNet has a transformer block {call.layer}, the NVS-Adapter only "
                             f"{len(self.layers)}: the adapter does not fit this SD model")
        layer = self.layers[call.layer]
        if hidden.shape[0] != self.batch.latents.shape[0] or hidden.shape[-1] != layer.channels:
            raise ValueError(f"layer {call.layer} ({layer.name}): the adapter expects {self.batch.latents.shape[0]} "
                             f"rows of width {layer.channels}, the UNet gave {tuple(hidden.shape)} (an SD model of "
                             "another family than the adapter's?)")
        tokens = self.posemb_tokens(layer.level)
        if tokens.shape[1] != hidden.shape[1]:
            raise ValueError(f"layer {call.layer} ({layer.name}): {hidden.shape[1]} tokens in the UNet, "
                             f"{tokens.shape[1]} in the ray embedding (latents and rays on different grids?)")
        block = self.adapter.block(call.layer)
        if block.support_emb.device != hidden.device:  # the adapter follows the UNet's compute device
            self.adapter.to(hidden.device)
            self._posemb = self._cached_posemb(self.batch.rays)  # new weight tensors: a fresh entry
            tokens = self.posemb_tokens(layer.level)
        dtype = block.support_emb.dtype
        out = block.after_self_attention(hidden.to(dtype), tokens.to(hidden.device, dtype),
                                         self.batch.image.to(hidden.device, dtype), self.batch.objects,
                                         self.batch.queries)
        return out.to(hidden.dtype)


def hook_for(adapter: NVSAdapter) -> AdapterHook:
    """The adapter's one patch object."""
    if "_hook" not in adapter.__dict__:
        adapter.__dict__["_hook"] = AdapterHook(adapter)
    return adapter.__dict__["_hook"]


def check_backend(backend: SDBackend, adapter: NVSAdapter) -> None:
    """Clear errors for an SD model the adapter was not made for."""
    if backend.prediction_type != "epsilon":
        raise ValueError(f"NVS-Adapter needs an eps-prediction SD model (SD 2.1 base for the released adapter), "
                         f"got a {backend.prediction_type} model (SD 2.1-768?)")
    layers = getattr(backend, "num_layers", None)
    if layers is not None and layers != adapter.num_layers:
        raise ValueError(f"the SD model has {layers} transformer blocks, the NVS-Adapter expects "
                         f"{adapter.num_layers}")


def check_contexts(adapter: NVSAdapter, batch: AdapterBatch) -> None:
    """Clear errors for text/image contexts of another model family (SD 1.x text, a non-ViT-H CLIP)."""
    if batch.text.shape[-1] != adapter.config.context_dim:
        raise ValueError(f"text context width {batch.text.shape[-1]}: the NVS-Adapter was trained with SD "
                         f"text contexts of width {adapter.config.context_dim} (SD 2.x); is this an SD 1.x model?")
    if batch.image.shape[-1] != adapter.config.image_context_dim:
        raise ValueError(f"image embedding width {batch.image.shape[-1]}: expected {adapter.config.image_context_dim} "
                         "(the projected CLIP ViT-H image embedding)")


def adapter_eps(backend: SDBackend, adapter: NVSAdapter, batch: AdapterBatch) -> torch.Tensor:
    """eps of the query views (B, Q, 4, h, w) for one built batch (see module doc)."""
    check_contexts(adapter, batch)
    hook = hook_for(adapter)
    with hook.bind(batch):
        output = backend.unet(batch.latents, batch.timesteps, batch.text, (COND,), hook.patches)
    return output[batch.objects:].unflatten(0, (batch.objects, batch.queries))


def adapter_forward(backend: SDBackend, adapter: NVSAdapter, query_latents, timesteps, text_context, image_context,
                    rays_context, reference_latents, uncond=None, noise: Optional[NoiseSource] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``ThreeDiMAdapter.forward``: build the batch, run the patched UNet, return the queries' eps."""
    batch = build_batch(query_latents, timesteps, text_context, image_context, rays_context, reference_latents,
                        uncond, noise, generator)
    return adapter_eps(backend, adapter, batch)


# ------------------------------------------------------------------------------ host samplers

@dataclass
class AdapterCondition:
    """What a patched SD model carries so that any sampler can run the adapter: one reference view and the
    Q target cameras it generates (the latent batch of the sampler = the Q target views)."""

    reference_latents: torch.Tensor   # (1, 1, 4, h, w) clean, scaled
    image_context: torch.Tensor       # (1, 1, D_img)
    rays_context: torch.Tensor        # (1, 1 + Q, 144, h, w)

    @property
    def queries(self) -> int:
        return self.rays_context.shape[1] - 1


class AdapterUNetCall:
    """The ``UNetCallWrapper`` that puts the published batch around a host sampler's rows.

    The host passes chunks of Q rows (the target views) with their own labels: a COND chunk becomes a
    conditional object, an UNCOND chunk an unconditional one (rays 0, image embedding 0, random reference at
    t 999 -- the in-model CFG drop, whatever the negative prompt says). The reference rows are inserted clean and
    unscaled at t 0; the host's rows come back in their order. Unconditional reference draws come from a CPU
    generator (``reseed`` at the start of a sampling run for reproducible results).
    """

    def __init__(self, adapter: NVSAdapter, condition: AdapterCondition, seed: int = 0):
        self.adapter, self.condition = adapter, condition
        self.generator = torch.Generator().manual_seed(int(seed))
        hook = hook_for(adapter)
        self.patches = UNetPatches(after_self_attention=hook, unet_wrapper=self)

    def __deepcopy__(self, memo):
        return self

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def batch(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, chunks) -> AdapterBatch:
        chunks = tuple(chunks)
        rows = chunk_rows(latents.shape[0], chunks)
        queries = self.condition.queries
        if rows != queries:
            raise ValueError(f"the latent batch has {rows} views, the NVS-Adapter conditioning was made for "
                             f"{queries} target cameras (use the LATENT from the same NVS-Adapter apply)")
        objects = len(chunks)
        steps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        steps = steps.reshape(objects, queries)
        if not bool((steps == steps[:, :1]).all()):
            raise ValueError("the NVS-Adapter needs one timestep per chunk (all target views at the same noise level)")
        c = self.condition
        device = latents.device
        return build_batch(latents.unflatten(0, (objects, queries)), steps[:, 0].round().long(),
                           context[::queries], c.image_context.to(device).expand(objects, -1, -1),
                           c.rays_context.to(device).expand(objects, -1, -1, -1, -1),
                           c.reference_latents.to(device, latents.dtype).expand(objects, -1, -1, -1, -1),
                           uncond=torch.tensor([label == UNCOND for label in chunks]), generator=self.generator)

    def __call__(self, latents, timesteps, context, chunks, run):
        batch = self.batch(latents, timesteps, context, chunks)
        check_contexts(self.adapter, batch)
        with hook_for(self.adapter).bind(batch):
            output = run(batch.latents, batch.timesteps.to(torch.float32), batch.text)
        return output[batch.objects:]
