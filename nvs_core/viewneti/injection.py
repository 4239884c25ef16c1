"""ViewNeTI's per-layer, per-timestep text conditioning as a cross-attention context provider.

Written once against ``nvs_core.sd`` (the diffusers and the ComfyUI adapters both use it). For UNet
layer l and timestep t the mappers give the view and object placeholders a word and a bypass vector;
``backend.encode_text`` turns them into the keys context A_l(t) (seen by to_k) and the values context
B_l(t) (seen by to_v). Only the cond chunk is patched; the uncond chunk keeps its own context, as
upstream's separate unconditional pass does (A5).

Memory: a 30-step run needs 16 x 30 (A, B) pairs. B differs from A only at the placeholder rows (the
bypass is added before the per-token final LayerNorm), so the cache holds A and just those rows of B:
16 x 77 x 1024 floats per step and camera, ~151 MB for 30 steps in fp32 at SD 2.1 width (half in fp16),
plus the full values of the step being sampled (one step's worth, rebuilt when the step changes).
``prepare(timesteps)`` fills it for a schedule; a timestep outside it (e.g. a second-order sampler's
midpoint) is computed on first use and kept. ``cache=False`` computes every call afresh, with gradients
flowing to the mappers (training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..progress import ProgressFactory, resolve
from ..sd.interface import COND, NUM_LAYERS, LayerCall, SDBackend
from .text import PlaceholderVectors

TokenIds = Union[int, Sequence[int], torch.Tensor]


@dataclass
class _StepContexts:
    keys: torch.Tensor        # (16, N, T, D)
    value_rows: torch.Tensor  # (16, N, P, D): B at the bypassed placeholder rows


def _timestep_key(t: float) -> float:
    return round(float(t), 3)


class ViewNetiContexts:
    """``CrossAttentionContexts`` for ViewNeTI: N prompt rows (one per camera) in the cond chunk.

    ``input_ids`` (N or 1, T): prompts holding the placeholders, e.g. "<view>. A photo of a <object>".
    ``view_params`` (N or 1, k): the view mapper's normalised camera numbers (``ViewNetiModel.view_inputs``).
    Either mapper may be absent (view-only or object-only prompts).
    """

    def __init__(self, backend: SDBackend, input_ids: torch.Tensor, view_mapper: Optional[nn.Module] = None,
                 view_token_ids: Optional[TokenIds] = None, view_params: Optional[torch.Tensor] = None,
                 object_mapper: Optional[nn.Module] = None, object_token_id: Optional[TokenIds] = None,
                 cache: bool = True, cache_dtype: Optional[torch.dtype] = None,
                 cache_device: Optional[torch.device] = None, rows_per_pass: int = 16):
        if view_mapper is None and object_mapper is None:
            raise ValueError("ViewNeTI contexts need a view mapper, an object mapper or both")
        if (view_mapper is None) != (view_token_ids is None) or (object_mapper is None) != (object_token_id is None):
            raise ValueError("give each mapper together with its placeholder token id(s)")
        self.backend = backend
        self.input_ids = torch.as_tensor(input_ids).reshape(-1, torch.as_tensor(input_ids).shape[-1])
        self.view_mapper, self.object_mapper = view_mapper, object_mapper
        self.view_token_ids, self.object_token_id = view_token_ids, object_token_id
        self.view_params = None
        if view_mapper is not None and getattr(view_mapper, "view_dims", 0) > 0:
            if view_params is None:
                raise ValueError(f"the view mapper needs {view_mapper.view_dims} normalised camera numbers per row")
            self.view_params = torch.as_tensor(view_params, dtype=torch.float32).reshape(-1, view_mapper.view_dims)
        self.rows = max(self.input_ids.shape[0], 1 if self.view_params is None else self.view_params.shape[0])
        for name, count in (("input_ids", self.input_ids.shape[0]),
                            ("view_params", None if self.view_params is None else self.view_params.shape[0])):
            if count not in (None, 1, self.rows):
                raise ValueError(f"{name} has {count} rows, expected 1 or {self.rows}")
        self.use_cache = bool(cache)
        self.cache_dtype, self.cache_device = cache_dtype, cache_device
        self.rows_per_pass = max(1, int(rows_per_pass))
        self._cache: Dict[float, _StepContexts] = {}
        self._step_values: Optional[Tuple[float, torch.Tensor]] = None
        self._bypass_positions = self._placeholder_positions()
        self._rows_on = torch.arange(self.rows)[:, None]  # row index for the bypass rows, on the cache's device

    # ---- the placeholders
    def _row_ids(self, ids: TokenIds) -> torch.Tensor:
        ids = torch.as_tensor(ids).reshape(-1)
        return ids.expand(self.rows) if ids.numel() == 1 else ids

    def _placeholder_positions(self) -> torch.Tensor:
        """(N, P) positions of the placeholders whose mapper has a bypass (the only rows where B != A)."""
        ids = self.input_ids.expand(self.rows, -1)
        columns = []
        for mapper, token_ids in ((self.object_mapper, self.object_token_id), (self.view_mapper, self.view_token_ids)):
            if mapper is not None and getattr(mapper, "output_bypass", True):
                hits = ids == self._row_ids(token_ids).to(ids.device)[:, None]
                if not torch.all(hits.sum(1) == 1):
                    raise ValueError("every prompt row must contain each placeholder token exactly once")
                columns.append(hits.int().argmax(1))
        return torch.stack(columns, 1) if columns else torch.zeros(self.rows, 0, dtype=torch.long)

    # ---- computing contexts
    def _mapper_vectors(self, timesteps: torch.Tensor, layers: torch.Tensor, rows: torch.Tensor):
        """PlaceholderVectors for (t, l, camera row) triples, one per flattened entry."""
        view = obj = None
        if self.view_mapper is not None:
            if self.view_params is None:
                out = self.view_mapper(timesteps, layers)
            else:  # one camera row may serve every prompt row
                params = self.view_params[rows.clamp_max(self.view_params.shape[0] - 1)]
                out = self.view_mapper(timesteps, layers, params)
            view = PlaceholderVectors.from_mapper_output(self._row_ids(self.view_token_ids)[rows], out)
        if self.object_mapper is not None:
            out = self.object_mapper(timesteps, layers)
            obj = PlaceholderVectors.from_mapper_output(self._row_ids(self.object_token_id)[rows], out)
        return view, obj

    def compute(self, timesteps: torch.Tensor, layers: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full (keys, values) contexts (L, N, T, D) for every camera row at ``timesteps`` (N,) or a scalar,
        for the given layers. Differentiable w.r.t. the mappers."""
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).cpu()
        timesteps = timesteps.expand(self.rows) if timesteps.numel() == 1 else timesteps
        if timesteps.numel() != self.rows:
            raise ValueError(f"{timesteps.numel()} timesteps for {self.rows} camera rows")
        grid_layers = torch.as_tensor(list(layers), dtype=torch.float32).repeat_interleave(self.rows)
        grid_rows = torch.arange(self.rows).repeat(len(layers))
        grid_t = timesteps[grid_rows]
        keys, values = [], []
        for start in range(0, grid_rows.numel(), self.rows_per_pass):
            part = slice(start, start + self.rows_per_pass)
            view, obj = self._mapper_vectors(grid_t[part], grid_layers[part], grid_rows[part])
            ids = self.input_ids.expand(self.rows, -1)[grid_rows[part]]
            encoding = self.backend.encode_text(ids, view_vectors=view, object_vectors=obj)
            keys.append(encoding.keys)
            values.append(encoding.values)
        shape = (len(layers), self.rows) + tuple(keys[0].shape[1:])
        return torch.cat(keys).reshape(shape), torch.cat(values).reshape(shape)

    # ---- the cache
    def _store(self, t: float) -> _StepContexts:
        with torch.no_grad():
            keys, values = self.compute(torch.tensor([t]), range(NUM_LAYERS))
        value_rows = values[:, self._row_index(keys.device), self._bypass_positions]  # (16, N, P, D)
        target = dict(dtype=self.cache_dtype or keys.dtype, device=self.cache_device or keys.device)
        entry = _StepContexts(keys.to(**target), value_rows.to(**target))
        self._cache[_timestep_key(t)] = entry
        return entry

    def prepare(self, timesteps, progress: Optional[ProgressFactory] = None) -> None:
        """Fill the cache for a sampling schedule's timesteps (the UNet's t for each step).

        One text-encoder pass per (step, layer): minutes at full size on a CPU, so it reports
        progress per step and stops on interrupt.
        """
        if not self.use_cache:
            return
        missing = [t for t in torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1).tolist()
                   if _timestep_key(t) not in self._cache]
        with resolve(progress, len(missing), "ViewNeTI contexts") as bar:
            for t in missing:
                self._store(t)
                bar.update()

    def release(self) -> None:
        self._cache.clear()
        self._step_values = None

    @property
    def cache_bytes(self) -> int:
        return sum(e.keys.nbytes + e.value_rows.nbytes for e in self._cache.values())

    def _cached(self, layer: int, t: float) -> Tuple[torch.Tensor, torch.Tensor]:
        key = _timestep_key(t)
        entry = self._cache.get(key) or self._store(t)
        if self._step_values is None or self._step_values[0] != key:
            # the full values contexts of the current step only, rebuilt once per step for all 16 layers
            values = entry.keys.clone()
            if entry.value_rows.shape[2]:
                values[:, self._row_index(values.device), self._bypass_positions] = entry.value_rows
            self._step_values = (key, values)
        return entry.keys[layer], self._step_values[1][layer]

    def _row_index(self, device) -> torch.Tensor:
        if self._rows_on.device != device:
            self._rows_on = self._rows_on.to(device)
            self._bypass_positions = self._bypass_positions.to(device)
        return self._rows_on

    # ---- CrossAttentionContexts
    def contexts(self, call: LayerCall) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if call.chunk != COND:
            return None
        if self.rows not in (1, call.rows):
            raise ValueError(f"ViewNeTI holds {self.rows} camera rows but the cond chunk has {call.rows} rows")
        shared = call.shared_timestep
        if shared is None and call.rows > 0:
            timesteps = call.timesteps.detach().float().cpu().reshape(-1)
            shared = float(timesteps[0]) if bool(torch.all(timesteps == timesteps[0])) else None
        if self.use_cache and shared is not None:
            return self._cached(call.layer, shared)
        if shared is None and self.rows == 1:
            raise ValueError("one camera row cannot follow per-row timesteps; give one row per latent")
        keys, values = self.compute(call.timesteps.detach().float().cpu() if shared is None else shared, [call.layer])
        return keys[0], values[0]
