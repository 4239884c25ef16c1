"""Textual inversion node: learn a token for one photo on the host's SD model (RealFusion's first stage,
:mod:`nvs_core.textual_inversion`) and save it where core ComfyUI prompts find it (``embedding:<name>``).

Runs inside the prompt worker under ``torch.inference_mode(False)`` with cloned inputs, through the ComfyUI
SD adapter's differentiable path (``ComfySDBackend(differentiable=True)``: ordinary-tensor views of ComfyUI's
inference-mode weights) so gradients reach the vector through the host's UNet (research/comfyui-host.md section 8).
"""
from __future__ import annotations

import logging
import math
import os
import re

import torch

from ..nvs_core import textual_inversion as ti

from . import host
from .common import check_image, check_mask, float_input, int_input, seed_input

log = logging.getLogger("ComfyUI-NVS")

CATEGORY = "NVS/RealFusion"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
REALFUSION_PROMPT = "A high-resolution DSLR image of a {}"


def _embedding_name(value: str) -> str:
    name = str(value).strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name) or name.startswith("."):
        raise ValueError(f"embedding_name: {name!r} is not a plain file name; use letters, digits, '_', '-' and '.' "
                         "(the file becomes models/embeddings/<embedding_name>.safetensors)")
    return name


class NVSTextualInversionTrain:
    DESCRIPTION = ("Learn a new word for the object in one photo (textual inversion, as RealFusion does before "
                   "reconstruction): one token vector, started from the initializer word, is trained so that the "
                   "connected SD model (published: SD 1.5) reproduces the photo under 27 caption templates and "
                   "RealFusion's augmentations. Saved to models/embeddings/<embedding_name>.safetensors; write "
                   "embedding:<embedding_name> in any prompt. Published run: 3000 steps x 4 accumulated samples "
                   "at 512 px (about an hour on a V100).")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("embedding", "prompt", "summary")
    OUTPUT_TOOLTIPS = ("The prompt word for the learned token: embedding:<embedding_name>.",
                       "RealFusion's prompt with it: 'A high-resolution DSLR image of a embedding:<name>'.",
                       "Steps, loss, learning rate, time and the files written.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The object photo (the first image of the batch is used)."}),
            "model": ("MODEL", {"tooltip": "The frozen SD UNet (published: Stable Diffusion 1.5)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder; the learned vector is placed at the token's slot."}),
            "vae": ("VAE", {"tooltip": "Its VAE: training images are encoded (posterior sample x scaling factor)."}),
            "initializer_word": ("STRING", {"default": "object", "tooltip": "A word the tokenizer keeps as one token "
                                 "that describes the object (e.g. cat, teapot); the vector starts from its embedding."}),
            "steps": int_input(3000, 1, 100000, "Optimizer steps (published 3000)."),
            "learning_rate": float_input(0.0005, 0.000001, 1.0, 0.0001, "Base learning rate (published 5e-4; "
                                         "x batch x accumulation = 2e-3 with scale_lr)."),
            "seed": seed_input("Seed of the augmentations, captions, noise and timesteps."),
            "embedding_name": ("STRING", {"default": "realfusion_object", "tooltip": "File name in models/embeddings/ "
                               "(an existing file of that name is replaced); prompts use embedding:<name>."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Object silhouette, needed only for background 'white' (LoadImage's inverted "
                     "alpha mask is recognised)."}),
            "background": (list(ti.BACKGROUNDS), {"default": "photo", "tooltip": "photo: train on the image as given "
                           "(published); white: the object composited on white with the mask."}),
            "augmentations": ("BOOLEAN", {"default": True, "tooltip": "RealFusion's augmentations (rotation, resized "
                              "crop, colour jitter, grayscale, blur, flip); off: resize + flip only."}),
            "pixel_range": (list(ti.PIXEL_RANGES), {"default": "published", "tooltip": "published: augmented images "
                            "reach the VAE in [0, 1] (the original's bug); fixed: rescaled to [-1, 1] as the VAE "
                            "expects."}),
            "scale_lr": ("BOOLEAN", {"default": True, "tooltip": "Multiply the learning rate by batch x "
                         "accumulation (published)."}),
            "gradient_accumulation": int_input(4, 1, 256, "Samples averaged per optimizer step (published 4)."),
            "resolution": int_input(512, 64, 1024, "Training image size in pixels (published 512).", step=8),
            "placeholder_token": ("STRING", {"default": "", "tooltip": "Name stored with the vector (learned_embeds.bin "
                                  "key); empty: _<embedding_name>_ as in RealFusion's examples."}),
        }}

    @staticmethod
    def make_backend(model, clip, vae):
        """The SD backend training runs on: ComfyUI's objects through the differentiable adapter (fp32 text)."""
        from .sd_comfy import ComfySDBackend

        return ComfySDBackend(model, clip, vae, differentiable=True, text_dtype=torch.float32)

    def train(self, image, model, clip, vae, initializer_word, steps, learning_rate, seed, embedding_name, mask=None,
              background="photo", augmentations=True, pixel_range="published", scale_lr=True,
              gradient_accumulation=4, resolution=512, placeholder_token=""):
        name = _embedding_name(embedding_name)
        token = str(placeholder_token).strip() or f"_{name}_"
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
        image = check_image(image, "image", channels=None)
        if image.shape[-1] not in (3, 4):
            raise ValueError(f"image: expected 3 (RGB) or 4 (RGBA) channels, got {image.shape[-1]}")
        if image.shape[0] > 1:
            log.warning("NVS Textual Inversion Train: %d images given, using the first", image.shape[0])
        if mask is not None:
            mask = check_mask(mask, "mask", 1, image.shape[1], image.shape[2])[0]
            border = torch.cat([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
            if float(border.float().mean()) > 0.5:  # LoadImage gives 1 - alpha
                mask = 1 - mask
        try:
            config = ti.TextualInversionConfig(
                placeholder_token=token, initializer_token=str(initializer_word).strip(), steps=int(steps),
                learning_rate=float(learning_rate), scale_lr=bool(scale_lr),
                gradient_accumulation=int(gradient_accumulation), resolution=int(resolution),
                augmentations=bool(augmentations), pixel_range=pixel_range, background=background, seed=int(seed))
        except ValueError as e:
            raise ValueError(f"NVS Textual Inversion Train: {e}") from None
        run_dir = os.path.join(host.output_directory(), "nvs_textual_inversion", name)
        with torch.inference_mode(False):
            photo = image[0].detach().float().cpu().clone()
            silhouette = None if mask is None else mask.detach().float().cpu().clone()
            backend = self.make_backend(model, clip, vae)
            try:
                result = ti.train_textual_inversion(backend, photo, config, silhouette,
                                                    progress=host.progress_factory(), out_dir=run_dir)
            except ValueError as e:
                raise ValueError(f"NVS Textual Inversion Train: {e}") from None
        target = os.path.join(host.embeddings_directory(), f"{name}.safetensors")
        ti.save_comfy_embedding(target, result.token, result.vector,
                                {**config.to_dict(), "steps_done": result.step, "skipped_steps": result.skipped_steps})
        recent = [x for x in result.losses[-50:] if math.isfinite(x)]
        loss_text = f"{sum(recent) / len(recent):.4f} (mean of the last {len(recent)} steps)" if recent else "n/a"
        embedding = f"embedding:{name}"
        summary = (f"Textual inversion '{token}' from '{config.initializer_token}': {result.step}/{steps} steps, loss "
                   f"{loss_text}, lr {result.effective_learning_rate:g}, {result.skipped_steps} skipped (non-finite), "
                   f"{result.seconds:.0f} s; vector norm {float(result.vector.norm()):.4f}. Saved {target} (use "
                   f"{embedding}) and {os.path.join(run_dir, 'learned_embeds.bin')}.")
        return {"ui": {"text": [summary]},
                "result": (embedding, REALFUSION_PROMPT.format(embedding), summary)}


NODE_CLASS_MAPPINGS = {"NVSTextualInversionTrain": NVSTextualInversionTrain}
NODE_DISPLAY_NAME_MAPPINGS = {"NVSTextualInversionTrain": "NVS Textual Inversion Train"}
