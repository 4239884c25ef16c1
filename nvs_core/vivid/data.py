"""Training pairs for VIVID: (source view, target view, 20-d camera label) in model space.

Sources of pairs, all with ``sample(count, generator) -> PairBatch`` and no state besides their
data, so a pair stream is fixed by the generator alone (what makes training resumable):

- :class:`MultiViewPairs`: two views of one scene from any ``MultiView`` (procedural renders,
  RealEstate10K sequences via ``nvs_core.realestate10k.read_sequence``, image folders);
- :class:`HomographyPairs`: VIVID's single-view trick, two pure-rotation warps of one image;
- :class:`ProceduralPairs`: procedural scenes rendered on the fly at random orbit cameras, with
  disjoint seed ranges for training (:data:`TRAIN_SEEDS`) and evaluation (:data:`EVAL_SEEDS`);
- :class:`MixedPairs`: a weighted mixture of the above.

Images are centre-cropped to a square and resized (bilinear, antialiased) to the network's
resolution, then mapped to [-1, 1] the way ``sampler.encode_pixels`` maps 0..255 pixels. The label
is ``geometry_from_cameras(source, target, imsize, translation_scale)``: the cropped intrinsics
it assumes are those of exactly this crop (same integer corner).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from ..cameras import Cameras
from ..multiview import MultiView
from ..procedural import make_scene, render
from ..training_common import randint as _randint, uniform as _uniform
from .geometry import geometry_from_cameras

# Procedural scene seeds: training never sees an evaluation seed.
TRAIN_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(1_000_000, 1_100_000)

MultiViews = Union[MultiView, Sequence[MultiView]]


@dataclass
class PairBatch:
    """``src``/``dst`` (B, 3, S, S) float32 in [-1, 1]; ``geometry`` (B, 20) standardised labels."""

    src: torch.Tensor
    dst: torch.Tensor
    geometry: torch.Tensor

    def __len__(self) -> int:
        return self.src.shape[0]

    def to(self, device: Union[str, torch.device]) -> "PairBatch":
        return PairBatch(self.src.to(device), self.dst.to(device), self.geometry.to(device))

    @staticmethod
    def cat(batches: Sequence["PairBatch"]) -> "PairBatch":
        return PairBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("src", "dst", "geometry")))

    def __getitem__(self, index) -> "PairBatch":
        return PairBatch(self.src[index], self.dst[index], self.geometry[index])


# --------------------------------------------------------------------------------------------
# Images.

def centre_square(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] -> the centre min(H, W) square, with the corner ``crop_resize_intrinsics`` assumes."""
    h, w = images.shape[1:3]
    crop = min(h, w)
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[:, top:top + crop, left:left + crop]


def to_model_space(images: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE [N, H, W, 3] (0..1) -> (N, 3, size, size) in [-1, 1]: centre square, antialiased resize."""
    x = centre_square(images).permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2 - 1).clamp(-1, 1).contiguous()


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> IMAGE [N, S, S, 3] in 0..1."""
    return ((x.to(torch.float32) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def _as_list(multiviews: MultiViews) -> List[MultiView]:
    return [multiviews] if isinstance(multiviews, MultiView) else list(multiviews)


# --------------------------------------------------------------------------------------------
# Multi-view pairs.

class MultiViewPairs:
    """Source/target pairs of views of one scene, drawn uniformly over scenes, then over views.

    Views are converted once (``to_model_space``), so sampling is cheap. ``max_gap`` limits
    |i - j| (frame distance in a sequence, e.g. RealEstate10K); ``allow_same`` admits i == j.
    Scenes with fewer than two usable views are skipped.
    """

    def __init__(self, multiviews: MultiViews, imsize: int, translation_scale: float = 1.0,
                 max_gap: Optional[int] = None, allow_same: bool = False):
        if max_gap is not None and max_gap < (0 if allow_same else 1):
            raise ValueError(f"max_gap must be >= 1 (>= 0 with allow_same), got {max_gap}")
        self.imsize = int(imsize)
        self.translation_scale = float(translation_scale)
        self.max_gap = max_gap
        self.allow_same = allow_same
        self.scenes: List[Tuple[torch.Tensor, Cameras]] = []
        for mv in _as_list(multiviews):
            if len(mv) >= (1 if allow_same else 2):
                self.scenes.append((to_model_space(mv.images, self.imsize), mv.cameras))
        if not self.scenes:
            raise ValueError("MultiViewPairs needs at least one multi-view with two or more views")

    def _pick_views(self, n: int, generator: torch.Generator) -> Tuple[int, int]:
        i = _randint(generator, n)
        gap = n - 1 if self.max_gap is None else min(self.max_gap, n - 1)
        lo, hi = max(0, i - gap), min(n - 1, i + gap)
        candidates = [j for j in range(lo, hi + 1) if self.allow_same or j != i]
        return i, candidates[_randint(generator, len(candidates))]

    def sample(self, count: int, generator: torch.Generator) -> PairBatch:
        src, dst, labels = [], [], []
        for _ in range(count):
            images, cameras = self.scenes[_randint(generator, len(self.scenes))]
            i, j = self._pick_views(len(images), generator)
            src.append(images[i])
            dst.append(images[j])
            labels.append(geometry_from_cameras(cameras[[i]], cameras[[j]], self.imsize, self.translation_scale)[0])
        return PairBatch(torch.stack(src), torch.stack(dst), torch.stack(labels))


# --------------------------------------------------------------------------------------------
# Single-image pairs by rotation homographies.

def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Camera-to-reference rotations (N, 3, 3), OpenCV axes: R = Ry(yaw) Rx(pitch) Rz(roll), radians."""
    def about(axis: int, angle: torch.Tensor) -> torch.Tensor:
        axis_angle = torch.zeros(angle.shape[0], 3, dtype=angle.dtype)
        axis_angle[:, axis] = angle
        return axis_angle_to_rotation_matrix(axis_angle)

    return about(1, yaw) @ about(0, pitch) @ about(2, roll)


def warp_by_rotation(image: torch.Tensor, rotation: torch.Tensor, focal: float) -> torch.Tensor:
    """What a camera rotated by ``rotation`` (camera-to-reference) sees of ``image`` (C, S, S).

    Pure rotation about the optical centre: out(p) = in(K R K^-1 p), K with ``focal`` pixels and
    the principal point at the centre. Pixels that fall outside ``image`` repeat its border.
    """
    size = image.shape[-1]
    K = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], dtype=torch.float64)
    H = K @ rotation.to(torch.float64) @ torch.linalg.inv(K)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64) + 0.5,
                            torch.arange(size, dtype=torch.float64) + 0.5, indexing="ij")
    p = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ H.T
    uv = p[..., :2] / p[..., 2:]
    grid = (uv / size * 2 - 1).to(image.dtype)[None]  # align_corners=False pixel-centre convention
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


class HomographyPairs:
    """VIVID's single-view trick: source and target are two pure-rotation warps of one image.

    Each image is centre-cropped to a square and kept at ``2 * imsize`` for warping. Per pair,
    two rotations R_s, R_t are drawn (yaw and pitch uniform in +-``max_yaw_pitch``, roll in
    +-``max_roll``; defaults 8.3 and 3.5 degrees as in the paper's 320-px crop setting), the image
    is warped by H = K R K^-1 with focal ``focal_fraction`` (0.6) times the square's width, and the
    centre ``crop_fraction`` of each warp is resized to ``imsize``. The crop keeps the warps inside
    the image for these angles; pixels still outside repeat the border (the released code path is
    broken, so the fill is our choice). The label comes from cameras [R | 0] with the crop's
    intrinsics: translation 0, relative rotation R_s^T R_t.
    """

    def __init__(self, images: Union[torch.Tensor, MultiViews], imsize: int, max_yaw_pitch: float = math.radians(8.3),
                 max_roll: float = math.radians(3.5), focal_fraction: float = 0.6, crop_fraction: float = 0.8,
                 translation_scale: float = 1.0):
        if not isinstance(images, torch.Tensor):
            images = torch.cat([mv.images for mv in _as_list(images)])
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"HomographyPairs needs IMAGE [N,H,W,3] with N >= 1, got {list(images.shape)}")
        self.imsize = int(imsize)
        self.work_size = 2 * self.imsize
        self.images = to_model_space(images, self.work_size)
        self.max_yaw_pitch = float(max_yaw_pitch)
        self.max_roll = float(max_roll)
        self.focal = focal_fraction * self.work_size
        self.crop = max(2, int(round(crop_fraction * self.work_size)))
        self.translation_scale = float(translation_scale)

    def _cameras(self, rotations: torch.Tensor) -> Cameras:
        c2w = torch.eye(4, dtype=torch.float64).repeat(len(rotations), 1, 1)
        c2w[:, :3, :3] = rotations
        f = self.focal / self.crop
        return Cameras(c2w, torch.tensor([f, f, 0.5, 0.5], dtype=torch.float64), self.crop, self.crop)

    def _view(self, image: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        warped = warp_by_rotation(image, rotation, self.focal)
        start = (self.work_size - self.crop) // 2
        crop = warped[:, start:start + self.crop, start:start + self.crop]
        return F.interpolate(crop[None], size=(self.imsize, self.imsize), mode="bilinear", align_corners=False,
                             antialias=True)[0].clamp(-1, 1)

    def sample(self, count: int, generator: torch.Generator) -> PairBatch:
        src, dst, labels = [], [], []
        for _ in range(count):
            image = self.images[_randint(generator, len(self.images))]
            yaw, pitch = _uniform(generator, -self.max_yaw_pitch, self.max_yaw_pitch, 2).chunk(2)
            yaw2, pitch2 = _uniform(generator, -self.max_yaw_pitch, self.max_yaw_pitch, 2).chunk(2)
            rolls = _uniform(generator, -self.max_roll, self.max_roll, 2)
            rotations = rotation_matrix(torch.cat([yaw, yaw2]), torch.cat([pitch, pitch2]), rolls)
            src.append(self._view(image, rotations[0]))
            dst.append(self._view(image, rotations[1]))
            cams = self._cameras(rotations)
            labels.append(geometry_from_cameras(cams[[0]], cams[[1]], self.imsize, self.translation_scale)[0])
        return PairBatch(torch.stack(src), torch.stack(dst), torch.stack(labels))


# --------------------------------------------------------------------------------------------
# Procedural pairs rendered on the fly.

@dataclass
class OrbitRanges:
    """Where procedural cameras go (radians): on a sphere of ``radius`` around the origin, looking at it.

    The source azimuth is uniform over the circle; the target's azimuth is the source's plus an
    offset uniform in ``azimuth_offset``. Without ``elevation_change`` both elevations are
    uniform in ``elevation`` (independently); with it the source elevation is uniform in
    ``elevation`` and the target's is the source's plus a change uniform in ``elevation_change``
    (what an orbit at one height, as in the evaluation set, looks like for (0, 0)).
    """

    elevation: Tuple[float, float] = (math.radians(0.0), math.radians(40.0))
    azimuth_offset: Tuple[float, float] = (math.radians(-120.0), math.radians(120.0))
    radius: float = 2.6
    fov: float = math.radians(45.0)
    elevation_change: Optional[Tuple[float, float]] = None


class ProceduralPairs:
    """Pairs of views of random procedural scenes (``make_scene(seed)``), rendered on the fly.

    Each pair is a fresh scene from ``seeds`` seen from two random orbit cameras (``OrbitRanges``),
    rendered at ``imsize`` with ``samples_per_pixel`` (4 = 2x2 supersampling, the antialiased
    equivalent of rendering large and resizing) on a white background.
    """

    def __init__(self, imsize: int, seeds: Sequence[int] = TRAIN_SEEDS, ranges: Optional[OrbitRanges] = None,
                 translation_scale: float = 1.0, samples_per_pixel: int = 4,
                 background: Sequence[float] = (1.0, 1.0, 1.0)):
        if len(seeds) == 0:
            raise ValueError("ProceduralPairs needs at least one scene seed")
        self.imsize = int(imsize)
        self.seeds = seeds
        self.ranges = ranges or OrbitRanges()
        self.translation_scale = float(translation_scale)
        self.samples_per_pixel = samples_per_pixel
        self.background = tuple(background)

    def cameras(self, generator: torch.Generator) -> Cameras:
        r = self.ranges
        azimuth = _uniform(generator, 0.0, 2 * math.pi)
        offset = _uniform(generator, *r.azimuth_offset)
        if r.elevation_change is None:
            elevations = _uniform(generator, *r.elevation, 2)
        else:
            elevation = _uniform(generator, *r.elevation)
            elevations = torch.cat([elevation, elevation + _uniform(generator, *r.elevation_change)])
        return Cameras.from_spherical(elevations, torch.cat([azimuth, azimuth + offset]), r.radius, r.fov,
                                      self.imsize, self.imsize)

    def render(self, seed: int, cameras: Cameras) -> torch.Tensor:
        """Views of scene ``seed`` in model space (N, 3, S, S)."""
        out = render(make_scene(int(seed)), cameras, self.imsize, self.imsize, background=self.background,
                     samples_per_pixel=self.samples_per_pixel)
        return to_model_space(out.rgb, self.imsize)

    def sample(self, count: int, generator: torch.Generator) -> PairBatch:
        src, dst, labels = [], [], []
        for _ in range(count):
            seed = self.seeds[_randint(generator, len(self.seeds))]
            cams = self.cameras(generator)
            views = self.render(seed, cams)
            src.append(views[0])
            dst.append(views[1])
            labels.append(geometry_from_cameras(cams[[0]], cams[[1]], self.imsize, self.translation_scale)[0])
        return PairBatch(torch.stack(src), torch.stack(dst), torch.stack(labels))


@dataclass
class EvalSet:
    """Fixed evaluation pairs: ``pairs`` (one per target), the scene ``seeds``, ``targets`` cameras,
    the source ``sources`` cameras (one per scene) and ``masks`` (B, S, S) of the targets."""

    pairs: PairBatch
    seeds: List[int]
    sources: Cameras
    targets: Cameras
    masks: torch.Tensor


def eval_azimuth_offsets(views: int = 8, low: float = 15.0, high: float = 90.0) -> List[float]:
    """Target azimuth offsets in degrees: ``views // 2`` evenly spaced in [low, high] on each side."""
    side = torch.linspace(low, high, max(views // 2, 1)).tolist() if views > 1 else [low]
    offsets = sorted([-a for a in side] + side) if views > 1 else side
    return offsets[:views]


def procedural_eval_set(objects: int, imsize: int, views: int = 8, offsets_deg: Optional[Sequence[float]] = None,
                        elevation_deg: Tuple[float, float] = (10.0, 30.0), first: int = 0,
                        seeds: Sequence[int] = EVAL_SEEDS, translation_scale: float = 1.0,
                        radius: float = 2.6, fov: float = math.radians(45.0), samples_per_pixel: int = 4,
                        sampling_seed: int = 0) -> EvalSet:
    """``objects`` held-out scenes (``seeds[first:first+objects]``), each seen from one source camera
    and ``views`` targets at the source's elevation and azimuth + ``offsets_deg`` (default
    :func:`eval_azimuth_offsets`). Source azimuth and elevation are drawn from ``sampling_seed``."""
    offsets = torch.tensor(eval_azimuth_offsets(views) if offsets_deg is None else list(offsets_deg),
                           dtype=torch.float64)
    generator = torch.Generator().manual_seed(sampling_seed)
    source = ProceduralPairs(imsize, seeds, translation_scale=translation_scale, samples_per_pixel=samples_per_pixel)
    src, dst, labels, masks, used, sources, targets = [], [], [], [], [], [], []
    for k in range(objects):
        seed = int(seeds[first + k])
        azimuth = _uniform(generator, 0.0, 2 * math.pi)
        elevation = _uniform(generator, math.radians(elevation_deg[0]), math.radians(elevation_deg[1]))
        azimuths = torch.cat([azimuth, azimuth + torch.deg2rad(offsets)])
        cams = Cameras.from_spherical(elevation.expand(len(azimuths)), azimuths, radius, fov, imsize, imsize)
        out = render(make_scene(seed), cams, imsize, imsize, background=source.background,
                     samples_per_pixel=samples_per_pixel)
        images = to_model_space(out.rgb, imsize)
        src.append(images[:1].expand(len(offsets), -1, -1, -1))
        dst.append(images[1:])
        labels.append(geometry_from_cameras(cams[[0]], cams[1:], imsize, translation_scale))
        masks.append(out.mask[1:])
        used.append(seed)
        sources.append(cams[[0]])
        targets.append(cams[1:])
    pairs = PairBatch(torch.cat(src).contiguous(), torch.cat(dst), torch.cat(labels))
    return EvalSet(pairs, used, Cameras.cat(sources), Cameras.cat(targets), torch.cat(masks))


# --------------------------------------------------------------------------------------------
# Mixtures.

class MixedPairs:
    """Pairs from several sources: each pair's source is drawn with probability ~ its weight."""

    def __init__(self, sources: Sequence, weights: Optional[Sequence[float]] = None):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("MixedPairs needs at least one source")
        sizes = {s.imsize for s in self.sources}
        if len(sizes) != 1:
            raise ValueError(f"all pair sources must share one image size, got {sorted(sizes)}")
        self.imsize = sizes.pop()
        w = torch.tensor(weights if weights is not None else [1.0] * len(self.sources), dtype=torch.float64)
        if len(w) != len(self.sources) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need one non-negative weight per source with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()

    def sample(self, count: int, generator: torch.Generator) -> PairBatch:
        which = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        parts = [self.sources[k].sample(int((which == k).sum()), generator)
                 for k in range(len(self.sources)) if (which == k).any()]
        batch = PairBatch.cat(parts)
        return batch[torch.randperm(count, generator=generator)]


def pair_source(data: Union[MultiViews, object], imsize: int, translation_scale: float = 1.0,
                homography_fraction: float = 0.0, max_gap: Optional[int] = None):
    """A pair source from a MultiView, a list of them, or an object that already has ``sample``.

    ``homography_fraction`` > 0 mixes in single-image homography pairs made from the same views.
    """
    if hasattr(data, "sample") and hasattr(data, "imsize"):
        if data.imsize != imsize:
            raise ValueError(f"pair source is {data.imsize} px but the network needs {imsize} px")
        return data
    views = MultiViewPairs(data, imsize, translation_scale, max_gap=max_gap)
    if homography_fraction <= 0:
        return views
    single = HomographyPairs(data, imsize, translation_scale=translation_scale)
    return MixedPairs([views, single], [1 - homography_fraction, homography_fraction])
