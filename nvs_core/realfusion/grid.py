"""RealFusion's tiled multi-resolution grid encoder in pure PyTorch (``gridtype='tiled'``).

This reproduces the published CUDA kernel (stable-dreamfusion ``gridencoder``) exactly, including
its two quirks (golden README section 4.1):

- the per-level scale is computed in float32 (``exp2f(l * S) * base - 1``), so the finest level of
  the published config has resolution 1537 (index stride 1538), not the 1536 of the Python-side table
  that only sizes the embedding rows;
- the tiled index ``sum_d corner_d * stride_d`` stops adding axes once the running stride exceeds the
  level's row count, so at fine levels the z coordinate is dropped altogether, and the index wraps
  modulo the row count.

Inputs outside ``[-bound, bound]^3`` give zero features. Interpolation gathers the 8 corners and
weights them trilinearly; the backward pass recomputes the corners and scatters ``w * grad`` into the
embedding rows (no per-corner tensors are kept between forward and backward, so memory stays at the
inputs). There is no gradient with respect to the input points (the field's normals are finite
differences, as published).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

# Points per gather chunk: bounds the transient [chunk, 8] index / weight tensors.
DEFAULT_CHUNK = 1 << 17


@dataclass(frozen=True)
class GridLevel:
    level: int
    scale: float             # float32 kernel scale, exp2f(l * S) * base - 1
    resolution: int          # kernel resolution, ceil(scale) + 1
    resolution_python: int   # the constructor's table (sizes the rows only)
    rows: int                # rows of this level in the embedding table
    offset: int              # first row of this level
    strides: Tuple[int, ...] # index stride per input axis that enters the index (axes 0..k-1)


def per_level_scale(num_levels: int, base_resolution: int, desired_resolution: float) -> float:
    if num_levels <= 1:
        return 1.0
    return float(np.exp2(np.log2(desired_resolution / base_resolution) / (num_levels - 1)))


def level_table(num_levels: int, base_resolution: int, log2_hashmap_size: int, desired_resolution: float,
                input_dim: int = 3) -> List[GridLevel]:
    """The per-level constants of the constructor (rows, offsets) and of the kernel (scale, resolution)."""
    if num_levels < 1 or base_resolution < 1 or input_dim < 1:
        raise ValueError(f"grid needs num_levels >= 1 and base_resolution >= 1, got {num_levels}, {base_resolution}")
    s = per_level_scale(num_levels, base_resolution, desired_resolution)
    S = np.float32(np.log2(s))
    max_params = 2 ** log2_hashmap_size
    levels, offset = [], 0
    for level in range(num_levels):
        res_py = int(np.ceil(base_resolution * s ** level))
        rows = min(max_params, (res_py + 1) ** input_dim)
        rows = int(np.ceil(rows / 8) * 8)
        # exp2f of the float32 product; torch's float32 exp2 matches the fixtures' kernel transcription.
        p2 = torch.exp2(torch.tensor(np.float32(level) * S, dtype=torch.float32, device="cpu")).numpy()
        scale = np.float32(p2) * np.float32(base_resolution) - np.float32(1.0)
        resolution = int(math.ceil(float(scale))) + 1
        strides, stride = [], 1
        for _ in range(input_dim):
            if stride > rows:
                break
            strides.append(stride)
            stride *= resolution + 1
        levels.append(GridLevel(level, float(scale), resolution, res_py, rows, offset, tuple(strides)))
        offset += rows
    return levels


def normalise_points(x: torch.Tensor, bound: float) -> torch.Tensor:
    """World points to the kernel's unit cube, as the published wrapper does: (x + bound) / (2 bound)."""
    return (x + bound) / (2 * bound)


def inside_unit_cube(u: torch.Tensor) -> torch.Tensor:
    """True where every coordinate is in [0, 1] (the kernel's in-box test; NaN counts as outside)."""
    return ((u >= 0) & (u <= 1)).all(dim=-1)


_CORNER_BITS = {}


def _corner_bits(dim: int, device) -> torch.Tensor:
    key = (dim, str(device))
    if key not in _CORNER_BITS:
        c = torch.arange(1 << dim)
        _CORNER_BITS[key] = torch.stack([(c >> d) & 1 for d in range(dim)], dim=-1).bool().to(device)
    return _CORNER_BITS[key]


def corners(u: torch.Tensor, level: GridLevel) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local rows [N, 8] and trilinear weights [N, 8] of one level, for points ``u`` in the unit cube.

    Corner c has bit d set for the upper neighbour along axis d; weights are the float32 product
    over d = 0, 1, 2 in that order, as the kernel computes them.
    """
    dim = u.shape[-1]
    scale = torch.tensor(level.scale, dtype=torch.float32, device=u.device)
    pos = u.float() * scale + 0.5           # two roundings, no fused multiply-add (README 4.1)
    base = torch.floor(pos)
    frac = pos - base
    base = base.to(torch.int32)
    bits = _corner_bits(dim, u.device)                       # [8, D] bool
    weights = None
    for d in range(dim):                                     # product over d in order (float32)
        factor = torch.where(bits[:, d], frac[:, d:d + 1], 1 - frac[:, d:d + 1])
        weights = factor if weights is None else weights * factor
    index = torch.zeros(u.shape[0], bits.shape[0], dtype=torch.int32, device=u.device)
    for d, stride in enumerate(level.strides):
        index += (base[:, d:d + 1] + bits[:, d].to(torch.int32)) * stride
    return index % level.rows, weights


class _TiledGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, embeddings, levels, chunk):
        ctx.levels, ctx.chunk = levels, chunk
        ctx.save_for_backward(u)
        ctx.num_rows = embeddings.shape[0]
        return _grid_forward(u, embeddings, levels, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        (u,) = ctx.saved_tensors
        grad_emb = None
        if ctx.needs_input_grad[1]:
            grad_emb = _grid_backward(u, grad_out, ctx.num_rows, ctx.levels, ctx.chunk)
        return None, grad_emb, None, None


def _grid_forward(u: torch.Tensor, embeddings: torch.Tensor, levels, chunk: int) -> torch.Tensor:
    n, channels = u.shape[0], embeddings.shape[1]
    out = embeddings.new_zeros(n, len(levels) * channels)
    for start in range(0, n, chunk):
        uc = u[start:start + chunk]
        inside = inside_unit_cube(uc)
        uc = torch.where(inside[:, None], uc, torch.zeros_like(uc))
        for lv in levels:
            rows, weights = corners(uc, lv)
            values = embeddings.index_select(0, (rows + lv.offset).reshape(-1).long()).reshape(*rows.shape, channels)
            weights = weights.to(embeddings.dtype).unsqueeze(-1)
            acc = weights[:, 0] * values[:, 0]
            for c in range(1, rows.shape[1]):  # corner order, as the kernel sums
                acc = acc + weights[:, c] * values[:, c]
            acc = torch.where(inside[:, None], acc, torch.zeros_like(acc))
            out[start:start + chunk, lv.level * channels:(lv.level + 1) * channels] = acc
    return out


def _grid_backward(u, grad_out, num_rows, levels, chunk):
    channels = grad_out.shape[1] // len(levels)
    grad_emb = grad_out.new_zeros(num_rows, channels)
    for start in range(0, u.shape[0], chunk):
        uc = u[start:start + chunk]
        inside = inside_unit_cube(uc)
        uc = torch.where(inside[:, None], uc, torch.zeros_like(uc))
        g_chunk = grad_out[start:start + chunk]
        for lv in levels:
            rows, weights = corners(uc, lv)
            g = g_chunk[:, lv.level * channels:(lv.level + 1) * channels] * inside[:, None]
            contrib = weights.to(g.dtype).unsqueeze(-1) * g.unsqueeze(1)       # [N, 8, C]
            grad_emb.index_add_(0, (rows + lv.offset).reshape(-1).long(), contrib.reshape(-1, channels))
    return grad_emb


class TiledGridEncoder(nn.Module):
    """``encoder`` of the RealFusion field: parameter ``embeddings`` [rows, level_dim], buffer ``offsets``."""

    def __init__(self, num_levels: int = 16, level_dim: int = 2, base_resolution: int = 16,
                 log2_hashmap_size: int = 16, desired_resolution: float = 1536.0, input_dim: int = 3,
                 init_std: float = 1e-4, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.num_levels, self.level_dim, self.input_dim = num_levels, level_dim, input_dim
        self.base_resolution, self.log2_hashmap_size = base_resolution, log2_hashmap_size
        self.desired_resolution = desired_resolution
        self.levels = level_table(num_levels, base_resolution, log2_hashmap_size, desired_resolution, input_dim)
        total = self.levels[-1].offset + self.levels[-1].rows
        self.embeddings = nn.Parameter(torch.empty(total, level_dim))
        offsets = [lv.offset for lv in self.levels] + [total]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int32))
        self.output_dim = num_levels * level_dim
        self.chunk = chunk
        if init_std > 0 and self.embeddings.device.type != "meta":
            with torch.no_grad():
                self.embeddings.uniform_(-init_std, init_std)

    def forward(self, x: torch.Tensor, bound: float) -> torch.Tensor:
        prefix = x.shape[:-1]
        u = normalise_points(x.reshape(-1, self.input_dim).float(), bound)
        out = _TiledGridFunction.apply(u, self.embeddings, self.levels, self.chunk)
        return out.reshape(*prefix, self.output_dim)

    def extra_repr(self) -> str:
        return (f"levels={self.num_levels}, level_dim={self.level_dim}, base={self.base_resolution}, "
                f"rows<=2^{self.log2_hashmap_size}, finest resolution={self.levels[-1].resolution}")
