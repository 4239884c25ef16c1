"""GeNVS network configuration: one dataclass builds every size, from the tiny fixtures to the release.

The defaults are the published ``NerfDiffDLV3()`` (``manifests/genvs.json`` in the golden fixtures):
resnet34 encoder with output stride 16, a 1024-channel DeepLabV3+ decoder (16 feature channels x 64
depth planes), a 16 -> 64 -> 17 NeRF MLP, and the k-diffusion ``image_v1`` denoiser of
``config_128_mid.json`` at 128 px, conditioned on the 64-px render upsampled x2.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Sequence

# The three published k-diffusion configs differ only in their sigma limits (and training density).
NOISE_CONFIGS: Dict[str, Dict[str, float]] = {
    "low": {"sigma_min": 0.01, "sigma_max": 80.0},
    "mid": {"sigma_min": 0.03, "sigma_max": 50.0},
    "high": {"sigma_min": 0.01, "sigma_max": 80.0},
}
SAMPLE_DENSITIES: Dict[str, Dict[str, float]] = {
    "low": {"mean": -1.2, "std": 1.2},
    "mid": {"mean": 0.5, "std": 1.4},
    "high": {"mean": 1.0, "std": 1.4},
}


@dataclass
class EncoderConfig:
    """ResNet (BasicBlock) encoder; widths 64/128/256/512 are fixed by the resnet34 layout."""

    layers: List[int] = field(default_factory=lambda: [3, 4, 6, 3])
    output_stride: int = 16
    in_channels: int = 3


@dataclass
class DecoderConfig:
    channels: int = 1024                 # = feature channels x depth planes of the volume
    atrous_rates: List[int] = field(default_factory=lambda: [12, 24, 36])


@dataclass
class NeRFConfig:
    sigma_color_rank: int = 16           # feature channels per depth plane (MLP input)
    color_feat_dim: int = 16             # rendered feature channels (first three trained as RGB)
    hidden_dim: int = 64
    num_layers: int = 2
    bound: float = 1.0
    min_near: float = 0.5
    num_steps: int = 64                  # jittered uniform samples per ray
    upsample_steps: int = 64             # importance samples per ray


@dataclass
class DenoiserConfig:
    """k-diffusion ``image_v1`` behind ``DenoiserWithVariance(KarrasAugmentWrapper(.))``."""

    input_channels: int = 3
    input_size: List[int] = field(default_factory=lambda: [128, 128])
    mapping_out: int = 256
    depths: List[int] = field(default_factory=lambda: [2, 2, 2, 4, 4])
    channels: List[int] = field(default_factory=lambda: [128, 128, 256, 512, 512])
    self_attn_depths: List[bool] = field(default_factory=lambda: [False, False, False, True, True])
    mapping_cond_dim: int = 9            # the augment wrapper's 9-d conditioning
    unet_cond_dim: int = 16              # the render's channels, concatenated to the input
    dropout_rate: float = 0.05
    has_variance: bool = True
    sigma_data: float = 0.5
    sigma_min: float = 0.03
    sigma_max: float = 50.0
    sigma_sample_density: Dict[str, Any] = field(
        default_factory=lambda: {"type": "lognormal", "mean": 0.5, "std": 1.4})
    group_size: int = 32
    head_size: int = 64


@dataclass
class GeNVSConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    nerf: NeRFConfig = field(default_factory=NeRFConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    image_size: int = 128                # source images fed to the encoder (a multiple of 16)
    render_size: int = 64                # the feature render; upsampled x2 (nearest) to condition

    def __post_init__(self):
        for name, cls in (("encoder", EncoderConfig), ("decoder", DecoderConfig), ("nerf", NeRFConfig),
                          ("denoiser", DenoiserConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _from_dict(cls, value, name))
        self.validate()

    @property
    def resolution_z(self) -> int:
        """Depth planes of the volume: decoder channels / feature channels per plane."""
        return self.decoder.channels // self.nerf.sigma_color_rank

    def validate(self) -> None:
        if len(self.encoder.layers) != 4 or any(int(n) < 1 for n in self.encoder.layers):
            raise ValueError(f"encoder.layers must be four block counts >= 1, got {self.encoder.layers}")
        if self.encoder.output_stride != 16:
            raise ValueError(f"encoder.output_stride must be 16 (the published layout), got {self.encoder.output_stride}")
        if self.decoder.channels % self.nerf.sigma_color_rank:
            raise ValueError(f"decoder.channels ({self.decoder.channels}) must be a multiple of "
                             f"nerf.sigma_color_rank ({self.nerf.sigma_color_rank}): the volume is "
                             "(features x depth planes)")
        if len(self.decoder.atrous_rates) != 3:
            raise ValueError(f"decoder.atrous_rates must have three rates, got {self.decoder.atrous_rates}")
        d = self.denoiser
        if not (len(d.depths) == len(d.channels) == len(d.self_attn_depths)) or not d.depths:
            raise ValueError("denoiser.depths, channels and self_attn_depths must have the same non-zero length")
        if d.unet_cond_dim != self.nerf.color_feat_dim:
            raise ValueError(f"denoiser.unet_cond_dim ({d.unet_cond_dim}) must equal nerf.color_feat_dim "
                             f"({self.nerf.color_feat_dim}): the render is the denoiser's condition")
        if self.image_size % 16 or self.image_size <= 0:
            raise ValueError(f"image_size (encoder input) must be a positive multiple of 16, got {self.image_size}")
        if list(d.input_size) != [2 * self.render_size] * 2:
            raise ValueError(f"denoiser.input_size {list(d.input_size)} must be twice render_size "
                             f"({self.render_size}): the render is upsampled x2 to condition the denoiser")

    @property
    def diffusion_size(self) -> int:
        return 2 * self.render_size

    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping) -> "GeNVSConfig":
        return _from_dict(cls, data, "config")


def _from_dict(cls, data: Mapping, where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"GeNVS {where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"GeNVS {where}: unknown keys {unknown}; expected some of {sorted(names)}")
    return cls(**copy.deepcopy(dict(data)))


def full_config(noise: str = "mid") -> GeNVSConfig:
    """The published network (``genvs.pt``) with the sigma limits of one of the three k-diffusion configs."""
    if noise not in NOISE_CONFIGS:
        raise ValueError(f"noise config must be one of {sorted(NOISE_CONFIGS)}, got {noise!r}")
    cfg = GeNVSConfig()
    cfg.denoiser.sigma_min = NOISE_CONFIGS[noise]["sigma_min"]
    cfg.denoiser.sigma_max = NOISE_CONFIGS[noise]["sigma_max"]
    cfg.denoiser.sigma_sample_density = {"type": "lognormal", **SAMPLE_DENSITIES[noise]}
    return cfg


def tiny_config(image_size: int = 64, render_size: int = 8, decoder_channels: int = 64, color_feat_dim: int = 16,
                encoder_layers: Sequence[int] = (1, 1, 1, 1), mapping_out: int = 64,
                channels: Sequence[int] = (32, 64), self_attn: Sequence[bool] = (False, True),
                dropout_rate: float = 0.0) -> GeNVSConfig:
    """A small network of the same layout (the golden case e model by default)."""
    depths = [1] * len(channels)
    return GeNVSConfig(
        encoder=EncoderConfig(layers=list(encoder_layers)),
        decoder=DecoderConfig(channels=decoder_channels),
        nerf=NeRFConfig(sigma_color_rank=color_feat_dim, color_feat_dim=color_feat_dim),
        denoiser=DenoiserConfig(input_size=[2 * render_size] * 2, mapping_out=mapping_out, depths=depths,
                                channels=list(channels), self_attn_depths=list(self_attn),
                                unet_cond_dim=color_feat_dim, dropout_rate=dropout_rate),
        image_size=image_size, render_size=render_size)
