"""Reference photo + cameras -> novel views with the NVS-Adapter (what the nodes and the CLI call).

Published preprocessing (``sgm/data``, ``FrozenOpenCLIPImageEmbedder``):
- the reference image gets a white background from its alpha (``rgb * a + (1 - a)``), is resized to the model
  resolution (256, bicubic with antialias) and mapped to [-1, 1];
- VAE latents are a posterior *sample* (not the mean) times the latent scale;
- the CLIP image embedding: resize to 224 (bicubic, ``align_corners=True``, antialias; kornia as upstream) of the
  [-1, 1] image, then (x + 1) / 2, OpenAI CLIP mean/std, the projected image embedding (ViT-H: 1024-d) as one
  token;
- the text context is the SD text encoding of the empty prompt "" (SD 2.x: OpenCLIP penultimate layer).
Targets are generated in groups of ``views_per_batch`` with the same reference (the adapter works for any count).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..cameras import Cameras
from ..progress import ProgressFactory, resolve, shared
from ..sd.interface import SDBackend
from .cameras import IMAGE_RESOLUTION, rays_context_for_cameras
from .model import NVSAdapter
from .sampler import DEFAULT_CFG, DEFAULT_STEPS, sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def white_background(images: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] composited on white with ``alpha`` (B, H, W), 1 = object; errors for an
    all-empty alpha."""
    if alpha is None:
        return images
    alpha = alpha.to(images).reshape(images.shape[0], 1, *images.shape[-2:])
    empty = alpha.flatten(1).amax(dim=1) <= 0
    if bool(empty.any()):
        raise ValueError(f"reference mask: image(s) {empty.nonzero().flatten().tolist()} have no object pixels "
                         "(expected a mask that is 1 on the object)")
    return images * alpha + (1 - alpha)


def prepare_reference(images: torch.Tensor, alpha: Optional[torch.Tensor] = None,
                      resolution: int = IMAGE_RESOLUTION) -> torch.Tensor:
    """(B, 3, H, W) [0, 1] -> (B, 3, resolution, resolution) in [-1, 1] on a white background."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reference image: expected (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
    x = white_background(images.float(), alpha)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """The published CLIP preprocessing of [-1, 1] images (B, 3, H, W) -> (B, 3, 224, 224)."""
    import kornia

    x = kornia.geometry.transform.resize(images.float(), (CLIP_SIZE, CLIP_SIZE), interpolation="bicubic",
                                         align_corners=True, antialias=True)
    x = (x + 1.0) / 2.0
    return kornia.enhance.normalize(x, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))


def clip_image_embedding(vision, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) projected CLIP image embeddings of [-1, 1] images (B, 3, H, W), published preprocessing.

    ``vision``: a transformers ``CLIPVisionModelWithProjection`` (its ``image_embeds``), or any callable taking
    the preprocessed pixels and returning (B, D) embeddings (e.g. a host's CLIP vision model)."""
    pixels = clip_pixels(images)
    if isinstance(vision, torch.nn.Module):
        parameter = next(vision.parameters())
        out = vision(pixel_values=pixels.to(device=parameter.device, dtype=parameter.dtype))
    else:
        out = vision(pixels)
    embeds = out if isinstance(out, torch.Tensor) else getattr(out, "image_embeds", None)
    if embeds is None or embeds.ndim != 2 or embeds.shape[0] != images.shape[0]:
        raise ValueError(f"CLIP vision: expected projected image embeddings ({images.shape[0]}, D), got "
                         f"{type(out).__name__ if embeds is None else tuple(embeds.shape)}")
    return embeds.float().unsqueeze(1)


def empty_text_context(backend: SDBackend) -> torch.Tensor:
    """(1, T, D) SD text context of the empty prompt (the text the NVS-Adapter always uses)."""
    ids = backend.tokenize([""])
    encoder = backend.text_encoder
    return encoder(ids.to(next(encoder.parameters()).device)).last_hidden_state.float()


def generate_views(backend: SDBackend, adapter: NVSAdapter, reference_image: torch.Tensor,
                   reference_camera: Cameras, target_cameras: Cameras, image_embedding: torch.Tensor,
                   text_context: Optional[torch.Tensor] = None, alpha: Optional[torch.Tensor] = None,
                   cfg_scale: float = DEFAULT_CFG, steps: int = DEFAULT_STEPS, seed: int = 0,
                   views_per_batch: int = 4, resolution: int = IMAGE_RESOLUTION, focal: str = "published",
                   progress: Optional[ProgressFactory] = None) -> torch.Tensor:
    """Novel views (N, 3, resolution, resolution) in [0, 1] of one reference image (1, 3, H, W) [0, 1].

    ``image_embedding`` (1, 1, D) or (1, D): the CLIP ViT-H projected embedding of the prepared reference
    (``clip_image_embedding``, or the host's CLIP vision output). Seeded: one CPU generator draws the VAE
    posterior sample, each group's initial noise and the unconditional reference draws, in that order.
    """
    if len(target_cameras) == 0:
        raise ValueError("target cameras: expected at least one camera, got an empty batch")
    if views_per_batch < 1:
        raise ValueError(f"views_per_batch must be >= 1, got {views_per_batch}")
    if reference_image.shape[0] != 1:
        raise ValueError(f"reference image: expected one image, got a batch of {reference_image.shape[0]}")
    generator = torch.Generator().manual_seed(int(seed))
    reference = prepare_reference(reference_image, alpha, resolution)
    latents = backend.encode_images(reference, sample=True, generator=generator).float()
    side = latents.shape[-1]
    if resolution % side or latents.shape[-2] != side:
        raise ValueError(f"the VAE gave {tuple(latents.shape[-2:])} latents for {resolution} px images")
    if text_context is None:
        text_context = empty_text_context(backend)
    image_embedding = image_embedding.float().reshape(1, 1, -1)
    groups = [target_cameras[i:i + views_per_batch] for i in range(0, len(target_cameras), views_per_batch)]
    images = []
    with resolve(progress, steps * len(groups), "NVS-Adapter views") as bar:
        inner = shared(bar)
        for group in groups:
            rays = rays_context_for_cameras(reference_camera, group, resolution, resolution // side, focal)
            noise = torch.randn((1, len(group), *latents.shape[1:]), generator=generator)
            out = sample(backend, adapter, noise.to(latents.device), text_context.to(latents.device),
                         image_embedding.to(latents.device), rays.to(latents.device), latents[:, None],
                         cfg_scale, steps, generator=generator, progress=inner)
            decoded = backend.decode_latents(out[0])
            images.append(((decoded.float() + 1) / 2).clamp(0, 1))
    return torch.cat(images)
