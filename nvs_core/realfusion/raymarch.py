"""Pure-PyTorch replacements for RealFusion's ``raymarching`` CUDA kernels (stable-dreamfusion, 2022).

Semantics follow the golden README section 4.2 (one occupancy cascade, ``dt_gamma = 0``):

- ``near_far_from_aabb``: slab test in float32, x then y then z; misses get ``near = far = FLT_MAX``;
  ``near`` is clamped to ``min_near`` (0.2, the wrapper default the published renderer uses);
- marching walks the lattice ``t += dt`` (``dt = 2 * float32(sqrt 3) / max_steps``) from
  ``t0 = near + dt * noise``; at each visited ``t`` the point (clamped to the box) is looked up in
  the 128^3 bitfield (Morton order): occupied cells emit a sample and advance one step, empty cells
  advance whole steps until the cell's exit face is passed. Samples carry ``deltas = (dt, t_new - t_last)``;
- training compositing: ``alpha = 1 - exp(-sigma * dt)``, ``w = alpha * T``, stopping after the sample
  at which ``T < T_thresh``; depth is ``sum w * t_acc`` with ``t_acc`` measured from ``t0``. Autograd
  through a cumulative product gives exactly the kernel's backward (depth receives no gradient);
- evaluation compositing (``composite_rays``): ``T = 1 - sum w``, the stop test uses ``T`` before the
  sample, and a ray also stops at an empty slot; depth accumulates the absolute ``t``.

The marcher runs all rays in lock step on tensors (no Python loop per ray), so it works on CPU and GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .field import morton3d

FLT_MAX = float(torch.finfo(torch.float32).max)
SQRT3_F32 = np.float32(1.7320508075688772)


def step_size(max_steps: int = 512) -> float:
    """The constant marching step of ``dt_gamma = 0``: float32(2 * sqrt 3) / max_steps."""
    return float(np.float32(np.float32(2) * SQRT3_F32) / np.float32(max_steps))


def near_far_from_aabb(rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: torch.Tensor, min_near: float = 0.2):
    """Per-ray (near, far) [N] of the box ``aabb`` = (xmin, ymin, zmin, xmax, ymax, zmax), float32."""
    o, d = rays_o.reshape(-1, 3).float(), rays_d.reshape(-1, 3).float()
    aabb = aabb.float().to(o.device)
    rd = 1 / d
    big = torch.full_like(o[:, 0], FLT_MAX)
    near = far = None
    miss = torch.zeros_like(o[:, 0], dtype=torch.bool)
    for axis in range(3):
        a = (aabb[axis] - o[:, axis]) * rd[:, axis]
        b = (aabb[axis + 3] - o[:, axis]) * rd[:, axis]
        lo, hi = torch.where(a > b, b, a), torch.where(a > b, a, b)
        if near is None:
            near, far = lo, hi
            continue
        miss = miss | (near > hi) | (lo > far)
        near = torch.where(lo > near, lo, near)
        far = torch.where(hi < far, hi, far)
    near = torch.where(near < min_near, torch.full_like(near, min_near), near)
    return torch.where(miss, big, near), torch.where(miss, big, far)


def occupied(bitfield: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Bit (morton % 8) of byte (morton / 8) for integer cells [N, 3]."""
    code = morton3d(cells)
    return ((bitfield[code >> 3].to(torch.int64) >> (code & 7)) & 1).bool()


def point_cells(p: torch.Tensor, bound: float, grid_size: int) -> torch.Tensor:
    """Occupancy cell of points already clamped to the box: int(clamp((p / bound + 1) * H / 2, 0, H - 1))."""
    rbound = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(bound, dtype=torch.float32)
    return ((p * rbound.to(p.device) + 1) * (grid_size / 2)).clamp(0, grid_size - 1).to(torch.int64)


@dataclass
class MarchResult:
    t: torch.Tensor        # [N, S] t of each emitted sample (before the step)
    count: torch.Tensor    # [N] samples emitted per ray
    t_start: torch.Tensor  # [N] t0 of each ray
    visits: int            # lattice points visited in all (occupancy lookups)


def march(rays_o: torch.Tensor, rays_d: torch.Tensor, t_start: torch.Tensor, fars: torch.Tensor,
          bitfield: Optional[torch.Tensor], bound: float, grid_size: int, dt: float, max_samples: int) -> MarchResult:
    """Emit up to ``max_samples`` samples per ray from ``t_start`` to ``far`` (lock-step over rays).

    ``bitfield=None`` marks every cell occupied (marching without the occupancy grid).
    """
    device = rays_o.device
    n = rays_o.shape[0]
    o, d = rays_o.float(), rays_d.float()
    dt_t = torch.tensor(dt, dtype=torch.float32, device=device)
    rd = 1 / d
    sign = torch.copysign(torch.ones_like(d), d)
    mip_bound = torch.tensor(bound, dtype=torch.float32, device=device)
    rH = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(grid_size), dtype=torch.float32)
    t = t_start.float().clone()
    count = torch.zeros(n, dtype=torch.int64, device=device)
    samples = torch.zeros(n, max(max_samples, 1), dtype=torch.float32, device=device)
    active = torch.nonzero((t < fars) & (count < max_samples)).squeeze(1)
    visits = 0
    while active.numel():
        visits += active.numel()
        ta = t[active]
        p = (o[active] + ta[:, None] * d[active]).clamp(-bound, bound)
        cells = point_cells(p, bound, grid_size)
        occ = (torch.ones(active.numel(), dtype=torch.bool, device=device) if bitfield is None
               else occupied(bitfield, cells))
        hit = active[occ]
        if hit.numel():
            samples[hit, count[hit]] = ta[occ]
            count[hit] += 1
            t[hit] = ta[occ] + dt_t
        empty = ~occ
        if empty.any():
            miss = active[empty]
            ts, ps, cs = ta[empty], p[empty], cells[empty].float()
            face = ((cs + 0.5 + 0.5 * sign[miss]) * rH.to(device) * 2 - 1) * mip_bound
            dist = (face - ps) * rd[miss]
            tmin = torch.fmin(dist[:, 0], torch.fmin(dist[:, 1], dist[:, 2]))
            target = ts + torch.fmax(torch.zeros_like(tmin), tmin)
            ts = ts + dt_t
            more = ts < target
            while more.any():
                ts = torch.where(more, ts + dt_t, ts)
                more = ts < target
            t[miss] = ts
        keep = (t[active] < fars[active]) & (count[active] < max_samples)
        active = active[keep]
    return MarchResult(samples, count, t_start.float(), visits)


def sample_deltas(res: MarchResult, dt: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(t_after [N, S], delta1 [N, S]): the t after each sample, and t_after - previous t_after (t0 first)."""
    dt_t = torch.tensor(dt, dtype=torch.float32, device=res.t.device)
    after = res.t + dt_t
    prev = torch.cat([res.t_start[:, None], after[:, :-1]], dim=1)
    return after, after - prev


# ------------------------------------------------------------------------------------- training

@dataclass
class TrainSamples:
    xyzs: torch.Tensor     # [M, 3] sample points (zero rows: padding or dropped)
    dirs: torch.Tensor     # [M, 3]
    deltas: torch.Tensor   # [M, 2]
    rays: torch.Tensor     # [N, 3] int32 (ray index, first row, count), allocated in ray order
    total: int             # samples generated (the step counter), before any cap
    visits: int


def march_rays_train(rays_o: torch.Tensor, rays_d: torch.Tensor, bound: float, bitfield: Optional[torch.Tensor],
                     grid_size: int, nears: torch.Tensor, fars: torch.Tensor, noise: Optional[torch.Tensor] = None,
                     max_steps: int = 512, align: int = 128, mean_count: int = -1,
                     force_all_rays: bool = True) -> TrainSamples:
    """``march_rays_train``: the compact sample list, padded to ``m + (align - m % align)`` rows.

    With ``force_all_rays=False`` and ``mean_count > 0`` the list has ``mean_count`` rounded up rows and
    rays whose samples would pass that end are dropped (their output is zero).
    """
    o, d = rays_o.reshape(-1, 3).float(), rays_d.reshape(-1, 3).float()
    n = o.shape[0]
    dt = step_size(max_steps)
    t0 = nears.float()
    if noise is not None:
        t0 = t0 + torch.tensor(dt, dtype=torch.float32, device=o.device) * noise.float().to(o.device)
    res = march(o, d, t0, fars.float(), bitfield, bound, grid_size, dt, max_steps)
    after, delta1 = sample_deltas(res, dt)
    counts = res.count
    offsets = torch.cumsum(counts, 0) - counts
    m = int(counts.sum())
    if force_all_rays or mean_count <= 0:
        M = m + (align - m % align) if align > 0 else m
    else:
        M = mean_count + (align - mean_count % align) if align > 0 else mean_count
    written = (offsets + counts) <= M
    S = res.t.shape[1]
    slot = torch.arange(S, device=o.device)[None]
    valid = (slot < counts[:, None]) & written[:, None]
    rows = (offsets[:, None] + slot)[valid]
    ray_of = torch.arange(n, device=o.device)[:, None].expand(n, S)[valid]
    ts = res.t[valid]
    xyzs = torch.zeros(M, 3, dtype=torch.float32, device=o.device)
    dirs = torch.zeros(M, 3, dtype=torch.float32, device=o.device)
    deltas = torch.zeros(M, 2, dtype=torch.float32, device=o.device)
    xyzs[rows] = (o[ray_of] + ts[:, None] * d[ray_of]).clamp(-bound, bound)
    dirs[rows] = d[ray_of]
    deltas[rows, 0] = dt
    deltas[rows, 1] = delta1[valid]
    rays = torch.stack([torch.arange(n, device=o.device), offsets, counts], dim=-1).to(torch.int32)
    return TrainSamples(xyzs, dirs, deltas, rays, m, res.visits)


def _dense_index(rays: torch.Tensor, M: int):
    offsets, counts = rays[:, 1].long(), rays[:, 2].long()
    valid_ray = (counts > 0) & (offsets + counts <= M)
    S = int(counts[valid_ray].max()) if valid_ray.any() else 1
    slot = torch.arange(S, device=rays.device)[None]
    valid = (slot < counts[:, None]) & valid_ray[:, None]
    index = torch.where(valid, offsets[:, None] + slot, torch.zeros_like(slot))
    return index, valid


def composite_rays_train(sigmas: torch.Tensor, values: Sequence[torch.Tensor], deltas: torch.Tensor,
                         rays: torch.Tensor, T_thresh: float = 1e-4):
    """Training compositing of several per-sample value tensors [M, C] with shared weights.

    Returns ``(weights_sum [N], depth [N], [composited values [N, C], ...])``; rows are indexed by
    ``rays[:, 0]``. Differentiable in ``sigmas`` and ``values`` (not through depth).
    """
    M = sigmas.shape[0]
    index, valid = _dense_index(rays, M)
    flat = index.reshape(-1)
    sigma = sigmas.reshape(-1)[flat].reshape(index.shape)
    delta0 = torch.where(valid, deltas[flat, 0].reshape(index.shape), torch.zeros_like(sigma))
    delta1 = torch.where(valid, deltas[flat, 1].reshape(index.shape), torch.zeros_like(sigma))
    alpha = 1 - torch.exp(-sigma * delta0)
    keep = 1 - alpha
    with torch.no_grad():  # the kernel's stop rule, in float32 as it runs
        included = torch.zeros_like(valid)
        T = torch.ones(index.shape[0], dtype=keep.dtype, device=keep.device)
        alive = torch.ones_like(T, dtype=torch.bool)
        for s in range(index.shape[1]):
            inc = alive & valid[:, s]
            included[:, s] = inc
            T = torch.where(inc, T * keep[:, s].detach(), T)
            alive = alive & ~(inc & (T < T_thresh))
            if not alive.any():
                break
    T_incl = torch.cumprod(torch.where(included, keep, torch.ones_like(keep)), dim=1)
    T_excl = torch.cat([torch.ones_like(T_incl[:, :1]), T_incl[:, :-1]], dim=1)
    weights = torch.where(included, alpha * T_excl, torch.zeros_like(alpha))
    weights_sum = weights.sum(1)
    with torch.no_grad():
        t_acc = torch.cumsum(delta1, dim=1)
        depth = (weights.detach() * t_acc).sum(1)
    out = []
    for v in values:
        dense = v[flat].reshape(*index.shape, v.shape[-1])
        out.append((weights[..., None] * dense).sum(1))
    order = rays[:, 0].long()
    if not torch.equal(order, torch.arange(len(order), device=order.device)):
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order), device=order.device)
        weights_sum, depth, out = weights_sum[inv], depth[inv], [o[inv] for o in out]
    return weights_sum, depth, out


# ------------------------------------------------------------------------------------- evaluation

def march_rays_eval(n_step: int, rays_alive: torch.Tensor, rays_t: torch.Tensor, rays_o: torch.Tensor,
                    rays_d: torch.Tensor, bound: float, bitfield: Optional[torch.Tensor], grid_size: int,
                    fars: torch.Tensor, noise: Optional[torch.Tensor] = None, max_steps: int = 512,
                    align: int = 128):
    """``march_rays``: ``n_step`` sample slots per alive ray (ray k at rows k*n_step ...), padded to align.

    Returns (xyzs [M, 3], dirs [M, 3], deltas [M, 2], visits).
    """
    n_alive = rays_alive.numel()
    dt = step_size(max_steps)
    idx = rays_alive.long()
    o, d = rays_o[idx].float(), rays_d[idx].float()
    t = rays_t[idx].float()
    if noise is not None:
        t = t + torch.tensor(dt, dtype=torch.float32, device=t.device) * noise.float()
    res = march(o, d, t, fars[idx].float(), bitfield, bound, grid_size, dt, n_step)
    _, delta1 = sample_deltas(res, dt)
    M = n_alive * n_step
    if align > 0:
        M += align - M % align
    slot = torch.arange(n_step, device=o.device)[None]
    valid = slot < res.count[:, None]
    rows = (torch.arange(n_alive, device=o.device)[:, None] * n_step + slot)[valid]
    ray_of = torch.arange(n_alive, device=o.device)[:, None].expand(n_alive, n_step)[valid]
    xyzs = torch.zeros(M, 3, dtype=torch.float32, device=o.device)
    dirs = torch.zeros(M, 3, dtype=torch.float32, device=o.device)
    deltas = torch.zeros(M, 2, dtype=torch.float32, device=o.device)
    xyzs[rows] = (o[ray_of] + res.t[:, :n_step][valid][:, None] * d[ray_of]).clamp(-bound, bound)
    dirs[rows] = d[ray_of]
    deltas[rows, 0] = dt
    deltas[rows, 1] = delta1[:, :n_step][valid]
    return xyzs, dirs, deltas, res.visits


def composite_rays_eval(n_step: int, rays_alive: torch.Tensor, rays_t: torch.Tensor, sigmas: torch.Tensor,
                        values: Sequence[torch.Tensor], deltas: torch.Tensor, weights_sum: torch.Tensor,
                        depth: torch.Tensor, images: Sequence[torch.Tensor], T_thresh: float = 1e-4) -> None:
    """``composite_rays`` in place: accumulate one chunk; finished rays get ``rays_alive = -1``."""
    n_alive = rays_alive.numel()
    idx = rays_alive.long()
    ws, dep, t = weights_sum[idx].clone(), depth[idx].clone(), rays_t[idx].clone()
    acc = [img[idx].clone() for img in images]
    sig = sigmas[:n_alive * n_step].float().reshape(n_alive, n_step)
    dl = deltas[:n_alive * n_step].reshape(n_alive, n_step, 2)
    vals = [v[:n_alive * n_step].float().reshape(n_alive, n_step, -1) for v in values]
    running = torch.ones(n_alive, dtype=torch.bool, device=sig.device)
    for k in range(n_step):
        running = running & (dl[:, k, 0] != 0)
        alpha = 1.0 - torch.exp(-sig[:, k] * dl[:, k, 0])
        T = 1 - ws
        w = alpha * T
        ws = torch.where(running, ws + w, ws)
        t = torch.where(running, t + dl[:, k, 1], t)
        dep = torch.where(running, dep + w * t, dep)
        for a, v in zip(acc, vals):
            a.copy_(torch.where(running[:, None], a + w[:, None] * v[:, k], a))
        running = running & ~(T < T_thresh)
    weights_sum[idx], depth[idx] = ws, dep
    for img, a in zip(images, acc):
        img[idx] = a
    rays_t[idx] = torch.where(running, t, rays_t[idx])
    rays_alive.copy_(torch.where(running, rays_alive, torch.full_like(rays_alive, -1)))
