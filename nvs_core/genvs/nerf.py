"""Frustum lifting, the NeRF MLP averaged over source views, and the 64 + 64-sample volume renderer.

Conventions (GeNVS, OpenGL): camera-to-world poses with x right, y up, the camera looking along -z;
world up +z; the scene lives in the cube [-bound, bound]^3. Source volumes are (B, V, C*D, H, W) with
channel k = c*D + d; depth plane 0 is the far end (camera distance + 1), plane D-1 the near end.
Intrinsics are (fx, fy, cx, cy) in pixels of the render grid; ``camera_k`` = fx/cx = 1/tan(half FOV).

Rays whose cube intersection lies behind the camera (far < near after the min_near clamp) render the
background like rays that miss; the published renderer marches them backwards (negative deltas).

Rendering is chunked over rays: :func:`rays_per_chunk` turns a memory budget into a chunk size, so a
64x64 render from six full-size source volumes stays within ``memory_mb`` of working memory (the
volumes themselves are not counted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_RENDER_MEMORY_MB = 512


class FieldBlock(nn.Module):
    """``dense`` + softplus (the first layer of the published MLP)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dense = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.dense(x))


class FieldMLP(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, hidden: int, num_layers: int):
        super().__init__()
        if num_layers == 1:
            layers: List[nn.Module] = [nn.Linear(dim_in, dim_out)]
        else:
            layers = [FieldBlock(dim_in, hidden)] + [FieldBlock(hidden, hidden) for _ in range(num_layers - 2)]
            layers.append(nn.Linear(hidden, dim_out))
        self.net = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


@dataclass
class SourceViews:
    """What the field needs of the conditioning views: volumes, c2w poses and ``camera_k``."""

    volumes: torch.Tensor      # (B, V, C*D, H, W)
    poses: torch.Tensor        # (B, V, 4, 4) float32, OpenGL c2w
    camera_k: torch.Tensor     # (B,) float64 (the published loader collates it as a Python float)

    def __post_init__(self):
        if self.volumes.ndim != 5 or self.poses.shape[:2] != self.volumes.shape[:2] or self.poses.shape[2:] != (4, 4):
            raise ValueError(f"source volumes (B,V,C,H,W) {tuple(self.volumes.shape)} and poses (B,V,4,4) "
                             f"{tuple(self.poses.shape)} must agree in B and V")
        self.camera_k = torch.as_tensor(self.camera_k, dtype=torch.float64, device=self.poses.device).reshape(-1)
        if self.camera_k.numel() == 1:
            self.camera_k = self.camera_k.expand(self.poses.shape[0])


class NeRFField(nn.Module):
    """``nerf``: the frustum-volume field. Buffers ``aabb_train``/``aabb_infer`` as in the checkpoint."""

    def __init__(self, resolution_z: int = 64, sigma_color_rank: int = 16, color_feat_dim: int = 16,
                 hidden_dim: int = 64, num_layers: int = 2, bound: float = 1.0, min_near: float = 0.5):
        super().__init__()
        self.resolution_z, self.color_feat_dim = resolution_z, color_feat_dim
        self.bound, self.min_near = bound, min_near
        aabb = torch.tensor([-bound, -bound, -bound, bound, bound, bound], dtype=torch.float32)
        self.register_buffer("aabb_train", aabb)
        self.register_buffer("aabb_infer", aabb.clone())
        self.sigma_color_net = FieldMLP(sigma_color_rank, 1 + color_feat_dim, hidden_dim, num_layers)

    # ---------------------------------------------------------------- lifting
    def cam_coords(self, points: torch.Tensor, src: SourceViews) -> torch.Tensor:
        """World points (B, *P, 3) -> volume coordinates (B, V, *P, 3) in [-1, 1] for every source view."""
        B, V = src.poses.shape[:2]
        lead = points.shape[1:-1]
        pts = points.reshape(B, 1, -1, 3)
        R = src.poses[:, :, :3, :3]
        T = src.poses[:, :, :3, 3]
        d = T.norm(dim=-1)                                                 # per source view, not camera_d
        q = torch.einsum("bvij,bvpi->bvpj", R, pts - T[:, :, None, :])    # R^T (p - T)
        z = q[..., 2] + d[:, :, None]
        denom = torch.clamp(d[:, :, None] - z, min=1e-6)
        k = src.camera_k.to(q.device)[:, None, None]
        # float64 product as upstream (camera_k is float64), stored back to float32
        xy = (k[..., None] * q[..., :2].double() / denom[..., None].double()).to(q.dtype)
        x = torch.cat([xy, z[..., None]], dim=-1)
        lo, hi = self.aabb_train[:3], self.aabb_train[3:]
        x = torch.minimum(torch.maximum(x, lo), hi)
        x = 2 * (x - lo) / (hi - lo) - 1
        return x.reshape(B, V, *lead, 3)

    def raw(self, points: torch.Tensor, src: SourceViews) -> torch.Tensor:
        """(B, *P, 3) -> raw MLP outputs averaged over source views (B, *P, 1 + F)."""
        B, V, C, H, W = src.volumes.shape
        D = self.resolution_z
        coords = self.cam_coords(points, src)
        lead = coords.shape[2:-1]
        grid = coords.reshape(B * V, 1, 1, -1, 3).to(src.volumes.dtype)
        vol = src.volumes.reshape(B * V, C // D, D, H, W)
        feat = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        feat = feat.reshape(B, V, C // D, -1).transpose(-1, -2)            # (B, V, P, C/D)
        out = self.sigma_color_net(feat.to(self.sigma_color_net.net[-1].weight.dtype))
        return out.mean(dim=1).reshape(B, *lead, -1)                        # mean before the activations

    def forward(self, points: torch.Tensor, src: SourceViews):
        out = self.raw(points, src)
        return F.softplus(out[..., 0]), torch.sigmoid(out[..., 1:])

    def floats_per_sample_view(self) -> int:
        """Working floats per (sample, source view) in one field evaluation, for chunk sizing."""
        linears = [m for m in self.sigma_color_net.modules() if isinstance(m, nn.Linear)]
        rank, hidden = linears[0].in_features, max(m.out_features for m in linears[:-1]) if len(linears) > 1 else 0
        return 6 + 2 * rank + 2 * hidden + 2 * (1 + self.color_feat_dim)


# -------------------------------------------------------------------------------------------- rays
def get_rays(poses: torch.Tensor, intrinsics: torch.Tensor, H: int, W: int):
    """Rays through pixel centres of an H x W grid for c2w ``poses`` (N,4,4) and one (fx,fy,cx,cy).

    Pixel (row j, column i) is ray j*W + i. Returns origins and unit directions (N, H*W, 3).
    """
    device, dtype = poses.device, poses.dtype
    fx, fy, cx, cy = [v for v in intrinsics.to(device=device, dtype=dtype).reshape(-1)[:4]]
    i = torch.linspace(0, W - 1, W, device=device, dtype=dtype)[None, :].expand(H, W).reshape(1, H * W) + 0.5
    j = torch.linspace(0, H - 1, H, device=device, dtype=dtype)[:, None].expand(H, W).reshape(1, H * W) + 0.5
    zs = -torch.ones_like(i)
    dirs = torch.stack(((i - cx) / fx, -(j - cy) / fy, zs), dim=-1)
    dirs = dirs / torch.sqrt(torch.clamp((dirs * dirs).sum(-1, keepdim=True), min=1e-20))
    rays_d = dirs @ poses[:, :3, :3].transpose(-1, -2)
    rays_o = poses[:, None, :3, 3].expand_as(rays_d)
    return rays_o, rays_d


def near_far_from_bound(rays_o: torch.Tensor, rays_d: torch.Tensor, bound: float = 1.0, min_near: float = 0.5):
    """Slab test against the cube [-bound, bound]^3; misses get near = far = 1e9 (pure background)."""
    tmin = (-bound - rays_o) / (rays_d + 1e-15)
    tmax = (bound - rays_o) / (rays_d + 1e-15)
    near = torch.where(tmin < tmax, tmin, tmax).amax(dim=-1, keepdim=True)
    far = torch.where(tmin > tmax, tmin, tmax).amin(dim=-1, keepdim=True)
    miss = far < near
    near = torch.where(miss, torch.full_like(near, 1e9), near)
    far = torch.where(miss, torch.full_like(far, 1e9), far)
    return torch.clamp(near, min=min_near), far


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples: bins (..., T), weights (..., T-1), u (..., n) in [0, 1)."""
    weights = weights + 1e-5
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, -1)], -1)
    u = u.contiguous()
    inds = torch.searchsorted(cdf.contiguous(), u, right=True)
    below = torch.clamp(inds - 1, min=0)
    above = torch.clamp(inds, max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    return bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)


def _composite_weights(z: torch.Tensor, sigma: torch.Tensor, last_delta: torch.Tensor) -> torch.Tensor:
    deltas = torch.cat([z[..., 1:] - z[..., :-1], last_delta.expand_as(z[..., :1])], dim=-1)
    alphas = 1 - torch.exp(-deltas * sigma)
    shifted = torch.cat([torch.ones_like(alphas[..., :1]), 1 - alphas + 1e-15], dim=-1)
    return alphas * torch.cumprod(shifted, dim=-1)[..., :-1]


def render_rays(field: NeRFField, rays_o: torch.Tensor, rays_d: torch.Tensor, src: SourceViews,
                jitter: torch.Tensor, pdf_u: Optional[torch.Tensor] = None, num_steps: int = 64,
                upsample_steps: int = 64, details: Optional[Dict[str, torch.Tensor]] = None):
    """Render rays (B, N, 3) against the field: returns features (B,N,F), depth (B,N), opacity (B,N).

    ``jitter`` (B, N, num_steps) is the U[0,1) stratified jitter (always applied, as published);
    ``pdf_u`` (B, N, upsample_steps) the importance-sample positions, None for the deterministic
    midpoints (eval mode). The field is evaluated once on the coarse and once on the fine samples;
    the composite reuses those values after sorting.
    """
    near, far = near_far_from_bound(rays_o, rays_d, field.bound, field.min_near)
    # The cube lies entirely behind the camera (or closer than min_near): the published code would march
    # backwards (negative deltas); such rays render the background like any other miss.
    behind = far < near
    near = torch.where(behind, torch.full_like(near, 1e9), near)
    far = torch.where(behind, torch.full_like(far, 1e9), far)
    ramp = torch.linspace(0.0, 1.0, num_steps, device=rays_o.device, dtype=rays_o.dtype)
    z = near + (far - near) * ramp
    sample_dist = (far - near) / num_steps
    z = z + (jitter - 0.5) * sample_dist
    xyz = rays_o[..., None, :] + rays_d[..., None, :] * z[..., None]
    raw = field.raw(xyz, src)
    sigma = F.softplus(raw[..., 0])
    if upsample_steps > 0:
        with torch.no_grad():
            weights = _composite_weights(z, sigma, sample_dist)
            mids = z[..., :-1] + 0.5 * (z[..., 1:] - z[..., :-1])
            if pdf_u is None:
                u = torch.linspace(0.5 / upsample_steps, 1 - 0.5 / upsample_steps, upsample_steps,
                                   device=z.device, dtype=z.dtype).expand(*z.shape[:-1], upsample_steps)
            else:
                u = pdf_u.to(z)
            z_fine = sample_pdf(mids, weights[..., 1:-1], u).detach()
            xyz_fine = rays_o[..., None, :] + rays_d[..., None, :] * z_fine[..., None]
        raw_fine = field.raw(xyz_fine, src)
        if details is not None:
            details.update(coarse_z=z, coarse_xyz=xyz, coarse_sigma=sigma, pdf_bins=mids,
                           pdf_weights=weights[..., 1:-1], fine_z=z_fine)
        z, order = torch.sort(torch.cat([z, z_fine], dim=-1), dim=-1)
        xyz = torch.cat([xyz, xyz_fine], dim=-2).gather(-2, order[..., None].expand(*order.shape, 3))
        raw = torch.cat([raw, raw_fine], dim=-2)
        raw = raw.gather(-2, order[..., None].expand(*order.shape, raw.shape[-1]))
        sigma = F.softplus(raw[..., 0])
    color = torch.sigmoid(raw[..., 1:])
    weights = _composite_weights(z, sigma, sample_dist)
    opacity = weights.sum(-1)
    depth = (weights * z).sum(-1)
    features = (weights[..., None] * color).sum(-2) + (1 - opacity)[..., None]   # white background
    if details is not None:
        details.update(sorted_z=z, sorted_xyz=xyz, sorted_sigma=sigma, sorted_color=color, weights=weights)
    return features, depth, opacity


def rays_per_chunk(field: NeRFField, num_views: int, memory_mb: float = DEFAULT_RENDER_MEMORY_MB,
                   num_steps: int = 64, upsample_steps: int = 64) -> int:
    """Rays per chunk so that one chunk's working tensors fit in ``memory_mb``."""
    per_ray = 4 * (num_steps + upsample_steps) * (num_views * field.floats_per_sample_view() + 48)
    return max(1, int(memory_mb * 2 ** 20 // per_ray))


@dataclass
class RenderDraws:
    """The renderer's random draws, in the published order: an unused randn(3) (a light direction),
    the stratified jitter (B, Q, N, num_steps), and in train mode the importance u (B*Q*N, upsample)."""

    jitter: torch.Tensor
    pdf_u: Optional[torch.Tensor] = None

    @staticmethod
    def draw(B: int, Q: int, N: int, num_steps: int = 64, upsample_steps: int = 64, random_importance: bool = False,
             generator: Optional[torch.Generator] = None) -> "RenderDraws":
        torch.randn(3, generator=generator)
        jitter = torch.rand(B, Q, N, num_steps, generator=generator)
        pdf_u = torch.rand(B * Q * N, upsample_steps, generator=generator) if random_importance else None
        return RenderDraws(jitter, pdf_u)


def render_views(field: NeRFField, tgt_poses: torch.Tensor, intrinsics: torch.Tensor, src: SourceViews,
                 H: int = 64, W: int = 64, draws: Optional[RenderDraws] = None, random_importance: bool = False,
                 generator: Optional[torch.Generator] = None, memory_mb: float = DEFAULT_RENDER_MEMORY_MB,
                 num_steps: int = 64, upsample_steps: int = 64,
                 check: Optional[Callable[[], None]] = None):
    """``render_multi_view``: render Q target poses (B, Q, 4, 4) from the source views.

    Returns features (B,Q,F,H,W), depth (B,Q,1,H,W) and opacity (B,Q,1,H,W). The draws are made for
    the whole render before chunking (or taken from ``draws``), so chunk size never changes a result.
    ``random_importance`` = the published train-mode path (random instead of midpoint importance u).
    """
    B, Q = tgt_poses.shape[:2]
    if src.poses.shape[0] != B:
        raise ValueError(f"target poses have batch {B} but the source views have {src.poses.shape[0]}")
    N = H * W
    device = src.volumes.device
    if draws is None:
        draws = RenderDraws.draw(B, Q, N, num_steps, upsample_steps, random_importance, generator)
    rays_o, rays_d = get_rays(tgt_poses.reshape(B * Q, 4, 4).to(device=device, dtype=torch.float32),
                              intrinsics, H, W)
    rays_o, rays_d = rays_o.reshape(B, Q * N, 3), rays_d.reshape(B, Q * N, 3)
    jitter = draws.jitter.to(device).reshape(B, Q * N, num_steps)
    pdf_u = None if draws.pdf_u is None else draws.pdf_u.to(device).reshape(B, Q * N, upsample_steps)
    chunk = rays_per_chunk(field, src.volumes.shape[1], memory_mb, num_steps, upsample_steps)
    feats, depths, opacities = [], [], []
    for start in range(0, Q * N, chunk):
        sl = slice(start, start + chunk)
        f, d, o = render_rays(field, rays_o[:, sl], rays_d[:, sl], src, jitter[:, sl],
                              None if pdf_u is None else pdf_u[:, sl], num_steps, upsample_steps)
        feats.append(f)
        depths.append(d)
        opacities.append(o)
        if check is not None:
            check()
    Fdim = field.color_feat_dim
    features = torch.cat(feats, 1).reshape(B, Q, H, W, Fdim).permute(0, 1, 4, 2, 3).contiguous()
    depth = torch.cat(depths, 1).reshape(B, Q, 1, H, W)
    opacity = torch.cat(opacities, 1).reshape(B, Q, 1, H, W)
    return features, depth, opacity


def upsample_condition(features: torch.Tensor) -> torch.Tensor:
    """(..., F, H, W) render -> (N, F, 2H, 2W) nearest x2: the denoiser's condition."""
    return F.interpolate(features.reshape(-1, *features.shape[-3:]), scale_factor=2, mode="nearest")
