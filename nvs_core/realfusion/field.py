"""The RealFusion radiance field (``nerf/network_grid.py:NeRFNetwork`` of ``lukemelas/realfusion``).

One module holds what a published ``df.pth`` ``model`` entry holds, under the same keys and in the
same order: the occupancy buffers (``aabb_train``, ``aabb_infer``, ``density_grid``,
``density_bitfield``, ``step_counter``), the tiled grid ``encoder``, ``sigma_net`` and ``bg_net``.

- density ``sigma = trunc_exp(h0 + blob(x))`` with the blob ``blob_density * exp(-|x|^2 / (2 r^2))``
  added before the exponential; albedo ``sigmoid(h[1:4])``;
- coarse-to-fine: ``grid_levels_mask = k > 0`` zeroes the last ``k`` levels' features (all of them
  when ``k`` exceeds the level count, published behaviour); the flag is not stored in checkpoints;
- normals: central differences of sigma (eps 1e-2, each probe clamped to the box), ``n = -grad``,
  normalised with ``nan_to_num``;
- shading ``albedo | textureless | lambertian | normal`` with ``ratio + (1 - ratio) * max(n.l, 0)``;
- background: ``sigmoid(bg_net(freq(d)))`` on the ray direction (training only, as published);
- the 128^3 occupancy grid (``update_occupancy``): ``grid = max(decay * grid, sigma(cell))``, bitfield
  at ``min(mean_density, density_thresh)``, cells and bits in Morton order.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .grid import TiledGridEncoder

SHADINGS = ("albedo", "textureless", "lambertian", "normal")


@dataclass
class FieldConfig:
    """Constructor arguments; the defaults are the published ``--O`` options (the real ``df.pth``)."""

    bound: float = 0.75
    grid_levels: int = 16
    grid_resolution: float = 2048          # desired finest resolution = grid_resolution * bound
    level_dim: int = 2
    base_resolution: int = 16
    log2_hashmap_size: int = 16
    desired_resolution: Optional[float] = None  # overrides grid_resolution * bound when set
    num_layers: int = 3
    hidden_dim: int = 64
    num_layers_bg: int = 2
    hidden_dim_bg: int = 64
    bg_radius: float = 1.4                 # > 0: a background network exists
    freq_degree: int = 6                   # background frequency encoding (39 features)
    blob_density: float = 5.0
    blob_radius: float = 0.2
    grid_levels_mask: int = 8              # the constructor's value; loaders of trained fields set 0
    density_thresh: float = 10.0
    grid_size: int = 128                   # occupancy grid cells per axis
    init_std: float = 1e-4                 # embeddings ~ U(-init_std, init_std)

    @property
    def finest_resolution(self) -> float:
        return self.desired_resolution if self.desired_resolution is not None else self.grid_resolution * self.bound

    @property
    def cascade(self) -> int:
        return 1 + max(0, math.ceil(math.log2(self.bound)))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FieldConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown RealFusion field option(s) {unknown}; expected some of {sorted(names)}")
        return cls(**dict(values))


# ------------------------------------------------------------------------------ small pieces

class _TruncExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) whose gradient uses exp(min(x, 15)) (published ``activation.trunc_exp``)."""
    return _TruncExp.apply(x)


def safe_normalize(x: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    return x / torch.sqrt(torch.clamp(torch.sum(x * x, -1, keepdim=True), min=eps))


_HALF_PI_F32 = float(torch.tensor(math.pi, dtype=torch.float32) / 2)


def freq_encode(x: torch.Tensor, degree: int = 6, kernel: bool = True) -> torch.Tensor:
    """[x, sin(x), cos(x), sin(2x), cos(2x), ..., sin(2^(degree-1) x), cos(...)]: 3 + 6 * degree values.

    ``kernel=True`` follows the CUDA ``freqencoder`` (cos as ``sin(x 2^k + float32(pi/2))``), which the
    background network uses; ``kernel=False`` is the torch ``FreqEncoder_torch`` (``torch.cos``).
    The two differ by a few 1e-6 at large arguments.
    """
    out = [x]
    for k in range(degree):
        xk = x * float(2 ** k)
        out.append(torch.sin(xk))
        out.append(torch.sin(xk + _HALF_PI_F32) if kernel else torch.cos(xk))
    return torch.cat(out, dim=-1)


class FreqEncoder(nn.Module):
    """Stateless module form of :func:`freq_encode` (the published ``encoder_bg``; no state-dict keys)."""

    def __init__(self, input_dim: int = 3, degree: int = 6, kernel: bool = True):
        super().__init__()
        self.input_dim, self.degree, self.kernel = input_dim, degree, kernel
        self.output_dim = input_dim * (1 + 2 * degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return freq_encode(x, self.degree, self.kernel)


class MLP(nn.Module):
    """Linear layers with ReLU between them, under ``net.<i>`` (the published key layout)."""

    def __init__(self, dim_in: int, dim_out: int, dim_hidden: int, num_layers: int):
        super().__init__()
        self.net = nn.ModuleList(
            nn.Linear(dim_in if i == 0 else dim_hidden, dim_out if i == num_layers - 1 else dim_hidden)
            for i in range(num_layers))

    def forward(self, x):
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i != len(self.net) - 1:
                x = F.relu(x)
        return x


# ------------------------------------------------------------------------------ Morton order

def _expand_bits(v: torch.Tensor) -> torch.Tensor:
    v = (v * 0x00010001) & 0xFF0000FF
    v = (v * 0x00000101) & 0x0F00F00F
    v = (v * 0x00000011) & 0xC30C30C3
    v = (v * 0x00000005) & 0x49249249
    return v


def morton3d(coords: torch.Tensor) -> torch.Tensor:
    """Morton codes (bits x0 y0 z0 x1 y1 z1 ...) of integer cell coordinates [N, 3] in [0, 1024)."""
    c = coords.to(torch.int64)
    return _expand_bits(c[..., 0]) | (_expand_bits(c[..., 1]) << 1) | (_expand_bits(c[..., 2]) << 2)


def _compact_bits(x: torch.Tensor) -> torch.Tensor:
    x = x & 0x49249249
    x = (x | (x >> 2)) & 0xC30C30C3
    x = (x | (x >> 4)) & 0x0F00F00F
    x = (x | (x >> 8)) & 0xFF0000FF
    x = (x | (x >> 16)) & 0x0000FFFF
    return x


def morton3d_invert(index: torch.Tensor) -> torch.Tensor:
    i = index.to(torch.int64)
    return torch.stack([_compact_bits(i), _compact_bits(i >> 1), _compact_bits(i >> 2)], dim=-1)


def packbits(grid: torch.Tensor, thresh: float) -> torch.Tensor:
    """Bit i of byte n is set where ``grid[8n + i] > thresh`` (float32 comparison)."""
    occupied = grid.reshape(-1, 8) > torch.tensor(thresh, dtype=torch.float32)
    weights = (1 << torch.arange(8, device=grid.device, dtype=torch.int64))
    return (occupied.to(torch.int64) * weights).sum(-1).to(torch.uint8)


# ------------------------------------------------------------------------------ the field

class RealFusionField(nn.Module):
    """Tiled grid + small MLP radiance field with a frequency-encoded background network."""

    def __init__(self, config: Optional[FieldConfig] = None, **overrides):
        super().__init__()
        config = dataclasses.replace(config or FieldConfig(), **overrides)
        if config.bound > 1:
            raise ValueError(f"bound must be <= 1 (one occupancy cascade, as published), got {config.bound}")
        if config.num_layers < 1 or config.level_dim < 1:
            raise ValueError("num_layers and level_dim must be >= 1")
        self.config = config
        self.bound = float(config.bound)
        self.grid_size = int(config.grid_size)
        b = self.bound
        aabb = torch.tensor([-b, -b, -b, b, b, b], dtype=torch.float32)
        self.register_buffer("aabb_train", aabb)
        self.register_buffer("aabb_infer", aabb.clone())
        cells = self.grid_size ** 3
        self.register_buffer("density_grid", torch.zeros(config.cascade, cells))
        self.register_buffer("density_bitfield", torch.zeros(config.cascade * cells // 8, dtype=torch.uint8))
        self.register_buffer("step_counter", torch.zeros(16, 2, dtype=torch.int32))
        self.encoder = TiledGridEncoder(config.grid_levels, config.level_dim, config.base_resolution,
                                        config.log2_hashmap_size, config.finest_resolution,
                                        init_std=config.init_std)
        self.in_dim = self.encoder.output_dim
        self.sigma_net = MLP(self.in_dim, 4, config.hidden_dim, config.num_layers)
        self.encoder_bg = FreqEncoder(3, config.freq_degree, kernel=True)
        self.bg_in_dim = self.encoder_bg.output_dim
        self.bg_net = (MLP(self.bg_in_dim, 3, config.hidden_dim_bg, config.num_layers_bg)
                       if config.bg_radius > 0 else None)
        self.grid_levels_mask = int(config.grid_levels_mask)
        self.mean_density = 0.0
        self.iter_density = 0
        self.mean_count = 0
        self.local_step = 0

    # ------------------------------------------------------------------ parameter groups
    def param_groups(self, lr: float):
        """Adam groups as published: grid at 10x the learning rate, MLPs at ``lr``."""
        groups = [{"params": list(self.encoder.parameters()), "lr": lr * 10},
                  {"params": list(self.sigma_net.parameters()), "lr": lr}]
        if self.bg_net is not None:
            groups.append({"params": list(self.bg_net.parameters()), "lr": lr})
        return groups

    # ------------------------------------------------------------------ field queries
    def level_mask(self, device=None) -> Optional[torch.Tensor]:
        """[in_dim] float mask of the coarse-to-fine schedule, or None when all levels are on."""
        if self.grid_levels_mask <= 0:
            return None
        keep = self.in_dim - self.grid_levels_mask * self.config.level_dim
        return (torch.arange(self.in_dim, device=device) < keep).float()

    def gaussian(self, x: torch.Tensor) -> torch.Tensor:
        d = (x ** 2).sum(-1)
        return self.config.blob_density * torch.exp(-d / (2 * self.config.blob_radius ** 2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x, bound=self.bound)
        mask = self.level_mask(h.device)
        return h if mask is None else h * mask

    def mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma_net(self.features(x))

    def common_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.mlp_out(x)
        sigma = trunc_exp(h[..., 0] + self.gaussian(x))
        albedo = torch.sigmoid(h[..., 1:])
        return sigma, albedo

    def density(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        sigma, albedo = self.common_forward(x)
        return {"sigma": sigma, "albedo": albedo}

    def finite_difference_normal(self, x: torch.Tensor, epsilon: float = 1e-2) -> torch.Tensor:
        """-grad sigma by central differences; the six probes run as one batch."""
        n = x.shape[0]
        offsets = torch.zeros(6, 1, 3, dtype=x.dtype, device=x.device)
        for axis in range(3):
            offsets[2 * axis, 0, axis] = epsilon
            offsets[2 * axis + 1, 0, axis] = -epsilon
        probes = (x[None] + offsets).clamp(-self.bound, self.bound).reshape(-1, 3)
        sigma, _ = self.common_forward(probes)
        sigma = sigma.reshape(6, n)
        grad = torch.stack([0.5 * (sigma[2 * a] - sigma[2 * a + 1]) / epsilon for a in range(3)], dim=-1)
        return -grad

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(safe_normalize(self.finite_difference_normal(x)))

    def forward(self, x: torch.Tensor, d: Optional[torch.Tensor] = None, l: Optional[torch.Tensor] = None,
                ratio: float = 1.0, shading: str = "albedo", albedo_only: bool = False):
        """(sigma [N], color [N,3], normal [N,3] or None). ``d`` is accepted and unused, as published."""
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
        if shading == "albedo":
            sigma, color = self.common_forward(x)
            normal = None if albedo_only else self.normal(x)
            return sigma, color, normal
        if l is None:
            raise ValueError(f"shading {shading!r} needs a light direction")
        sigma, albedo = self.common_forward(x)
        normal = self.normal(x)
        lambertian = ratio + (1 - ratio) * (normal @ l.to(normal.dtype)).clamp(min=0)
        if shading == "textureless":
            color = lambertian.unsqueeze(-1).repeat(1, 3)
        elif shading == "normal":
            color = (normal + 1) / 2
        else:
            color = albedo * lambertian.unsqueeze(-1)
        return sigma, color, normal

    @property
    def has_background(self) -> bool:
        return self.bg_net is not None

    def background(self, d: torch.Tensor) -> torch.Tensor:
        if self.bg_net is None:
            raise ValueError("this field has no background network (bg_radius <= 0)")
        return torch.sigmoid(self.bg_net(self.encoder_bg(d)))

    # ------------------------------------------------------------------ occupancy grid
    @torch.no_grad()
    def reset_occupancy(self) -> None:
        self.density_grid.zero_()
        self.density_bitfield.zero_()
        self.step_counter.zero_()
        self.mean_density, self.iter_density, self.mean_count, self.local_step = 0.0, 0, 0, 0

    @torch.no_grad()
    def cell_centres(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(morton index [H^3], world point [H^3, 3]) of every occupancy cell, as the update samples them."""
        H = self.grid_size
        r = torch.arange(H, dtype=torch.int32, device=device)
        coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
        xyz = 2 * coords.float() / (H - 1) - 1
        half = self.bound / H
        return morton3d(coords), xyz * (self.bound - half)

    @torch.no_grad()
    def update_occupancy(self, decay: float = 0.95, jitter: bool = True, generator: Optional[torch.Generator] = None,
                         chunk: int = 1 << 18, density_fn=None) -> None:
        """The published ``update_extra_state``: refresh the density grid, bitfield and mean step count.

        ``jitter`` adds U(-1, 1) * bound / H to each cell sample (published); ``density_fn`` replaces
        the field's own density (tests with analytic fields).
        """
        if self.config.cascade != 1:
            raise ValueError("only one occupancy cascade is supported (bound <= 1)")
        device = self.density_grid.device
        index, xyz = self.cell_centres(device)
        if jitter:
            noise = torch.rand(xyz.shape, generator=generator,
                               device=generator.device if generator is not None else device).to(device)
            xyz = xyz + (noise * 2 - 1) * (self.bound / self.grid_size)
        fn = density_fn or (lambda p: self.density(p)["sigma"])
        tmp = torch.full_like(self.density_grid, -1.0)
        for start in range(0, xyz.shape[0], chunk):
            tmp[0, index[start:start + chunk]] = fn(xyz[start:start + chunk]).reshape(-1).to(tmp.dtype)
        valid = self.density_grid >= 0
        self.density_grid.copy_(torch.where(valid, torch.maximum(self.density_grid * decay, tmp), self.density_grid))
        self.mean_density = torch.mean(self.density_grid[valid]).item()
        self.iter_density += 1
        self.density_bitfield.copy_(packbits(self.density_grid, self.occupancy_threshold))
        total = min(16, self.local_step)
        if total > 0:
            self.mean_count = int(self.step_counter[:total, 0].sum().item() / total)
        self.local_step = 0

    @property
    def occupancy_threshold(self) -> float:
        return min(self.mean_density, self.config.density_thresh)

    def occupied_cells(self) -> int:
        """Number of set bits in the occupancy bitfield."""
        bits = self.density_bitfield.long()
        return int(sum(((bits >> i) & 1).sum() for i in range(8)))

    def occupancy_fraction(self) -> float:
        """Fraction of occupied cells in the bitfield."""
        return self.occupied_cells() / (self.density_bitfield.numel() * 8)

    def extra_repr(self) -> str:
        return f"bound={self.bound}, grid_levels_mask={self.grid_levels_mask}, mean_density={self.mean_density:.4g}"


def parameter_count(field: RealFusionField) -> int:
    return sum(p.numel() for p in field.parameters())
