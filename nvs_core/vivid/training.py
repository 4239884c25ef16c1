"""Training VIVID networks (EDM2 recipe) on pairs of views, resumable, with progress and interrupt.

Recipe (EDM2 ``training/training_loop.py`` and ``phema.py``; VIVID's ``NVLoss`` and presets):

- loss per element: sigma = exp(P_mean + P_std n), n ~ N(0, 1) per sample;
  weight = (sigma^2 + sd^2) / (sigma sd)^2; L = weight / exp(u) * (D(src, y + sigma e; sigma) - y)^2 + u,
  u = the net's learned log-variance. VIVID uses P_mean = -0.8, P_std = 1.6 (EDM2's ImageNet
  default is -0.4, 1.0). The gradient is that of sum(L) / batch, as EDM2 backpropagates; the
  reported loss is mean(L) per element, which is independent of the image size;
- Adam (betas 0.9, 0.99, eps 1e-8); lr(t) = ref_lr / sqrt(max(t / t_ref, 1)) * min(t / t_rampup, 1),
  with t the number of steps done before this one (EDM2 counts images; for a fixed batch size
  steps are the same ratio), so the first step has lr 0 when there is a ramp-up, as in EDM2;
- NaN/inf gradients are replaced by 0 before the optimizer step (EDM2 ``force_finite``);
- power-function EMA (EDM2 PHEMA) with relative standard deviations ``ema_stds``; the EMA with
  ``ema_export_std`` is the inference network that is saved;
- every step draws its data and noise from a generator seeded by (seed, step), as EDM2 reseeds
  per step, so a resumed run continues exactly where it stopped.

Outputs in ``out_dir``: ``network-ema.safetensors`` + ``.json`` (loads with ``loading.load_vivid``)
and ``training-state.safetensors`` + ``.json`` (raw net, EMAs, Adam state, step, config), each
written atomically.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..checkpoints import CheckpointError, load_with_config, save_with_config
from ..progress import ProgressFactory, resolve
from ..training_common import (LossProgress, add_out_argument, add_run_arguments, apply_threads, cli_argv, cli_main,
                               force_finite_, pack_optimizer, print_summary, register_cli, state_step,
                               step_generator, step_loop, tensors_under, unpack_optimizer)
from . import data as vdata
from .geometry import LABEL_DIM, fit_label_standardization
from .loading import METHOD, NETWORK_CLASS
from .precond import NVPrecond

PathLike = Union[str, Path]

EMA_FILE = "network-ema.safetensors"
STATE_FILE = "training-state.safetensors"
STATE_METHOD = "vivid-training-state"

# The demo network: the VIVID architecture (source encoder + cross-attention denoiser) cut down to
# 32 px so that it trains in an hour and samples in seconds on two CPU cores.
DEMO_NETWORK: Dict[str, Any] = dict(
    img_resolution=32, img_channels=3, label_dim=20, use_fp16=False, model_channels=32,
    channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=32, extra_attn=None,
    dropout=0.0, epipolar_attention_bias=False, no_time_enc=False, depth_input=False, warp_depth_coor=False,
    super_res=False, uncond=False, noisy_sr=None)

# Procedural units (orbit radius 2.6) -> label units: keeps the translation entries near the range
# of the published RealEstate10K statistics. (With the default "fitted" label statistics the scale
# no longer matters to the net; it is kept so that published-statistics runs stay comparable.)
DEMO_TRANSLATION_SCALE = 0.25

# Pairs matched to the demo's evaluation (``data.procedural_eval_set``: targets at the source's
# elevation, azimuth offsets +-15..90 degrees): source elevation 5..35 degrees, the target within
# +-5 degrees of it, azimuth offsets uniform in +-100 degrees.
DEMO_DATA: Dict[str, Any] = {"kind": "procedural", "elevation_deg": [5.0, 35.0], "elevation_change_deg": [-5.0, 5.0],
                             "azimuth_offset_deg": [-100.0, 100.0]}

# The committed demo model's recipe: one run from scratch on the matched pairs, camera labels
# standardised with statistics fitted to them. EDM2's schedule and power-function EMA do not depend
# on the run's length, so the checkpoint after k steps of a longer run equals a k-step run.
# Settings that are not listed are the TrainConfig defaults.
DEMO_RECIPE: Dict[str, Any] = dict(data=DEMO_DATA, total_steps=14500, batch_size=16, ref_lr=0.01,
                                   lr_ref_steps=2000, lr_rampup_steps=100, seed=0, label_statistics="fitted")


LABEL_STATISTICS = ("fitted", "published")
LABEL_FIT_PAIRS = 1024  # pairs drawn (generator seeded by the run's seed) to fit "fitted" label statistics


@dataclass
class TrainConfig:
    """Everything a run depends on (stored with its checkpoints).

    ``data``: ``{"kind": "procedural"}`` (optional ``elevation_deg``, ``azimuth_offset_deg``,
    ``elevation_change_deg`` (None: independent elevations), ``radius``, ``fov_deg``,
    ``samples_per_pixel``; default: the demo's :data:`DEMO_DATA`), ``{"kind": "folders", "paths": [...]}`` or
    ``{"kind": "re10k", "pose_files": [...], "stride": 1, "max_gap": None}``; ignored when
    ``train`` is given data directly. Step counts replace EDM2's image counts (t = steps * batch).
    """

    network: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEMO_NETWORK))
    data: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEMO_DATA))
    translation_scale: float = DEMO_TRANSLATION_SCALE
    homography_fraction: float = 0.0
    total_steps: int = 1000
    batch_size: int = 16
    accumulation_rounds: int = 1
    ref_lr: float = 0.01
    lr_ref_steps: int = 2000
    lr_rampup_steps: int = 100
    P_mean: float = -0.8
    P_std: float = 1.6
    ema_stds: List[float] = field(default_factory=lambda: [0.05, 0.10])
    ema_export_std: float = 0.10
    force_finite: bool = True
    seed: int = 0
    out_dir: Optional[str] = None
    checkpoint_every: int = 500
    resume: bool = True
    device: str = "cpu"
    reproduce: str = ""  # the command line that made this run (stored in the checkpoint meta)
    # Fine-tuning: start from the weights of this VIVID network file (our safetensors + JSON, e.g. a
    # previous run's network-ema.safetensors) instead of a random initialisation; the optimizer,
    # schedule and EMAs start afresh. Its constructor must equal ``network``.
    init_from: Optional[str] = None
    # "fitted": standardise the camera label with statistics of this run's own pairs (stored in the
    # network's constructor as label_standardization); "published": RealEstate10K's constants, as the
    # published nets. The published RealEstate10K STDs make orbit labels ~5x too large, which swamps
    # the noise-level embedding they are summed with. With init_from, the start network's choice is kept.
    label_statistics: str = "fitted"

    def __post_init__(self):
        if self.batch_size % self.accumulation_rounds:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by accumulation_rounds "
                             f"{self.accumulation_rounds}")
        if self.ema_export_std not in self.ema_stds:
            raise ValueError(f"ema_export_std {self.ema_export_std} must be one of ema_stds {self.ema_stds}")
        if self.total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {self.total_steps}")
        if self.label_statistics not in LABEL_STATISTICS:
            raise ValueError(f"label_statistics must be one of {LABEL_STATISTICS}, got {self.label_statistics!r}")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# Config fields a resumed run must share with the saved one (the rest: length, paths, device, logging,
# which tracked EMA is exported).
RECIPE_FIELDS = ("data", "translation_scale", "homography_fraction", "batch_size", "ref_lr",
                 "lr_ref_steps", "lr_rampup_steps", "P_mean", "P_std", "ema_stds", "force_finite", "seed",
                 "init_from", "label_statistics")


@dataclass
class TrainResult:
    """``ema``: the exported inference net (eval mode, no grad); ``net``: the raw trained net."""

    ema: NVPrecond
    net: NVPrecond
    step: int
    losses: List[float]
    seconds: float
    ema_path: Optional[Path] = None
    state_path: Optional[Path] = None


# --------------------------------------------------------------------------------------------
# Loss, schedule, EMA.

def edm2_loss(net: NVPrecond, src: torch.Tensor, dst: torch.Tensor, geometry: Optional[torch.Tensor],
              generator: Optional[torch.Generator] = None, P_mean: float = -0.8, P_std: float = 1.6, *,
              normal: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-element EDM2 loss with learned log-variance (B, C, H, W).

    ``normal`` (B,) gives log(sigma) = P_mean + P_std * normal and ``noise`` (B, C, H, W) the unit
    noise; what is not given is drawn from ``generator`` on the CPU (device-independent streams).
    """
    batch = dst.shape[0]
    if normal is None:
        normal = torch.randn([batch], generator=generator)
    if noise is None:
        noise = torch.randn(dst.shape, generator=generator)
    sigma = (normal.to(dst.device, torch.float32).reshape(-1, 1, 1, 1) * P_std + P_mean).exp()
    sd = net.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    noisy = dst + noise.to(dst.device, dst.dtype) * sigma
    denoised, logvar = net(src, noisy, sigma.flatten(), geometry, return_logvar=True)
    return weight / logvar.exp() * (denoised - dst) ** 2 + logvar


def learning_rate(step: int, ref_lr: float, ref_steps: int, rampup_steps: int) -> float:
    """EDM2 schedule: ref_lr / sqrt(max(step / ref_steps, 1)), times a linear ramp-up over ``rampup_steps``."""
    lr = ref_lr
    if ref_steps > 0:
        lr /= math.sqrt(max(step / ref_steps, 1))
    if rampup_steps > 0:
        lr *= min(step / rampup_steps, 1)
    return lr


def std_to_exp(std: float) -> float:
    """Power-function exponent gamma of an EMA profile with relative standard deviation ``std``.

    std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), i.e. gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s = 0
    with s = std^-2; the largest real root (EDM2 Eq. 126).
    """
    s = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def exp_to_std(gamma: float) -> float:
    return math.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def power_ema_beta(std: float, step: int) -> float:
    """Decay for the update that ends at ``step`` steps: (1 - 1/step)^(gamma + 1) (EDM2 Eq. 127)."""
    return (1 - 1 / step) ** (std_to_exp(std) + 1)


class PowerFunctionEMA:
    """EDM2's power-function EMA: one averaged copy of the net per relative std.

    After t steps each copy is the average of the weights after steps 1..t with weights ~ s^gamma,
    a profile whose width is ``std`` times the training length.
    """

    def __init__(self, net: torch.nn.Module, stds: Sequence[float]):
        self.net = net
        self.stds = [float(s) for s in stds]
        self.emas = [copy.deepcopy(net).requires_grad_(False) for _ in self.stds]

    @torch.no_grad()
    def update(self, step: int) -> None:
        for std, ema in zip(self.stds, self.emas):
            beta = power_ema_beta(std, step)
            for p_net, p_ema in zip(self.net.parameters(), ema.parameters()):
                p_ema.lerp_(p_net.detach(), 1 - beta)

    @torch.no_grad()
    def get(self, std: float) -> torch.nn.Module:
        ema = self.emas[self.stds.index(float(std))]
        for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
            b_ema.copy_(b_net)
        return ema


def build_network(kwargs: Dict[str, Any], seed: int, device: Union[str, torch.device] = "cpu") -> NVPrecond:
    """A freshly initialised NVPrecond, its random weights and Fourier buffers fixed by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: leaves the caller's CUDA RNG alone
        net = NVPrecond(**copy.deepcopy(kwargs))
    return net.to(device)


def init_description(path: PathLike) -> Dict[str, Any]:
    """What a fine-tuning run started from: file, SHA-256 and the start network's own provenance."""
    import hashlib

    path = Path(path)
    _, config = load_with_config(path)
    meta = config.get("meta", {})
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "step": meta.get("step"),
            "reproduce": meta.get("reproduce", ""), "init_from": meta.get("init_from")}


@torch.no_grad()
def load_initial_weights(net: NVPrecond, path: PathLike, network: Dict[str, Any]) -> None:
    """Copy the weights of the VIVID network file ``path`` into ``net`` (constructors must match)."""
    tensors, config = load_with_config(path)
    if config.get("method") != METHOD or config.get("constructor") != json.loads(json.dumps(network)):
        raise CheckpointError(path, "init_from must be a VIVID network with this run's constructor "
                                    f"{network}; got method {config.get('method')!r}, "
                                    f"constructor {config.get('constructor')}")
    net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)


def demo_recipe(out_dir: PathLike = "/tmp/vivid_runs/demo", steps: Optional[int] = None,
                checkpoint_every: int = 250) -> TrainConfig:
    """The run that makes the demo model (:data:`DEMO_RECIPE`, writing into ``out_dir``); its EMA
    is the demo model. ``steps`` shortens or lengthens it."""
    config = TrainConfig(**copy.deepcopy(DEMO_RECIPE), out_dir=str(out_dir), checkpoint_every=checkpoint_every)
    if steps is not None:
        config.total_steps = steps
    config.reproduce = _recipe_command(config)
    return config


def demo_command(out_dir: PathLike = "/tmp/vivid_runs/demo", threads: int = 1, checkpoint_every: int = 250) -> str:
    """The command line of :func:`demo_recipe` (what the demo model's JSON meta records)."""
    return _recipe_command(demo_recipe(out_dir, checkpoint_every=checkpoint_every), threads)


def _recipe_command(config: TrainConfig, threads: int = 1) -> str:
    data = {k: v for k, v in config.data.items() if k != "kind"}
    argv = ["--out", config.out_dir, "--steps", str(config.total_steps), "--batch", str(config.batch_size),
            "--lr", f"{config.ref_lr:g}", "--lr-ref-steps", str(config.lr_ref_steps),
            "--rampup-steps", str(config.lr_rampup_steps), "--label-statistics", config.label_statistics,
            "--seed", str(config.seed), "--threads", str(threads), "--checkpoint-every", str(config.checkpoint_every),
            "--log-every", "50", "--procedural", json.dumps(data)]
    return shlex.join(["python", "-m", "nvs_core.vivid.training", *argv])


# --------------------------------------------------------------------------------------------
# Data from the config.

def pairs_from_config(config: TrainConfig, imsize: int):
    """The pair source a config describes (procedural, folders or RealEstate10K sequences)."""
    spec = dict(config.data)
    kind = spec.get("kind", "procedural")
    if kind == "procedural":
        change = spec.get("elevation_change_deg")
        ranges = vdata.OrbitRanges(
            elevation=tuple(math.radians(v) for v in spec.get("elevation_deg", (0.0, 40.0))),
            azimuth_offset=tuple(math.radians(v) for v in spec.get("azimuth_offset_deg", (-120.0, 120.0))),
            radius=float(spec.get("radius", 2.6)), fov=math.radians(float(spec.get("fov_deg", 45.0))),
            elevation_change=None if change is None else tuple(math.radians(v) for v in change))
        return vdata.ProceduralPairs(imsize, vdata.TRAIN_SEEDS, ranges, config.translation_scale,
                                     samples_per_pixel=int(spec.get("samples_per_pixel", 4)))
    if kind == "folders":
        from ..multiview import load_folder

        views = [load_folder(p) for p in spec.get("paths", [])]
    elif kind == "re10k":
        from ..realestate10k import read_sequence

        views = [read_sequence(p, stride=int(spec.get("stride", 1))) for p in spec.get("pose_files", [])]
    else:
        raise ValueError(f"unknown data kind {kind!r}: expected 'procedural', 'folders' or 're10k'")
    if not views:
        raise ValueError(f"data kind {kind!r} lists no paths")
    return vdata.pair_source(views, imsize, config.translation_scale, config.homography_fraction,
                             max_gap=spec.get("max_gap"))


def with_label_standardization(config: TrainConfig, pairs) -> TrainConfig:
    """``config`` with the label statistics its network is trained with put into ``network``.

    Kept when ``network`` already names them (a resumed or explicit config); inherited from the
    start network with ``init_from``; else fitted on :data:`LABEL_FIT_PAIRS` pairs drawn from a
    generator seeded by ``seed`` (deterministic, so a resumed run fits the same) for "fitted".
    """
    network = config.network
    if "label_standardization" in network or int(network.get("label_dim", 0)) != LABEL_DIM:
        return config
    if config.init_from:
        _, start = load_with_config(config.init_from)
        stats = start.get("constructor", {}).get("label_standardization")
    elif config.label_statistics == "fitted":
        generator = torch.Generator().manual_seed(config.seed + 0x5EED)  # apart from the per-step streams
        batches = [pairs.sample(min(256, LABEL_FIT_PAIRS - done), generator).geometry
                   for done in range(0, LABEL_FIT_PAIRS, 256)]
        stats = fit_label_standardization(torch.cat(batches), int(network["img_resolution"]))
    else:
        stats = None
    if stats is None:
        return config
    return dataclasses.replace(config, network={**copy.deepcopy(network), "label_standardization": stats})


# --------------------------------------------------------------------------------------------
# Checkpoints.

def ema_config(config: TrainConfig, step: int, std: float) -> Dict[str, Any]:
    return {"method": METHOD, "class": NETWORK_CLASS, "constructor": copy.deepcopy(config.network),
            "meta": {"source": "nvs_core.vivid.training", "step": step, "ema_std": std,
                     "images_seen": step * config.batch_size, "training": config.to_dict(),
                     "reproduce": config.reproduce,
                     "init_from": init_description(config.init_from) if config.init_from else None}}


def save_ema(path: PathLike, net: torch.nn.Module, config: TrainConfig, step: int, std: float) -> Path:
    """The inference network in our converted format (``load_vivid`` reads it)."""
    path = Path(path)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in net.state_dict().items()}
    save_with_config(path, state, ema_config(config, step, std))
    return path


def save_training_state(path: PathLike, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: PowerFunctionEMA, config: TrainConfig, step: int, losses: Sequence[float]) -> Path:
    """Raw net, EMA copies and Adam moments as tensors; step, config and optimizer settings as JSON."""
    path = Path(path)
    tensors: Dict[str, torch.Tensor] = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, e in enumerate(ema.emas):
        tensors.update({f"ema{i}.{k}": v for k, v in e.state_dict().items()})
    groups = pack_optimizer(optimizer, tensors)
    tensors["meta.step"] = torch.tensor(step, dtype=torch.int64)
    meta = {"step": step, "training": config.to_dict(), "ema_stds": ema.stds, "param_groups": groups,
            "rng": {"scheme": "step_generator(seed, step)", "seed": config.seed},
            "losses": [float(x) for x in losses], "torch": torch.__version__}
    save_with_config(path, tensors, {"method": STATE_METHOD, "class": NETWORK_CLASS,
                                     "constructor": copy.deepcopy(config.network), "meta": meta})
    return path


def saved_step(out_dir: PathLike) -> int:
    """The step of the training state saved in ``out_dir`` (0 when there is none)."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return 0
    _, config = load_with_config(path)
    return int(config.get("meta", {}).get("step", 0))


def load_training_state(path: PathLike, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: PowerFunctionEMA, config: TrainConfig) -> tuple:
    """Restore what :func:`save_training_state` wrote; returns (step, losses)."""
    tensors, cfg = load_with_config(path)
    if cfg.get("method") != STATE_METHOD:
        raise CheckpointError(path, f"expected a VIVID training state (method {STATE_METHOD!r}), "
                                    f"got {cfg.get('method')!r}")
    if cfg.get("constructor") != json.loads(json.dumps(config.network)):
        raise CheckpointError(path, "the saved network kwargs differ from this run's: "
                                    f"{cfg.get('constructor')} vs {config.network}")
    meta = cfg["meta"]
    saved = meta.get("training", {})
    changed = [k for k in RECIPE_FIELDS if k in saved and saved[k] != config.to_dict()[k]]
    if changed:
        raise CheckpointError(path, f"resuming with a different recipe ({', '.join(changed)}); "
                                    "start a new run (another --out) or pass --no-resume")
    step = state_step(path, tensors, meta)
    if [float(s) for s in meta["ema_stds"]] != ema.stds:
        raise CheckpointError(path, f"saved EMA stds {meta['ema_stds']} differ from this run's {ema.stds}")
    net.load_state_dict(tensors_under(tensors, "net."), strict=True)
    for i, e in enumerate(ema.emas):
        e.load_state_dict(tensors_under(tensors, f"ema{i}."), strict=True)
    unpack_optimizer(optimizer, tensors, meta["param_groups"])
    return step, [float(x) for x in meta.get("losses", [])]


# --------------------------------------------------------------------------------------------
# The loop.

def train(config: Union[TrainConfig, Dict[str, Any]], progress: Optional[ProgressFactory] = None,
          callback: Optional[Callable[[Dict[str, Any]], None]] = None, data=None) -> TrainResult:
    """Train (or resume) a VIVID network; see the module docstring for the recipe.

    ``data``: a MultiView, a list of them, or a pair source (``data.py``); default: from
    ``config.data``. ``callback`` gets {step, loss, lr, seconds} after every step. ``progress``
    counts steps and checks for interruption after each one; on interruption the training state
    is saved (when ``out_dir`` is set) before the exception propagates. Inside ComfyUI run this
    under ``torch.inference_mode(False)``.
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    if torch.is_inference_mode_enabled():
        raise RuntimeError("VIVID training needs autograd: call train() under torch.inference_mode(False)")
    device = torch.device(config.device)
    imsize = int(config.network["img_resolution"])
    pairs = pairs_from_config(config, imsize) if data is None else vdata.pair_source(
        data, imsize, config.translation_scale, config.homography_fraction)
    config = with_label_standardization(config, pairs)

    net = build_network(config.network, config.seed, device)
    if config.init_from:
        load_initial_weights(net, config.init_from, config.network)
    net = net.train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.0, betas=(0.9, 0.99), eps=1e-8)
    ema = PowerFunctionEMA(net, config.ema_stds)
    out_dir = Path(config.out_dir) if config.out_dir else None
    state_path = out_dir / STATE_FILE if out_dir else None
    ema_path = out_dir / EMA_FILE if out_dir else None
    step, losses = 0, []
    if config.resume and state_path is not None and state_path.is_file():
        step, losses = load_training_state(state_path, net, optimizer, ema, config)

    def checkpoint(step: int) -> None:
        save_training_state(state_path, net, optimizer, ema, config, step, losses)
        save_ema(ema_path, ema.get(config.ema_export_std), config, step, config.ema_export_std)

    rounds = config.accumulation_rounds
    desc = "VIVID training"
    start_time = time.perf_counter()

    def one_step(step: int) -> float:
        generator = step_generator(config.seed, step)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        # The whole batch and its noise are drawn first, so accumulation rounds only split work.
        pairs_batch = pairs.sample(config.batch_size, generator)
        normal = torch.randn([config.batch_size], generator=generator)
        noise = torch.randn(pairs_batch.dst.shape, generator=generator)
        dropout_seed = int(torch.randint(1 << 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(dropout_seed)  # CPU dropout; every preset has none
            for chunk in torch.arange(config.batch_size).chunk(rounds):
                part = pairs_batch[chunk].to(device)
                loss = edm2_loss(net, part.src, part.dst, part.geometry, P_mean=config.P_mean,
                                 P_std=config.P_std, normal=normal[chunk], noise=noise[chunk])
                loss.sum().mul(1 / config.batch_size).backward()
                step_loss += float(loss.detach().mean()) / rounds
        lr = learning_rate(step, config.ref_lr, config.lr_ref_steps, config.lr_rampup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if config.force_finite:
            force_finite_(net.parameters())
        optimizer.step()
        step += 1
        ema.update(step)
        losses.append(step_loss)
        if callback is not None:
            callback({"step": step, "loss": step_loss, "lr": lr,
                      "seconds": time.perf_counter() - start_time})
        return step_loss

    step = step_loop(resolve(progress, config.total_steps, desc), desc, step, config.total_steps, one_step,
                     checkpoint if out_dir is not None else None, config.checkpoint_every)
    if out_dir is not None:
        checkpoint(step)  # also when resumed at the end: the files then carry this run's config and command
    exported = copy.deepcopy(ema.get(config.ema_export_std)).to(torch.float32).train(False).requires_grad_(False)
    return TrainResult(exported, net, step, losses, time.perf_counter() - start_time,
                       ema_path if out_dir else None, state_path if out_dir else None)


# --------------------------------------------------------------------------------------------
# Command line.

def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``vivid-train`` on an argparse subparsers object (``python -m nvs_core``)."""
    return register_cli(subparsers, "vivid-train", configure_parser, run_cli,
                        help="train a VIVID network (EDM2 recipe) on view pairs",
                        description="Train or resume a VIVID network. Writes network-ema.safetensors "
                                    "(+ .json, loadable as a VIVID model) and a resumable "
                                    "training-state into --out.")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    add_out_argument(parser)
    parser.add_argument("--steps", type=int, default=d.total_steps, help="total optimizer steps")
    parser.add_argument("--batch", type=int, default=d.batch_size, help="pairs per step")
    parser.add_argument("--accumulation", type=int, default=d.accumulation_rounds,
                        help="split each step's batch into this many backward passes")
    parser.add_argument("--lr", type=float, default=d.ref_lr, help="reference learning rate (EDM2 ref_lr)")
    parser.add_argument("--lr-ref-steps", type=int, default=d.lr_ref_steps,
                        help="steps after which lr decays as 1/sqrt(t) (EDM2 ref_batches)")
    parser.add_argument("--rampup-steps", type=int, default=d.lr_rampup_steps, help="linear lr ramp-up length")
    parser.add_argument("--p-mean", type=float, default=d.P_mean, help="log-sigma mean of training noise")
    parser.add_argument("--p-std", type=float, default=d.P_std, help="log-sigma std of training noise")
    parser.add_argument("--ema-std", type=float, default=d.ema_export_std,
                        help="relative std of the exported power-function EMA (0.05 is also tracked)")
    parser.add_argument("--network", default=None,
                        help="JSON object of NVPrecond kwargs overriding the 32-px demo network")
    parser.add_argument("--folder", action="append", default=[], help="multi-view image folder (repeatable)")
    parser.add_argument("--re10k", action="append", default=[],
                        help="RealEstate10K pose file with its frames folder next to it (repeatable)")
    parser.add_argument("--stride", type=int, default=1, help="RealEstate10K frame stride")
    parser.add_argument("--max-gap", type=int, default=None, help="largest frame distance within a pair")
    parser.add_argument("--procedural", default=None,
                        help="JSON object of procedural data options merged over the demo's "
                             f"{json.dumps({k: v for k, v in DEMO_DATA.items() if k != 'kind'})}")
    parser.add_argument("--homography-fraction", type=float, default=0.0,
                        help="fraction of single-image rotation-homography pairs (folders / re10k data)")
    parser.add_argument("--translation-scale", type=float, default=d.translation_scale,
                        help="scene units -> label units for the camera translation")
    parser.add_argument("--label-statistics", choices=LABEL_STATISTICS, default=d.label_statistics,
                        help="camera-label standardisation: fitted to this run's pairs, or RealEstate10K's "
                             "published constants (kept from the start network with --init-from)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--init-from", default=None,
                        help="fine-tune: start from this VIVID network file (e.g. a run's network-ema.safetensors)")
    add_run_arguments(parser, checkpoint_every=d.checkpoint_every, log_every=100)


def config_from_args(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> TrainConfig:
    d = TrainConfig()
    network = copy.deepcopy(DEMO_NETWORK)
    if args.network:
        network.update(json.loads(args.network))
    if args.folder:
        data: Dict[str, Any] = {"kind": "folders", "paths": list(args.folder), "max_gap": args.max_gap}
    elif args.re10k:
        data = {"kind": "re10k", "pose_files": list(args.re10k), "stride": args.stride, "max_gap": args.max_gap}
    else:
        data = copy.deepcopy(DEMO_DATA)
        if getattr(args, "procedural", None):
            data.update(json.loads(args.procedural))
            data["kind"] = "procedural"
    ema_stds = sorted({0.05, 0.10, float(args.ema_std)})
    reproduce = shlex.join(["python", "-m", "nvs_core.vivid.training", *argv]) if argv is not None else ""
    return TrainConfig(network=network, data=data, translation_scale=args.translation_scale,
                       homography_fraction=args.homography_fraction, total_steps=args.steps,
                       batch_size=args.batch, accumulation_rounds=args.accumulation, ref_lr=args.lr,
                       lr_ref_steps=args.lr_ref_steps, lr_rampup_steps=args.rampup_steps, P_mean=args.p_mean,
                       P_std=args.p_std, ema_stds=ema_stds, ema_export_std=float(args.ema_std), seed=args.seed,
                       out_dir=args.out, checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
                       device=args.device, reproduce=reproduce, init_from=getattr(args, "init_from", None),
                       label_statistics=getattr(args, "label_statistics", d.label_statistics))


def run_cli(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = config_from_args(args, cli_argv(args, "vivid-train"))
    result = train(config, progress=lambda total, desc: LossProgress(total, desc, args.log_every))
    print_summary(result)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main("python -m nvs_core.vivid.training", __doc__.splitlines()[0], configure_parser, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
