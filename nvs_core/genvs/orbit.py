"""Autoregressive orbits (``sample_ar.py``): each generated view joins the conditioning pool.

Schedule (reproduced exactly): step q = 1, 2, ... renders one target from the NeRF built from the
generated-view list entries ``[0]`` (q = 1), ``[0, 1]`` (q = 2), else ``[0] + random.sample(range(1,
q-1), min(4, q-2)) + [q-1]`` with Python's ``random`` seeded 123 once before the loop. Entry 0 holds all
source views, entry k >= 1 the view generated at step k (a [0, 1] image).

The published script re-encodes every conditioning view at every step. Here each view is encoded
once into a :class:`VolumeCache`: a bounded number of volumes stays on the compute device, the rest
move to host memory (optionally as float16) or, with ``offload=False``, are dropped and re-encoded
when the schedule needs them again. Because the schedule is known in advance, eviction removes the
volume whose next use is farthest away (and forgets volumes never used again).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
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
                 next_use: Optional[Callable[[int, int], Optional[int]]] = None):
        if max_device_entries < 1:
            raise ValueError(f"max_device_entries must be >= 1, got {max_device_entries}")
        self.encode_fn, self.capacity = encode, int(max_device_entries)
        self.offload, self.offload_dtype = offload, offload_dtype
        self.next_use = next_use or (lambda entry, now: now + 1)
        self.images: Dict[int, torch.Tensor] = {}
        self.device: Dict[int, torch.Tensor] = {}
        self.host: Dict[int, torch.Tensor] = {}
        self.stats = CacheStats()

    def add(self, entry: int, images01: torch.Tensor) -> None:
        self.images[entry] = images01.detach()

    def get(self, entry: int, now: int, pinned: Sequence[int] = ()) -> torch.Tensor:
        if entry in self.device:
            return self.device[entry]
        if entry in self.host:
            vol = self.host.pop(entry)
            self.stats.uploaded += 1
            ref = next(iter(self.device.values()), None)
            dtype = ref.dtype if ref is not None else torch.float32
            vol = vol.to(device=self._device_of(), dtype=self._dtype or dtype, non_blocking=True)
        else:
            vol = self.encode_fn(self.images[entry])
            self.stats.encoded += vol.shape[0]
            self._device, self._dtype = vol.device, vol.dtype
        self.device[entry] = vol
        self._evict(now, pinned=set(pinned) | {entry})
        return vol

    _device: Optional[torch.device] = None
    _dtype: Optional[torch.dtype] = None

    def _device_of(self):
        return self._device if self._device is not None else "cpu"

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
            else:
                self.stats.dropped += 1

    def forget(self, now: int) -> None:
        for store in (self.device, self.host):
            for entry in [e for e in store if self.next_use(e, now) is None]:
                del store[entry]
                self.stats.dropped += 1
