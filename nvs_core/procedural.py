"""Procedural multi-view scenes with exact cameras: ground truth for demos, tests and small training runs.

A :class:`Scene` is a handful of textured primitives (sphere, oriented box, capped cylinder, torus)
inside a sphere of radius ~1 around the origin. :func:`render` ray-casts them analytically (no
meshes, no sampling noise), so depth and masks are exact and any view of a seed is reproducible.

Every primitive lives in its own local frame: ``world = center + rotation @ local``. Sizes per kind:
sphere (radius, -, -), box (half extents x, y, z), cylinder (radius, half height, -) with its axis on
local y, torus (major radius, minor radius, -) around local y. Textures are evaluated in local
coordinates so that rotations of symmetric shapes stay visible.
"""
from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import torch
from kornia.geometry.quaternion import Quaternion

from .cameras import Cameras
from .progress import ProgressFactory, silent_progress

if TYPE_CHECKING:
    from .multiview import MultiView

KINDS = ("sphere", "box", "cylinder", "torus")
TEXTURES = ("solid", "stripes", "checker")
_EPS = 1e-9  # hits closer than this to the ray origin are ignored (self-intersection guard)
_F64 = torch.float64


@dataclass
class Scene:
    """M primitives as tensors (float64, CPU); see the module docstring for the meaning of ``sizes``."""

    kinds: torch.Tensor        # [M] long, index into KINDS
    centers: torch.Tensor      # [M,3]
    rotations: torch.Tensor    # [M,3,3] local-to-world
    sizes: torch.Tensor        # [M,3]
    colors: torch.Tensor       # [M,2,3] two texture colours, 0..1
    textures: torch.Tensor     # [M] long, index into TEXTURES
    frequencies: torch.Tensor  # [M] texture cycles per bounding radius

    def __post_init__(self):
        self.kinds = torch.as_tensor(self.kinds, dtype=torch.long).reshape(-1)
        self.textures = torch.as_tensor(self.textures, dtype=torch.long).reshape(-1)
        m = len(self.kinds)
        self.centers = torch.as_tensor(self.centers, dtype=_F64).reshape(m, 3)
        self.rotations = torch.as_tensor(self.rotations, dtype=_F64).reshape(m, 3, 3)
        self.sizes = torch.as_tensor(self.sizes, dtype=_F64).reshape(m, 3)
        self.colors = torch.as_tensor(self.colors, dtype=_F64).reshape(m, 2, 3)
        self.frequencies = torch.as_tensor(self.frequencies, dtype=_F64).reshape(m)
        if len(self.textures) != m or (m and (self.kinds.min() < 0 or self.kinds.max() >= len(KINDS))):
            raise ValueError(f"scene needs kinds in 0..{len(KINDS) - 1} and one texture per object")

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def bounding_radii(self) -> torch.Tensor:
        """Radius of each primitive's bounding sphere around its centre [M]."""
        s = self.sizes
        return torch.stack([s[:, 0], s.norm(dim=-1), s[:, :2].norm(dim=-1), s[:, 0] + s[:, 1]], -1) \
            .gather(1, self.kinds[:, None])[:, 0]

    def to_dict(self) -> dict:
        return {"objects": [{"kind": KINDS[k], "center": c.tolist(), "rotation": r.tolist(), "size": s.tolist(),
                             "colors": col.tolist(), "texture": TEXTURES[t], "frequency": float(f)}
                            for k, c, r, s, col, t, f in zip(self.kinds.tolist(), self.centers, self.rotations,
                                                             self.sizes, self.colors, self.textures.tolist(),
                                                             self.frequencies)]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        """Inverse of :meth:`to_dict`; only ``kind`` and ``size`` are required per object."""
        return cls.from_objects(data["objects"])

    @classmethod
    def from_objects(cls, objects: Sequence[dict]) -> "Scene":
        """A scene from dicts such as ``{"kind": "torus", "size": [0.6, 0.2, 0]}`` (handy for tests)."""
        rows = []
        for i, o in enumerate(objects):
            if o.get("kind") not in KINDS or o.get("texture", "solid") not in TEXTURES:
                raise ValueError(f"object {i}: kind must be one of {KINDS} and texture one of {TEXTURES}, got {o}")
            size = list(o["size"]) + [0.0] * (3 - len(o["size"]))
            rows.append((KINDS.index(o["kind"]), o.get("center", (0.0, 0.0, 0.0)), o.get("rotation", torch.eye(3)),
                         size, o.get("colors", ((0.8, 0.8, 0.8), (0.3, 0.3, 0.3))),
                         TEXTURES.index(o.get("texture", "solid")), o.get("frequency", 2.0)))
        cols = list(zip(*rows)) if rows else [[]] * 7
        return cls(torch.tensor(cols[0], dtype=torch.long), *(torch.as_tensor(_stack(c)) for c in cols[1:5]),
                   torch.tensor(cols[5], dtype=torch.long), torch.tensor(cols[6], dtype=_F64))


def _stack(values) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v, dtype=_F64) for v in values]) if values else torch.zeros(0, dtype=_F64)


# --------------------------------------------------------------------- generation
def make_scene(seed: int, num_objects: Union[int, Tuple[int, int]] = (2, 4), kinds: Sequence[str] = KINDS,
               radius: float = 1.0, size_range: Tuple[float, float] = (0.3, 0.5)) -> Scene:
    """A random scene, fully determined by ``seed`` (a local RNG; global RNG state is untouched).

    ``num_objects`` is a count or an inclusive (min, max) range; each object's bounding sphere has a
    radius in ``size_range`` and lies inside the sphere of ``radius`` around the origin. Objects are
    spread out by rejection sampling so that they rarely overlap.
    """
    rng = random.Random(seed)
    lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
    if not 1 <= lo <= hi or any(k not in KINDS for k in kinds):
        raise ValueError(f"num_objects must be >= 1 (got {num_objects}) and kinds within {KINDS} (got {kinds})")
    placed, objects = [], []
    for _ in range(rng.randint(lo, hi)):
        b = rng.uniform(*size_range)
        best, best_gap = None, -math.inf
        for _ in range(50):  # keep the candidate that overlaps least
            c = _random_in_ball(rng, max(radius - b, 0.0))
            gap = min((math.dist(c, pc) - b - pb for pc, pb in placed), default=math.inf)
            if gap > best_gap:
                best, best_gap = c, gap
            if gap > 0.05:
                break
        placed.append((best, b))
        kind = rng.choice(list(kinds))
        if kind == "sphere":
            size = [b, 0.0, 0.0]
        elif kind == "box":
            e = [rng.uniform(0.35, 1.0) for _ in range(3)]
            size = [b * x / math.hypot(*e) for x in e]
        elif kind == "cylinder":
            a = rng.uniform(0.35, 1.2)  # aspect: squat discs to tall rods
            size = [b * math.cos(a), b * math.sin(a), 0.0]
        else:
            ratio = rng.uniform(0.25, 0.5)  # minor / major radius
            size = [b / (1 + ratio), b * ratio / (1 + ratio), 0.0]
        hue, sat, val = rng.random(), rng.uniform(0.5, 0.9), rng.uniform(0.7, 1.0)
        hue2 = (hue + rng.uniform(0.25, 0.75)) % 1.0  # a clearly different second colour
        colors = [colorsys.hsv_to_rgb(hue, sat, val), colorsys.hsv_to_rgb(hue2, sat * 0.8, val * 0.6)]
        q = torch.tensor([rng.gauss(0, 1) for _ in range(4)], dtype=_F64)  # uniform random rotation
        objects.append({"kind": kind, "center": best, "size": size, "colors": colors,
                        "rotation": Quaternion(q / q.norm()).matrix(), "texture": rng.choice(TEXTURES),
                        "frequency": rng.uniform(1.5, 3.5)})
    return Scene.from_objects(objects)


def _random_in_ball(rng: random.Random, r: float):
    while True:
        p = [rng.uniform(-1, 1) for _ in range(3)]
        if sum(x * x for x in p) <= 1:
            return [r * x for x in p]


# --------------------------------------------------------------------- intersection
@dataclass
class Hits:
    t: torch.Tensor          # [R] distance along the (unit) ray, inf where nothing is hit
    object_id: torch.Tensor  # [R] long, -1 where nothing is hit
    normal: torch.Tensor     # [R,3] world-space unit normal facing the ray origin (0 on misses)
    local: torch.Tensor      # [R,3] hit point in the object's local frame (for textures)


def intersect(scene: Scene, origins: torch.Tensor, directions: torch.Tensor) -> Hits:
    """Nearest hit of rays [R,3] (unit directions, float64 recommended) with the scene."""
    dev, dt = origins.device, origins.dtype
    r = len(origins)
    best_t = torch.full((r,), math.inf, dtype=dt, device=dev)
    obj = torch.full((r,), -1, dtype=torch.long, device=dev)
    normal = torch.zeros(r, 3, dtype=dt, device=dev)
    local = torch.zeros(r, 3, dtype=dt, device=dev)
    bound = scene.bounding_radii
    for i in range(len(scene)):
        rot = scene.rotations[i].to(dev, dt)
        center = scene.centers[i].to(dev, dt)
        # Bounding-sphere cull: only rays that can reach the object before the current best hit.
        oc = origins - center
        b = (oc * directions).sum(-1)
        disc = b * b - ((oc * oc).sum(-1) - float(bound[i]) ** 2)
        idx = torch.nonzero((disc >= 0) & (-b - disc.clamp(min=0).sqrt() < best_t)).squeeze(1)
        if len(idx) == 0:
            continue
        o, d = oc[idx] @ rot, directions[idx] @ rot  # world -> local (rows times R = R^T x)
        t, n = _INTERSECT[int(scene.kinds[i])](o, d, scene.sizes[i].tolist())
        closer = t < best_t[idx]
        idx, t, n, o, d = idx[closer], t[closer], n[closer], o[closer], d[closer]
        best_t[idx], obj[idx] = t, i
        local[idx] = o + t[:, None] * d
        n = n @ rot.T  # local -> world
        normal[idx] = torch.where(((n * directions[idx]).sum(-1) > 0)[:, None], -n, n)  # face the viewer
    return Hits(best_t, obj, normal, local)


def _smallest_positive(candidates: torch.Tensor) -> torch.Tensor:
    return torch.where(candidates > _EPS, candidates, math.inf).min(dim=-1).values


def _sphere(o, d, size):
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - size[0] ** 2)
    sq = disc.clamp(min=0).sqrt()
    t = _smallest_positive(torch.stack([-b - sq, -b + sq], -1))
    t = torch.where(disc >= 0, t, math.inf)
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    return t, p / size[0]


def _box(o, d, size):
    h = torch.tensor(size, dtype=o.dtype, device=o.device)
    inv = 1.0 / torch.where(d.abs() < 1e-30, torch.full_like(d, 1e-30), d)  # slab method, no 0/0
    t1, t2 = (-h - o) * inv, (h - o) * inv
    t_near = torch.minimum(t1, t2).max(-1).values
    t_far = torch.maximum(t1, t2).min(-1).values
    t = torch.where(t_near > _EPS, t_near, t_far)
    t = torch.where((t_far >= t_near) & (t > _EPS), t, math.inf)
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    # The face hit is the axis where the point is relatively closest to the slab boundary.
    axis = (p.abs() / h).argmax(-1)
    n = torch.zeros_like(p).scatter_(1, axis[:, None], torch.sign(p.gather(1, axis[:, None])))
    return t, n


def _cylinder(o, d, size):
    r, hh = size[0], size[1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - r * r
    disc = b * b - a * c
    sq = disc.clamp(min=0).sqrt()
    a_safe = torch.where(a > 1e-30, a, 1.0)
    side = torch.stack([(-b - sq) / a_safe, (-b + sq) / a_safe], -1)
    side_y = o[:, 1:2] + side * d[:, 1:2]
    side = torch.where((disc >= 0)[:, None] & (a > 1e-30)[:, None] & (side_y.abs() <= hh), side, math.inf)
    dy = torch.where(d[:, 1].abs() > 1e-30, d[:, 1], 1e-30)
    caps = torch.stack([(-hh - o[:, 1]) / dy, (hh - o[:, 1]) / dy], -1)
    cx, cz = o[:, 0:1] + caps * d[:, 0:1], o[:, 2:3] + caps * d[:, 2:3]
    caps = torch.where(cx * cx + cz * cz <= r * r, caps, math.inf)
    candidates = torch.cat([side, caps], -1)
    t, which = torch.where(candidates > _EPS, candidates, math.inf).min(dim=-1)
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    on_cap = which >= 2
    n = torch.where(on_cap[:, None], torch.stack([torch.zeros_like(t), torch.sign(p[:, 1]), torch.zeros_like(t)], -1),
                    torch.stack([p[:, 0], torch.zeros_like(t), p[:, 2]], -1) / r)
    return t, n


def _torus(o, d, size):
    """Ray-torus via the quartic's companion-matrix eigenvalues, then Newton steps in float64."""
    big_r, small_r = size[0], size[1]
    s = big_r + small_r
    # Condition the quartic: start at the bounding-sphere entry and measure in bounding radii,
    # so that the roots lie in [0, 2].
    b = (o * d).sum(-1)
    t0 = (-b - (b * b - (o * o).sum(-1) + s * s).clamp(min=0).sqrt()).clamp(min=0)
    o64, d64 = ((o + t0[:, None] * d) / s).double(), d.double()
    R, r = big_r / s, small_r / s
    m = (o64 * d64).sum(-1)
    k = (o64 * o64).sum(-1) + R * R - r * r
    dxz = d64[:, 0] ** 2 + d64[:, 2] ** 2
    oxz = o64[:, 0] * d64[:, 0] + o64[:, 2] * d64[:, 2]
    pxz = o64[:, 0] ** 2 + o64[:, 2] ** 2
    # (|p|^2 + R^2 - r^2)^2 = 4 R^2 (px^2 + pz^2) with p = o + u d, |d| = 1: monic quartic in u.
    coeffs = torch.stack([4 * m, 4 * m * m + 2 * k - 4 * R * R * dxz, 4 * m * k - 8 * R * R * oxz,
                          k * k - 4 * R * R * pxz], -1)  # a3, a2, a1, a0
    companion = torch.zeros(len(o), 4, 4, dtype=torch.float64, device=o.device)
    companion[:, 0, :] = -coeffs
    companion[:, 1, 0] = companion[:, 2, 1] = companion[:, 3, 2] = 1.0
    roots = torch.linalg.eigvals(companion) if len(o) else torch.zeros(0, 4, dtype=torch.complex128)
    real = torch.where(roots.imag.abs() < 1e-5, roots.real, math.inf)
    u = torch.where(real > -1e-7, real, math.inf).min(-1).values  # roots just behind the entry still count
    a3, a2, a1, a0 = coeffs.unbind(-1)
    for _ in range(2):
        f = (((u + a3) * u + a2) * u + a1) * u + a0
        df = ((4 * u + 3 * a3) * u + 2 * a2) * u + a1
        step = torch.where(df.abs() > 1e-12, f / df, 0.0)
        u = torch.where(torch.isfinite(u) & (step.abs() < 1e-2), u - step, u)
    t = (t0.double() + s * u).to(o.dtype)
    t = torch.where(t > _EPS, t, math.inf)
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    ring = torch.stack([p[:, 0], torch.zeros_like(t), p[:, 2]], -1)
    ring = big_r * ring / ring.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # nearest point on the centre circle
    return t, (p - ring) / small_r


_INTERSECT = (_sphere, _box, _cylinder, _torus)


# --------------------------------------------------------------------- rendering
@dataclass
class RenderResult:
    rgba: torch.Tensor                      # [N,H,W,4] rgb (composited on the background) + coverage
    rgb: torch.Tensor                       # [N,H,W,3]
    mask: torch.Tensor                      # [N,H,W] coverage: exactly 0/1 at one sample per pixel
    depth: torch.Tensor                     # [N,H,W] z along the camera's forward axis, 0 on background
    normals: Optional[torch.Tensor] = None  # [N,H,W,3] world-space unit normals, 0 on background
    object_id: Optional[torch.Tensor] = None  # [N,H,W] long, -1 on background (one sample per pixel)


DEFAULT_LIGHT = (-0.4, 0.8, 0.45)  # key light from the upper left, on the +Z (azimuth 0) side


def shade(scene: Scene, hits: Hits, directions: torch.Tensor, light: Sequence[float] = DEFAULT_LIGHT,
          ambient: float = 0.3, rim: float = 0.1) -> torch.Tensor:
    """Lambert key light + ambient + a soft view-dependent rim on textured albedo: rgb [R,3] (0 on misses)."""
    hit = hits.object_id >= 0
    ids = hits.object_id.clamp(min=0)
    dev, dt = directions.device, directions.dtype
    u = hits.local / scene.bounding_radii.to(dev, dt)[ids, None] * scene.frequencies.to(dev, dt)[ids, None]
    cells = torch.floor(u).long()
    pattern = torch.stack([torch.zeros_like(cells[:, 0]), cells[:, 0], cells.sum(-1)], -1)  # solid, stripes, checker
    second = pattern.gather(1, scene.textures.to(dev)[ids, None])[:, 0].remainder(2).bool()
    colors = scene.colors.to(dev, dt)[ids]
    albedo = torch.where(second[:, None], colors[:, 1], colors[:, 0])
    light = torch.as_tensor(light, dtype=dt, device=dev)
    light = light / light.norm()
    n = hits.normal
    lambert = (n * light).sum(-1).clamp(min=0)
    facing = (n * directions).sum(-1).abs()
    rgb = albedo * (ambient + (1 - ambient) * lambert)[:, None] + rim * (1 - facing)[:, None] ** 3
    return torch.where(hit[:, None], rgb.clamp(0, 1), 0.0)


def render(scene: Scene, cameras: Cameras, height: Optional[int] = None, width: Optional[int] = None,
           background: Optional[Sequence[float]] = None, device: Union[str, torch.device] = "cpu",
           samples_per_pixel: int = 1, light: Sequence[float] = DEFAULT_LIGHT, ambient: float = 0.3,
           rim: float = 0.1, max_rays: int = 1 << 18, progress: Optional[ProgressFactory] = None) -> RenderResult:
    """Ray-cast ``scene`` from every camera; float32 outputs on ``device``, computed in float64.

    ``background`` None keeps black behind the objects (= rgb premultiplied by coverage).
    ``samples_per_pixel`` must be a square (1, 4, 9, ...): an s x s grid per pixel, averaged; then
    ``mask`` is fractional coverage and ``depth`` the mean depth of the covered samples.
    Cameras are rendered in chunks of at most ``max_rays`` rays to bound memory; ``progress`` (a
    factory, see progress.py) counts chunks and is silent by default since rendering is fast.
    """
    height, width = height or cameras.height, width or cameras.width
    s = math.isqrt(samples_per_pixel)
    if s < 1 or s * s != samples_per_pixel:
        raise ValueError(f"samples_per_pixel must be a square number (1, 4, 9, ...), got {samples_per_pixel}")
    hs, ws = height * s, width * s
    chunk = max(1, max_rays // (hs * ws))
    bg = None if background is None else torch.as_tensor(background, dtype=_F64, device=device).reshape(3)
    outs = []
    with (progress or silent_progress)(math.ceil(len(cameras) / chunk), "rendering procedural views") as bar:
        for start in range(0, len(cameras), chunk):
            cams = cameras[list(range(start, min(start + chunk, len(cameras))))]
            origins, dirs = cams.rays(hs, ws, normalize=True, dtype=_F64, device=device)
            n = len(cams)
            hits = intersect(scene, origins.reshape(-1, 3), dirs.reshape(-1, 3))
            rgb = shade(scene, hits, dirs.reshape(-1, 3), light, ambient, rim).reshape(n, hs, ws, 3)
            hit = (hits.object_id >= 0).reshape(n, hs, ws)
            forward = cams.c2w[:, :3, 2].to(device=device, dtype=_F64)
            depth = torch.where(hit, hits.t.reshape(n, hs, ws) * torch.einsum("nhwc,nc->nhw", dirs, forward), 0.0)
            normals = hits.normal.reshape(n, hs, ws, 3)
            ids = hits.object_id.reshape(n, hs, ws)
            if s > 1:
                pool = lambda x: x.reshape(n, height, s, width, s, *x.shape[3:]).mean(dim=(2, 4))  # noqa: E731
                ids = ids[:, s // 2::s, s // 2::s]
                cover = pool(hit.to(_F64))
                rgb, depth = pool(rgb), pool(depth) / cover.clamp(min=1e-12)
                normals = torch.nn.functional.normalize(pool(normals), dim=-1)
                hit = cover
            mask = hit.to(_F64)
            if bg is not None:
                rgb = rgb + (1 - mask[..., None]) * bg
            outs.append((rgb, mask, depth, normals, ids))
            bar.update()
    rgb, mask, depth, normals, ids = (torch.cat(x) for x in zip(*outs))
    rgb, mask, depth, normals = (x.float() for x in (rgb, mask, depth, normals))
    return RenderResult(torch.cat([rgb, mask[..., None]], -1), rgb, mask, depth, normals, ids)


def render_multiview(scene: Union[int, Scene], cameras: Cameras, height: Optional[int] = None,
                     width: Optional[int] = None, background: Optional[Sequence[float]] = (1.0, 1.0, 1.0),
                     **render_kwargs) -> "MultiView":
    """Render a seed (via :func:`make_scene`) or a scene into a :class:`MultiView` with masks and depth."""
    from .multiview import MultiView

    scene = make_scene(scene) if isinstance(scene, int) else scene
    out = render(scene, cameras, height, width, background=background, **render_kwargs)
    n, h, w = out.mask.shape
    return MultiView(out.rgb, cameras.with_size(w, h), masks=out.mask, depth=out.depth,
                     names=[f"view_{i:03d}" for i in range(n)])
