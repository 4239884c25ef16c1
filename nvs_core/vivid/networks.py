"""VIVID networks: EDM2 U-Net blocks with joint self/cross attention to a source-view encoder.

Module and parameter names follow the published checkpoints exactly (``enc.16x16_block0.conv_res0``,
``dec.8x8_in0.x_attn_kv`` ...), so their state dicts load with ``strict=True``.

Layout of a U-Net (R = resolution of a level, C = channels of that level):
  enc: ``RxR_conv`` (level 0) or ``RxR_down``, then ``RxR_block0..num_blocks-1``;
  dec: ``RxR_in0`` (always attention) + ``RxR_in1`` at the deepest level, else ``RxR_up``;
       then ``RxR_block0..num_blocks``, each fed ``mp_cat(x, skip)``.
Attention sits where R is in ``attn_resolutions``, or (``extra_attn``, never at level 0) at encoder
block ``extra_attn`` and decoder block ``num_blocks - extra_attn``.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample


class Block(nn.Module):
    """EDM2 encoder/decoder block with optional self-attention (EDM2 Fig. 21).

    flavor 'enc': resample -> [conv_skip] -> pixel norm -> residual branch.
    flavor 'dec': resample -> residual branch on x -> [conv_skip] on x.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: Optional[float] = 256, resolution: Optional[int] = None):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.resolution = resolution  # output resolution; used to shape zero features (uncond)

        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # per-channel modulation by the embedding
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        return mp_sum(x, y, t=self.res_balance)

    def _attention(self, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q^T k / sqrt(c_h)) v over pixels, plus the source pixels' k/v when given.

        q/k/v are interleaved per channel: channel (head * c_h + j) * 3 + s holds part s of channel j.
        """
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)
        if source is not None:
            kv = self.x_attn_kv(source)
            kv = kv.reshape(kv.shape[0], self.num_heads, -1, 2, kv.shape[2] * kv.shape[3])
            source_k, source_v = normalize(kv, dim=2).unbind(3)
            # One joint softmax over the target's own pixels followed by the source pixels.
            k = torch.cat([k, source_k], dim=-1)
            v = torch.cat([v, source_v], dim=-1)
        weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        y = torch.einsum("nhqk,nhck->nhcq", weights, v)
        return self.attn_proj(y.reshape(n, c, h, w))

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip_act is None else x.clip(-self.clip_act, self.clip_act)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, emb)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        return self._clip(x)


class XAttnBlock(Block):
    """Block whose attention also attends to a source-view feature map (keys/values appended).

    ``features`` is the matching UNetEncoder output, or zeros for the unconditional net: zero
    keys/values still take part in the softmax (logit 0, value 0).
    """

    def __init__(self, *args, epipolar_attention_bias: bool = False, imsize: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.imsize = imsize
        self.x_attn_kv = None
        if self.num_heads:
            self.x_attn_kv = MPConv(self.out_channels, self.out_channels * 2, kernel=[1, 1])
            # Published key order: ..., attn_qkv, x_attn_kv, attn_proj.
            self._modules["attn_proj"] = self._modules.pop("attn_proj")
        # Off in every published preset; the parameter exists only so such state dicts load.
        self.epipolar_mixing = (nn.Parameter(torch.zeros(4, self.num_heads))
                                if self.num_heads and epipolar_attention_bias else None)

    def forward(self, x: torch.Tensor, features: torch.Tensor, emb: torch.Tensor,
                geometry: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.epipolar_mixing is not None:
            raise ValueError("this VIVID network uses the epipolar attention bias, which ComfyUI-NVS does not support "
                             "(no published VIVID model uses it)")
        x = self._residual(x, emb)
        if self.num_heads:
            x = mp_sum(x, self._attention(x, source=features), t=self.attn_balance)
        return self._clip(x)


class UNet(nn.Module):
    """EDM2 U-Net (EDM2 Fig. 21) with the camera label as class embedding.

    emb = mp_silu(mp_sum(emb_noise(fourier(c_noise)), emb_label(geometry), label_balance)).
    The input gets a constant ones channel appended; ``cond_channels`` extra input channels are
    reserved for a conditioning image (SR).
    """

    cross_attention = False  # XAttnUNet: attention blocks are XAttnBlocks fed encoder features
    has_output = True  # UNetEncoder: no out_conv / out_gain

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: Optional[int] = None,
                 channel_mult_emb: Optional[int] = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, extra_attn: Optional[int] = None,
                 epipolar_attention_bias: bool = False, out_channels: Optional[int] = None,
                 cond_channels: int = 0, **block_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.cnoise = cnoise
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self._epipolar_attention_bias = epipolar_attention_bias
        self._block_kwargs = block_kwargs
        self._emb_channels = cemb
        if self.has_output:
            self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        def has_attention(res: int, level: int, extra_index: int) -> bool:
            return res in attn_resolutions or (extra_attn is not None and extra_attn == extra_index and level != 0)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = img_channels + cond_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, kernel=[3, 3])
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = self._block(cout, cout, "enc", res, resample_mode="down")
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = self._block(
                    cout, channels, "enc", res, attention=has_attention(res, level, idx))
                cout = channels

        # Decoder.
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = self._block(cout, cout, "dec", res, attention=True)
                self.dec[f"{res}x{res}_in1"] = self._block(cout, cout, "dec", res)
            else:
                self.dec[f"{res}x{res}_up"] = self._block(cout, cout, "dec", res, resample_mode="up")
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = self._block(
                    cout + skips.pop(), channels, "dec", res, attention=has_attention(res, level, num_blocks - idx))
                cout = channels

        if self.has_output:
            self.out_conv = MPConv(cout, out_channels if out_channels is not None else img_channels, kernel=[3, 3])

    def _block(self, in_channels: int, out_channels: int, flavor: str, res: int, attention: bool = False,
               resample_mode: str = "keep") -> Block:
        common = dict(flavor=flavor, resample_mode=resample_mode, resolution=res, **self._block_kwargs)
        if attention and self.cross_attention:
            return XAttnBlock(in_channels, out_channels, self._emb_channels, attention=True,
                              epipolar_attention_bias=self._epipolar_attention_bias,
                              imsize=self.img_resolution, **common)
        return Block(in_channels, out_channels, self._emb_channels, attention=attention, **common)

    def embed(self, c_noise: torch.Tensor, geometry: Optional[torch.Tensor]) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(geometry), t=self.label_balance)
        return mp_silu(emb)

    def _run_block(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor,
                   features: Optional[Iterator[torch.Tensor]], geometry: Optional[torch.Tensor]) -> torch.Tensor:
        if isinstance(block, XAttnBlock):
            return block(x, next(features), emb, geometry=geometry)
        if isinstance(block, MPConv):
            return block(x)
        return block(x, emb)

    def _unet(self, x: torch.Tensor, c_noise: torch.Tensor, geometry: Optional[torch.Tensor],
              features: Optional[Iterator[torch.Tensor]] = None,
              collect: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Shared forward; ``collect`` receives the outputs of attention blocks (UNetEncoder)."""
        emb = self.embed(c_noise, geometry)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = self._run_block(block, x, emb, features, geometry)
            if collect is not None and getattr(block, "num_heads", 0):
                collect.append(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = self._run_block(block, x, emb, features, geometry)
            if collect is not None and block.num_heads:
                collect.append(x)
        if self.has_output:
            x = self.out_conv(x, gain=self.out_gain)
        return x

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, geometry: Optional[torch.Tensor]) -> torch.Tensor:
        return self._unet(x, c_noise, geometry)


class UNetEncoder(UNet):
    """Source-view encoder: the U-Net without output layer, returning its attention-block outputs.

    Trailing decoder blocks without attention never influence those outputs, so they are dropped
    (the published checkpoints do not contain them).
    """

    has_output = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in reversed(list(self.dec.keys())):
            if self.dec[name].num_heads:
                break
            del self.dec[name]

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, geometry: Optional[torch.Tensor]) -> List[torch.Tensor]:
        features: List[torch.Tensor] = []
        self._unet(x, c_noise, geometry, collect=features)
        return features


class XAttnUNet(UNet):
    """The denoiser: attention blocks are XAttnBlocks consuming encoder features in execution order
    (encoder blocks, then decoder blocks). The output always has 3 (RGB) channels."""

    cross_attention = True

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("out_channels", 3)
        super().__init__(*args, **kwargs)

    def cross_attention_blocks(self) -> List[XAttnBlock]:
        return [b for b in list(self.enc.values()) + list(self.dec.values()) if isinstance(b, XAttnBlock)]

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor], c_noise: torch.Tensor,
                geometry: Optional[torch.Tensor]) -> torch.Tensor:
        expected = len(self.cross_attention_blocks())
        if len(features) != expected:
            raise ValueError(f"{type(self).__name__} needs {expected} source feature maps, got {len(features)}")
        return self._unet(x, c_noise, geometry, features=iter(features))


class SRXAttnUNet(XAttnUNet):
    """Super-resolution denoiser: the low-res conditioning image enters as extra input channels
    (input conv: 2 * img_channels + 1), and attention heads have 32 channels."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, **kwargs):
        kwargs["channels_per_head"] = 32
        super().__init__(img_resolution, img_channels, label_dim, cond_channels=img_channels, **kwargs)
