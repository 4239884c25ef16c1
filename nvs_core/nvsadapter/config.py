"""The NVS-Adapter's shape: which UNet transformer blocks are wrapped, their width, heads and posemb level.

One config describes the published full-size model (SD 2.1 base, ``SD21_BASE``), the tiny golden model and
the tiny test models; every module, key name and parameter count comes from it.

Rules (published ``ThreeDiMAdapter._set_unet_info`` / ``_wrap_unet`` / ``_set_posemb``):
- UNet level l (0..L-1, L = len(channel_mult)) has width ``model_channels * channel_mult[l]``; its resolution
  is ``latent_resolution / 2**l``;
- the per-input-block level list is (num_res_blocks + 1) copies of each l; output blocks use it reversed;
  the middle block uses the deepest level. So every wrapped block gets the level it runs at;
- a block at level l is wrapped when ``2**l`` is in ``attention_resolutions``; the middle block always;
- ``support_emb`` has ``(latent_resolution / 2**l)**2 * query_emb_scale`` learnable tokens;
- ``pe_blocks.l`` = Conv2d(posemb_dim -> width_l, kernel = stride = 2**l) for every level.

``layers()`` lists the wrapped blocks in UNet call order; its index is the SD backend's layer index
(0..15 for SD 1.x/2.x, ARCHITECTURE.md section 2).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, List, Mapping, Tuple

POSEMB_DIM = 144
OFFSET_DEG = (0, 15)     # moment frequencies 2^0..2^14
DIRECTION_DEG = (0, 8)   # direction frequencies 2^0..2^7
ADAPTER_MODULES = ("cross_view_attn_module", "image_attn_module", "support_query_attn", "query_out_attn")
ADAPTER_KEY_MARKERS = (".support_emb", ".cross_view_attn_module.", ".image_attn_module.", ".support_query_attn.",
                       ".query_out_attn.")


@dataclass(frozen=True)
class AdapterLayer:
    """One wrapped transformer block."""

    index: int            # call order 0..n-1
    name: str             # LDM block, e.g. "input_blocks.1.1", "middle_block.1", "output_blocks.3.1"
    channels: int
    heads: int
    level: int            # pe_blocks index / resolution level
    tokens: int           # learnable support_emb tokens

    @property
    def prefix(self) -> str:
        """Key prefix of this block's adapter tensors inside ``NVSAdapter.state_dict()``."""
        return f"unet.{self.name}.transformer_blocks.0."


@dataclass(frozen=True)
class NVSAdapterConfig:
    model_channels: int = 320
    channel_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    context_dim: int = 1024           # the SD text context width the adapter was trained with
    image_context_dim: int = 1024     # CLIP ViT-H projected image embedding
    posemb_dim: int = POSEMB_DIM
    latent_resolution: int = 32
    query_emb_scale: float = 1.0
    offset_deg: Tuple[int, int] = OFFSET_DEG
    direction_deg: Tuple[int, int] = DIRECTION_DEG

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions", "offset_deg", "direction_deg"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        if self.model_channels <= 0 or not self.channel_mult or self.num_res_blocks <= 0:
            raise ValueError(f"invalid NVS-Adapter UNet shape: model_channels {self.model_channels}, "
                             f"channel_mult {self.channel_mult}, num_res_blocks {self.num_res_blocks}")
        for width in self.widths:
            if width % self.num_head_channels:
                raise ValueError(f"width {width} is not a multiple of num_head_channels {self.num_head_channels}")
        expected = (self.offset_deg[1] - self.offset_deg[0] + self.direction_deg[1] - self.direction_deg[0]) * 6 + 6
        if self.posemb_dim != expected:
            raise ValueError(f"posemb_dim {self.posemb_dim} does not match the ray embedding bands "
                             f"{self.offset_deg}/{self.direction_deg} ({expected} channels)")
        if self.latent_resolution % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError(f"latent_resolution {self.latent_resolution} is not divisible by "
                             f"{2 ** (len(self.channel_mult) - 1)} (the deepest level)")

    # ------------------------------------------------------------------------------------ derived
    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def widths(self) -> Tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def tokens(self, level: int) -> int:
        side = int(self.latent_resolution / 2 ** level)
        return int(side * side * self.query_emb_scale)

    def _layer(self, index: int, name: str, level: int) -> AdapterLayer:
        width = self.widths[level]
        return AdapterLayer(index, name, width, width // self.num_head_channels, level, self.tokens(level))

    def layers(self) -> List[AdapterLayer]:
        """The wrapped transformer blocks in UNet call order (input, middle, output)."""
        attention = [2 ** level in self.attention_resolutions for level in range(self.levels)]
        names: List[Tuple[str, int]] = []
        block = 1
        for level in range(self.levels):
            for _ in range(self.num_res_blocks):
                if attention[level]:
                    names.append((f"input_blocks.{block}.1", level))
                block += 1
            block += 1  # the downsample block (or the extra list entry of the last level)
        names.append(("middle_block.1", self.levels - 1))
        block = 0
        for level in reversed(range(self.levels)):
            for _ in range(self.num_res_blocks + 1):
                if attention[level]:
                    names.append((f"output_blocks.{block}.1", level))
                block += 1
        return [self._layer(i, name, level) for i, (name, level) in enumerate(names)]

    # ---------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("channel_mult", "attention_resolutions", "offset_deg", "direction_deg"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NVSAdapterConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NVS-Adapter config entries {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_published_sd_config(cls, sd_config: Mapping[str, Any], **adapter) -> "NVSAdapterConfig":
        """From the published yaml's ``sd_config`` params plus adapter options (image_context_dim, ...)."""
        return cls(model_channels=sd_config["model_channels"], channel_mult=tuple(sd_config["channel_mult"]),
                   num_res_blocks=sd_config["num_res_blocks"],
                   attention_resolutions=tuple(sd_config["attention_resolutions"]),
                   num_head_channels=sd_config["num_head_channels"], context_dim=sd_config["context_dim"],
                   **{k: v for k, v in adapter.items() if k in cls.__dataclass_fields__})


# The released ``base_query_4`` model (configs/base.yaml): SD 2.1 base, CLIP ViT-H image embedding.
SD21_BASE = NVSAdapterConfig()
# The tiny SD-layout test model of ``nvs_core.sd.tiny.TINY_UNET`` (16 layers, widths 32/32/64/64, latent 16).
TINY_SD = NVSAdapterConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=2,
                           attention_resolutions=(4, 2, 1), num_head_channels=16, context_dim=32,
                           image_context_dim=24, latent_resolution=16)
