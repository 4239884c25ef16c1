"""NVS GeNVS Train: train a GeNVS network (published objective) on procedural scenes or an NVS_MULTIVIEW.

Runs :func:`nvs_core.genvs.training.train` under ``torch.inference_mode(False)`` (ComfyUI executes nodes in
inference mode) on cloned inputs, with ComfyUI's progress bar and interrupt; checkpoints go to the output
folder (``nvs_genvs_training/<output_name>/``) and a run resumes from there; the EMA network is copied to
``models/nvs/genvs/<output_name>.safetensors`` (+ ``.json``) for NVS GeNVS Loader.
"""
from __future__ import annotations

import copy
import math
import os

import torch

from ..nvs_core.checkpoints import CheckpointError
from ..nvs_core.genvs import training
from ..nvs_core.genvs.config import full_config, tiny_config

from . import host
from .common import (MULTIVIEW, checkpoint_every_input, export_trained, float_input, int_input, mean_loss_text,
                     seed_input, train_output_name, train_run_inputs, training_views)
from .nodes_genvs import GENVS, METHOD, GeNVSModel

CATEGORY = "NVS/GeNVS"
DATA_SOURCES = ["procedural", "multiview"]
WARMUP_STEPS = 50   # linear learning-rate warm-up (the demo recipe's)


def _tiny_network() -> dict:
    cfg = tiny_config(image_size=16, render_size=8, decoder_channels=64, color_feat_dim=16, mapping_out=32,
                      channels=(16, 32), self_attn=(False, True))
    cfg.nerf.sigma_color_rank, cfg.nerf.hidden_dim = 4, 16
    cfg.nerf.num_steps = cfg.nerf.upsample_steps = 8
    cfg.validate()
    return cfg.to_dict()


TRAIN_NETWORKS = {
    # The architecture of the bundled demo model (models/demo/genvs_procedural.safetensors): 32 px, ~7M parameters.
    "demo 32px": copy.deepcopy(training.DEMO_NETWORK),
    # A toy for trying the pipeline in a minute.
    "tiny 16px": _tiny_network(),
    # The published network (genvs.pt, 189M parameters, 128 px): a GPU job.
    "full 128px": full_config().to_dict(),
}


class NVSGeNVSTrain:
    DESCRIPTION = ("Train a GeNVS network with the published objective (diffusion loss with learned variance on the "
                   "target view, RGB MSE of the NeRF render, opacity and depth terms, 10% unconditional drop, "
                   "random affine augmentation with its 9-d conditioning; AdamW with per-module learning rates and "
                   "cosine warm restarts; EMA of the weights), optionally after a warm-up that teaches a from-scratch "
                   "encoder colour (source_reconstruction_steps; not published). Each sample has 1-2 source views "
                   "and one target: "
                   "random procedural objects rendered on the fly, or views of a connected NVS_MULTIVIEW. "
                   "Checkpoints go to the output folder (nvs_genvs_training/<output_name>/) and training resumes "
                   "from there; the EMA network is copied to models/nvs/genvs/<output_name>.safetensors for NVS "
                   "GeNVS Loader.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (GENVS, "STRING")
    RETURN_NAMES = ("genvs", "summary")
    OUTPUT_TOOLTIPS = ("The trained (EMA) network, ready for NVS GeNVS Render / Sampler / Orbit.",
                       "Steps, loss terms, time and the files written.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "data_source": (DATA_SOURCES, {"default": "procedural", "tooltip": "procedural: endless random objects "
                            "with exact cameras (white background, orbit radius 2.6, fov 45, 1-2 sources + one "
                            "target per sample); multiview: views of the connected multiview input."}),
            "network": (list(TRAIN_NETWORKS), {"default": "demo 32px", "tooltip": "Architecture and resolution: "
                        "demo 32px (the pack's demo model, about an hour of CPU for a usable model), tiny 16px "
                        "(a minute on a CPU), full 128px (the published network, 189M parameters: a GPU job)."}),
            "steps": int_input(200, 1, 10_000_000, "Total optimizer steps (a resumed run continues up to this)."),
            "learning_rate": float_input(0.001, 0.000001, 1.0, 0.00001, "Base learning rate of the encoder; the "
                                         "NeRF gets 2x (published ratios), the denoiser denoiser_lr_ratio x. "
                                         "Published: 0.0001 (with ratio 0.1)."),
            "batch_size": int_input(6, 1, 4096, "Samples (1-2 sources + target) per step."),
            "seed": seed_input("Seed of the initial weights and of every step's data, augmentation and noise."),
            **train_run_inputs("genvs_trained", "genvs"),
        }, "optional": {
            "multiview": (MULTIVIEW, {"tooltip": "Training views for data_source 'multiview' (at least 2 views; "
                          "images are centre-cropped and resized, the first picked view's intrinsics are used)."}),
            "denoiser_lr_ratio": float_input(1.0, 0.001, 100.0, 0.001, "Denoiser learning rate / learning_rate "
                                             "(published 0.1; 1 trains a small model from scratch faster)."),
            "restart_steps": int_input(1000, 1, 10_000_000, "Cosine warm-restart period in steps: the learning "
                                       "rate falls from learning_rate to ~0 over this many steps, then restarts "
                                       "(published: every 400 epochs). Set it to steps for one cosine."),
            "checkpoint_every": checkpoint_every_input(),
            "source_reconstruction_steps": int_input(0, 0, 10_000_000, "Not published: the first N steps train "
                                                     "only the encoder and NeRF, on rendering the first source "
                                                     "view back. A stand-in for the published encoder's ImageNet "
                                                     "weights when training from scratch, without which the "
                                                     "encoder stays colour-blind (the demo recipe: 400 of 3100). "
                                                     "0 = the published objective from the first step."),
            "source_view_rgb_weight": float_input(0.01, 0.0, 100.0, 0.01, "Weight of the RGB-render MSE on the "
                                                  "first source view (published 0.01; the demo recipe uses 1, "
                                                  "which keeps the colours the warm-up taught)."),
        }}

    def train(self, data_source, network, steps, learning_rate, batch_size, seed, output_name, resume,
              multiview=None, denoiser_lr_ratio=1.0, restart_steps=1000, checkpoint_every=100,
              source_reconstruction_steps=0, source_view_rgb_weight=0.01):
        name = train_output_name(output_name, "genvs")
        if data_source not in DATA_SOURCES:
            raise ValueError(f"data_source must be one of {DATA_SOURCES}, got {data_source!r}")
        if network not in TRAIN_NETWORKS:
            raise ValueError(f"network must be one of {list(TRAIN_NETWORKS)}, got {network!r}")
        for label, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                                  ("checkpoint_every", checkpoint_every, 0), ("restart_steps", restart_steps, 1),
                                  ("source_reconstruction_steps", source_reconstruction_steps, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        for label, value in (("learning_rate", learning_rate), ("denoiser_lr_ratio", denoiser_lr_ratio)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
        if (not isinstance(source_view_rgb_weight, (int, float)) or not math.isfinite(source_view_rgb_weight)
                or source_view_rgb_weight < 0):
            raise ValueError(f"source_view_rgb_weight must be a finite number >= 0, got {source_view_rgb_weight!r}")
        data = None
        if data_source == "multiview":
            data, spec = training_views(multiview, "(sources + target)")
        else:
            spec = copy.deepcopy(training.DEMO_DATA)

        device = host.compute_device()
        run_dir = os.path.join(host.output_directory(), "nvs_genvs_training", name)
        ratios = {"input_unet": 1.0, "nerf": 2.0, "ddpm_pipeline": float(denoiser_lr_ratio)}
        config = training.TrainConfig(
            network=copy.deepcopy(TRAIN_NETWORKS[network]), data=spec, total_steps=steps, batch_size=batch_size,
            lr=float(learning_rate), lr_ratios=ratios, restart_steps=restart_steps,
            warmup_steps=WARMUP_STEPS, ema_decay=0.995, seed=int(seed), out_dir=run_dir,
            source_reconstruction_steps=source_reconstruction_steps, lambda_rgb_first=float(source_view_rgb_weight),
            checkpoint_every=checkpoint_every, resume=bool(resume), device=str(device),
            reproduce=f"ComfyUI node NVSGeNVSTrain ({network})")
        terms = []
        with torch.inference_mode(False):
            try:
                result = training.train(config, progress=host.progress_factory(),
                                        callback=lambda info: terms.append(info["terms"]),
                                        data=data)
            except CheckpointError as exc:
                raise ValueError(f"resume: {exc}") from None

        target = export_trained(result.ema_path, host.model_folders(METHOD)[0], name)
        net = result.ema.to(device).train(False).requires_grad_(False)
        model = GeNVSModel(net, f"{name}.safetensors", 1.0, {"format": "trained in this session"},
                           first_source_frame=config.normalize_first_view)
        loss_text = mean_loss_text(result.losses)
        if terms:
            last = terms[-min(len(terms), 50):]
            parts = ", ".join(f"{k} {sum(t[k] for t in last) / len(last):.4f}"
                              for k in ("diffusion", "rgb", "opacity", "depth"))
            loss_text += f"\nterms: {parts}"
        warm = (f", first {source_reconstruction_steps} steps source-view reconstruction"
                if source_reconstruction_steps else "")
        summary = (f"GeNVS training '{name}': {network}, {data_source} data{warm}, step {result.step}/{steps} "
                   f"({len(terms)} this run, {result.seconds:.1f} s), batch {batch_size}, lr {learning_rate:g}, "
                   f"skipped non-finite steps {result.skipped}\nloss {loss_text}\nnetwork: {target}\n"
                   f"checkpoint: {result.state_path}\ncameras: relative to the first source (camera_frame auto)")
        return {"ui": {"text": [summary]}, "result": (model, summary)}


NODE_CLASS_MAPPINGS = {"NVSGeNVSTrain": NVSGeNVSTrain}
NODE_DISPLAY_NAME_MAPPINGS = {"NVSGeNVSTrain": "NVS GeNVS Train"}
