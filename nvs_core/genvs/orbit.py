"""Autoregressive orbits (``sample_ar.py``): each generated view joins the conditioning pool.

Schedule (reproduced exactly): step q = 1, 2, ... renders one target from the NeRF built from the
generated-view list entries ``[0]`` (q = 1), ``[0, 1]`` (q = 2), else ``[0] + random.sample(range(1,
q-1), min(4, q-2)) + [q-1]`` with Python's ``random`` seeded 123 once before the loop. Entry 0 holds all
source views, entry k >= 1 the view generated at step k (a [0, 1] image).

The published script re-encodes every conditioning view at every step. Here each view is encoded
once into a :class:`VolumeCache`: a bounded number of volumes stays on the compute device, the rest
move to host memory (optionally as float16, optionally bounded too) or, with ``offload=False``, are
dropped and re-encoded when the schedule needs them again. Because the schedule is known in advance, eviction removes the
volume whose next use is farthest away (and forgets volumes never used again).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch


def ar_schedule(num_steps: int, seed: int = 123, max_random: int = 4) -> List[List[int]]:
    """Conditioning entries for steps q = 1..num_steps (entry 0 = the sources)."""
    rng = random.Random(seed)
    out = []
    for q in range(1, num_steps + 1):
        if q > 2:
            out.append([0] + rng.sample(range(1, q - 1), min(max_random, q - 2)) + [q - 1])
        elif q == 2:
            out.append([0, 1])
        else:
            out.append([0])
    return out


def views_seen(schedule: Sequence[Sequence[int]], num_sources: int) -> List[int]:
    """Images fed to the encoder per step by the published script (entry 0 counts all sources)."""
    return [sum(num_sources if e == 0 else 1 for e in entries) for entries in schedule]


@dataclass
class CacheStats:
    encoded: int = 0          # encoder calls (views)
    uploaded: int = 0         # host -> device moves
    offloaded: int = 0        # device -> host moves
    dropped: int = 0          # volumes forgotten (never needed again, or evicted without offload)


class VolumeCache:
    """Encoder volumes by entry id, at most ``max_device_entries`` on the device.

    ``encode(images01) -> volumes`` is called on the stored images of an entry when its volume is not
    available. ``next_use(entry, now)`` returns the next step that needs ``entry`` (None: never).
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], max_device_entries: int = 8,
                 offload: bool = True, offload_dtype: Optional[torch.dtype] = None,
                 next_use: Optional[Callable[[int, int], Optional[int]]] = None,
                 max_host_entries: Optional[int] = None):
        if max_device_entries < 1:
            raise ValueError(f"max_device_entries must be >= 1, got {max_device_entries}")
        self.encode_fn, self.capacity = encode, int(max_device_entries)
        self.offload, self.offload_dtype = offload, offload_dtype
        self.host_capacity = max_host_entries
        self.next_use = next_use or (lambda entry, now: now + 1)
        self.images: Dict[int, torch.Tensor] = {}
        self._device: Optional[torch.device] = None   # where (and in which dtype) the encoder puts volumes
        self._dtype: Optional[torch.dtype] = None
        self.device: Dict[int, torch.Tensor] = {}
        self.host: Dict[int, torch.Tensor] = {}
        self.stats = CacheStats()

    def add(self, entry: int, images01: torch.Tensor) -> None:
        self.images[entry] = images01.detach()

    def get(self, entry: int, now: int, pinned: Sequence[int] = ()) -> torch.Tensor:
        """The volume of ``entry`` on the compute device (``pinned`` entries are in use: never evicted)."""
        if entry in self.device:
            return self.device[entry]
        if entry in self.host:
            vol = self.host.pop(entry).to(device=self._device, dtype=self._dtype, non_blocking=True)
            self.stats.uploaded += 1
        else:
            vol = self.encode_fn(self.images[entry])
            self.stats.encoded += vol.shape[0]
            self._device, self._dtype = vol.device, vol.dtype
        self.device[entry] = vol
        self._evict(now, pinned=set(pinned) | {entry})
        return vol

    def _evict(self, now: int, pinned) -> None:
        for entry in [e for e in self.device if e not in pinned and self.next_use(e, now) is None]:
            del self.device[entry]
            self.stats.dropped += 1
        while len(self.device) > self.capacity:
            candidates = [e for e in self.device if e not in pinned]
            if not candidates:
                return
            far = float("inf")
            victim = max(candidates, key=lambda e: (self.next_use(e, now) or far, e))
            vol = self.device.pop(victim)
            if self.offload:
                self.host[victim] = vol.to("cpu", dtype=self.offload_dtype or vol.dtype)
                self.stats.offloaded += 1
                self._evict_host(now)
            else:
                self.stats.dropped += 1

    def _evict_host(self, now: int) -> None:
        while self.host_capacity is not None and len(self.host) > self.host_capacity:
            victim = max(self.host, key=lambda e: (self.next_use(e, now) or float("inf"), e))
            del self.host[victim]          # re-encoded from its image if needed again
            self.stats.dropped += 1

    def forget(self, now: int) -> None:
        for store in (self.device, self.host):
            for entry in [e for e in store if self.next_use(e, now) is None]:
                del store[entry]
                self.stats.dropped += 1


def _next_use_table(schedule: Sequence[Sequence[int]]):
    uses: Dict[int, List[int]] = {}
    for q, entries in enumerate(schedule, start=1):
        for e in entries:
            uses.setdefault(e, []).append(q)

    def next_use(entry: int, now: int) -> Optional[int]:
        for q in uses.get(entry, []):
            if q > now:
                return q
        return None
    return next_use


@torch.no_grad()
def autoregressive_orbit(model, images01: torch.Tensor, sources, path, steps: int = 250, stochastic: bool = True,
                         cfg: float = 1.0, seed: int = 0, schedule_seed: int = 123, max_cached_volumes: int = 8,
                         offload: bool = True, offload_dtype: Optional[torch.dtype] = None,
                         max_offloaded_volumes: Optional[int] = None, published_train_mode: bool = False, memory_mb: Optional[float] = None,
                         progress=None, callback: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Generate one view per pose of ``path`` (GeNVSCameras), in order, each conditioned on the sources
    and earlier generated views by the published schedule (:func:`ar_schedule`).

    For the published circle (``circle_path(source pose)``) pass ``path[1:]``: pose 0 is the source.
    All draws come from one CPU generator seeded ``seed``, in the original's order (render draws, then
    the sampler's). Memory: at most ``max_cached_volumes`` volumes on the device and
    ``max_offloaded_volumes`` (None: unbounded; a full-size volume is 64 MB, 32 MB as float16) in host
    memory; volumes beyond both are re-encoded when the schedule needs them again, so a bound trades
    memory for at most 4 extra encodes per view, never a different result. Returns ``images`` (Q, 3, S, S) in [0, 1], ``features``/``depth``/``opacity`` of
    each step's render, the ``schedule`` and the cache ``stats``.
    """
    from .nerf import DEFAULT_RENDER_MEMORY_MB, SourceViews
    from .pipeline import check_sources, fit_images
    from .sampler import BatchNoise, sample
    from ..progress import resolve, shared

    check_sources(images01, sources)
    Q = len(path)
    if Q == 0:
        raise ValueError("the orbit path has no cameras")
    schedule = ar_schedule(Q, schedule_seed)
    device = next(model.parameters()).device
    size = model.config.image_size
    cache = VolumeCache(lambda imgs: model.encode(fit_images(imgs.to(device), size)), max_cached_volumes, offload,
                        offload_dtype, _next_use_table(schedule), max_offloaded_volumes)
    cache.add(0, images01)
    poses = {0: sources.poses.to(device)}
    noise = BatchNoise(seed)
    dcfg = model.config.denoiser
    out = {"images": [], "features": [], "depth": [], "opacity": []}
    with model.mode(published_train_mode), resolve(progress, Q * steps, "GeNVS orbit") as bar:
        for q, entries in enumerate(schedule, start=1):
            vols = torch.cat([cache.get(e, q, pinned=entries) for e in entries])
            src = SourceViews(vols[None], torch.cat([poses[e] for e in entries])[None], sources.camera_k)
            target = path.poses[q - 1:q][None].to(device)
            f, d, o = model.render(src, target, path.intrinsics, generator=noise.generator,
                                   random_importance=published_train_mode,
                                   memory_mb=memory_mb or DEFAULT_RENDER_MEMORY_MB, check=bar.check)
            img = sample(model.ddpm_pipeline, model.condition(f[0]), steps, stochastic, dcfg.sigma_min,
                         dcfg.sigma_max, noise, cfg=cfg, progress=shared(bar))
            cache.add(q, img.clamp(0, 1))          # the clipped sample, used as a [0, 1] image
            poses[q] = target[0]
            cache.forget(q)
            for key, value in zip(("images", "features", "depth", "opacity"), (img.clamp(0, 1), f[0], d[0], o[0])):
                out[key].append(value.cpu())
            if callback is not None:
                callback(q, {"image": img, "entries": entries, "stats": cache.stats})
    result = {k: torch.cat(v) for k, v in out.items()}
    result.update(schedule=schedule, stats=cache.stats)
    return result
