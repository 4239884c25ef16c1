"""Reading ViewNeTI and NeTI artefacts safely, and converting them to safetensors + JSON.

Formats:
- ``mapper-steps-N_view.pt`` / ``mapper-steps-N_object.pt`` (ViewNeTI): ``{'cfg': dict, 'mappers':
  {key: {'state_dict', 'encoder', 'placeholder_object_token'}}}`` with the view file keyed
  ``'dummy_key'`` and the object file by stale training-time token ids (ints). The encoder is a pickled
  ``models.positional_encoding.FourierPositionalEncodingNDims``; storages are tagged ``cuda:0``.
- ``mapper-steps-N.pt`` (NeTI): ``{'state_dict', 'cfg', 'encoder'}`` with a pickled
  ``NeTIPositionalEncoding`` whose unseeded ``w`` must come from the file.
- ``learned_embeds-steps-N.bin``: ``{token: float32 tensor}``, tensors and containers only.
- our converted ``X.safetensors`` + ``X.json`` (``python -m nvs_core convert X.pt --method viewneti``).

The pickles are read with the allow-list unpickler of ``nvs_core.checkpoints``: the encoder classes
become inert stand-ins holding their attribute dicts, nothing from the file runs, and every storage
loads to the CPU whatever device it was saved from.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoints import (CheckpointError, InertObject, check_state_dict, load_safetensors, load_torch_weights,
                           load_with_config, safe_torch_load, sniff_format, stand_in)
from .camera_tokens import DTUCalibration, DTUCameraRange, SphericalViewRange, is_dtu_view_token
from .config import ConfigError, ViewNetiLoadOptions, neti_mapper_kwargs, viewneti_mapper_kwargs
from .mapper import NetiMapper, ViewNetiMapper

PathLike = Union[str, Path]
log = logging.getLogger(__name__)

METHOD = "viewneti"
VIEW_MAPPER_KEY = "dummy_key"      # the one key of a view file's 'mappers'
VIEW_PLACEHOLDER = "dummy"         # its 'placeholder_object_token'
FOURIER_ENCODER_CLASS = "FourierPositionalEncodingNDims"
NETI_ENCODER_CLASS = "NeTIPositionalEncoding"

# The classes the mapper files pickle besides tensors and plain containers. Legacy ViewNeTI mappers
# (arch <= 14) pickle the NeTI encoder or BasicEncoder; they load as data and are refused later.
VIEWNETI_PICKLE_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("models.positional_encoding", FOURIER_ENCODER_CLASS): stand_in,
    ("models.positional_encoding", NETI_ENCODER_CLASS): stand_in,
    ("models.positional_encoding", "BasicEncoder"): stand_in,
}


# ------------------------------------------------------------------------------- plain data

@dataclass
class MapperEntry:
    """One mapper as a file stores it."""

    placeholder_token: str                 # '<object>', '<scan33>', 'dummy' (view) or '' (NeTI)
    stored_key: Any                        # 'dummy_key', a stale int token id, or None (NeTI)
    state_dict: Dict[str, torch.Tensor]    # the original keys, in file order
    encoder_w: Optional[torch.Tensor]      # the pickled Fourier matrix, if any
    encoder_class: str = ""
    encoder_sigmas: Optional[List[float]] = None


@dataclass
class MapperFile:
    """A mapper checkpoint as plain data: ``kind`` is "view", "object" or "neti"."""

    source: str
    kind: str
    cfg: Dict[str, Any]
    entries: List[MapperEntry]
    constructor: Optional[Dict[str, Any]] = None  # known only for our converted format
    meta: Dict[str, Any] = field(default_factory=dict)


def _tensor_dict(value, path, what) -> Dict[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not value:
        raise CheckpointError(path, f"{what}: expected a non-empty state dict, got {type(value).__name__}")
    out = {}
    for key, t in value.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(path, f"{what}: entry {key!r} is {type(t).__name__}, expected a tensor")
        out[key] = t.detach()
    return out


def _encoder_data(encoder, path, what) -> Tuple[Optional[torch.Tensor], str, Optional[List[float]]]:
    if encoder is None:
        return None, "", None
    if not isinstance(encoder, InertObject) or not isinstance(encoder.state, dict):
        raise CheckpointError(path, f"{what}: expected a pickled positional-encoding object, "
                                    f"got {type(encoder).__name__}")
    w = encoder.state.get("w")
    if w is not None and not isinstance(w, torch.Tensor):
        raise CheckpointError(path, f"{what}: encoder.w is {type(w).__name__}, expected a tensor")
    sigmas = encoder.state.get("sigmas")
    sigmas = [float(s) for s in sigmas] if isinstance(sigmas, (list, tuple)) else None
    return (None if w is None else w.detach().clone()), encoder._qualname, sigmas


def read_mapper_file(path: PathLike) -> MapperFile:
    """Read a published ViewNeTI (view or object) or NeTI mapper ``.pt`` safely."""
    return _mapper_file_from(safe_torch_load(path, VIEWNETI_PICKLE_ALLOWED), path)


def _is_token_registry(obj) -> bool:
    return (isinstance(obj, Mapping) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.ndim == 1 for k, v in obj.items()))


def _mapper_file_from(obj, path) -> MapperFile:
    if _is_token_registry(obj):
        raise CheckpointError(path, "this is a learned_embeds token registry, not a mapper checkpoint "
                                    "(read it with load_learned_embeds)")
    if not isinstance(obj, Mapping) or not isinstance(obj.get("cfg"), Mapping):
        found = f"top-level keys {list(obj)[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(path, "expected a ViewNeTI/NeTI mapper checkpoint: a dict with 'cfg' and 'mappers' "
                                    f"(ViewNeTI) or 'state_dict' (NeTI); found {found}")
    cfg = dict(obj["cfg"])
    if "mappers" in obj:
        mappers = obj["mappers"]
        if not isinstance(mappers, Mapping) or not mappers:
            raise CheckpointError(path, "'mappers' must be a non-empty dict of mapper entries")
        entries = []
        for key, entry in mappers.items():
            what = f"mappers[{key!r}]"
            if not isinstance(entry, Mapping) or "state_dict" not in entry:
                raise CheckpointError(path, f"{what}: expected a dict with 'state_dict', 'encoder' and "
                                            "'placeholder_object_token'")
            token = entry.get("placeholder_object_token")
            if not isinstance(token, str) or not token:
                raise CheckpointError(path, f"{what}: 'placeholder_object_token' must be a token string")
            w, cls, sigmas = _encoder_data(entry.get("encoder"), path, what)
            entries.append(MapperEntry(token, key, _tensor_dict(entry["state_dict"], path, what), w, cls, sigmas))
        is_view = [e.stored_key == VIEW_MAPPER_KEY and e.placeholder_token == VIEW_PLACEHOLDER for e in entries]
        if any(is_view) and len(entries) != 1:
            raise CheckpointError(path, "a view-mapper file holds exactly one mapper under 'dummy_key'")
        tokens = [e.placeholder_token for e in entries]
        if len(set(tokens)) != len(tokens):
            raise CheckpointError(path, f"object mappers must have distinct placeholder tokens, got {tokens}")
        if "encode_phi" in obj:
            log.info("%s: ignoring 'encode_phi' (only used by legacy arch <= 14 view mappers)", path)
        return MapperFile(str(path), "view" if is_view[0] else "object", cfg, entries)
    if "state_dict" in obj:
        w, cls, _ = _encoder_data(obj.get("encoder"), path, "encoder")
        if w is None or cls != NETI_ENCODER_CLASS:
            raise CheckpointError(path, "a NeTI mapper needs its pickled NeTIPositionalEncoding with 'w' "
                                        "(its W was drawn unseeded and cannot be regenerated)")
        return MapperFile(str(path), "neti", cfg,
                          [MapperEntry("", None, _tensor_dict(obj["state_dict"], path, "state_dict"), w, cls)])
    raise CheckpointError(path, f"expected 'mappers' (ViewNeTI) or 'state_dict' (NeTI); top-level keys {list(obj)}")


# -------------------------------------------------------------------------------- building

def _spherical_representation_from_width(n_inputs: int) -> Optional[str]:
    return {3: "phi", 4: "theta-phi"}.get(n_inputs)


def mapper_constructor(mfile: MapperFile, options: Optional[ViewNetiLoadOptions] = None,
                       camera_representation: Optional[str] = None) -> Dict[str, Any]:
    """Constructor kwargs for every mapper of the file (they share one cfg).

    A spherical view mapper needs ``camera_representation`` ("phi"/"theta-phi"); without it the width
    of the pickled Fourier matrix decides.
    """
    if mfile.constructor is not None:
        return dict(mfile.constructor)
    try:
        if mfile.kind == "neti":
            entry = mfile.entries[0]
            out = entry.state_dict.get("output_layer.0.weight")
            if out is None:
                raise CheckpointError(mfile.source, "NeTI state dict lacks output_layer.0.weight")
            bypass = bool(mfile.cfg.get("model", {}).get("output_bypass", True))
            return neti_mapper_kwargs(mfile.cfg, out.shape[0] // (2 if bypass else 1), entry.encoder_w.shape[0])
        if mfile.kind == "view" and camera_representation is None:
            w = mfile.entries[0].encoder_w
            if w is not None and w.shape[1] != 14:
                camera_representation = _spherical_representation_from_width(w.shape[1])
        return viewneti_mapper_kwargs(mfile.cfg, mfile.kind, camera_representation, options)
    except ConfigError as e:
        raise CheckpointError(mfile.source, str(e)) from None


def build_mapper(kind: str, constructor: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                 fourier_w: Optional[torch.Tensor] = None, options: Optional[ViewNetiLoadOptions] = None,
                 source: PathLike = "<state dict>") -> nn.Module:
    """A mapper in inference mode with its weights loaded strictly (errors name ``source`` and the key)."""
    options = options or ViewNetiLoadOptions()
    if kind == "neti":
        if fourier_w is None:  # upstream drew it unseeded: nothing could regenerate it
            raise CheckpointError(source, "a NeTI mapper needs its encoder matrix 'encoder.w' (1024, 2)")
        mapper = NetiMapper(**constructor, encoder_w=fourier_w)
    else:
        mapper = ViewNetiMapper(**constructor)
        if fourier_w is not None and options.fourier_matrix == "pickled":
            if tuple(fourier_w.shape) != tuple(mapper.encoder.w.shape):
                raise CheckpointError(source, f"pickled Fourier matrix has shape {tuple(fourier_w.shape)}, the "
                                              f"config gives {tuple(mapper.encoder.w.shape)}")
            if not torch.equal(fourier_w.float(), mapper.encoder.w):
                log.warning("%s: the pickled Fourier matrix differs from the seed-0 one that upstream would "
                            "regenerate; using the pickled one (fourier_matrix='seed0' to follow upstream)", source)
            mapper.encoder.set_matrix(fourier_w)
        elif fourier_w is None:
            log.info("%s: no pickled Fourier matrix; using the seed-0 formula", source)
    check_state_dict(mapper.state_dict(), state_dict, source)
    mapper.load_state_dict(dict(state_dict), strict=True)
    return mapper.train(False).requires_grad_(False)


@dataclass
class LoadedMappers:
    """The mappers of one file. View files hold one mapper; object files one per placeholder token."""

    source: str
    kind: str
    mappers: Dict[str, nn.Module]  # keyed by placeholder token ('<object>', ...); view: {'view': mapper}
    cfg: Dict[str, Any]
    stored_keys: Dict[str, Any] = field(default_factory=dict)

    @property
    def mapper(self) -> nn.Module:
        if len(self.mappers) != 1:
            raise ValueError(f"{self.source} holds {len(self.mappers)} mappers: pick one from .mappers")
        return next(iter(self.mappers.values()))


def load_mapper_file(path: PathLike, options: Optional[ViewNetiLoadOptions] = None,
                     camera_representation: Optional[str] = None) -> LoadedMappers:
    """Load a published ``.pt`` or a converted ``.safetensors`` mapper file, detected from content."""
    mfile = read_any_mapper_file(path)
    constructor = mapper_constructor(mfile, options, camera_representation)
    mappers, stored = {}, {}
    for entry in mfile.entries:
        name = "view" if mfile.kind == "view" else (entry.placeholder_token or "neti")
        mappers[name] = build_mapper(mfile.kind, constructor, entry.state_dict, entry.encoder_w, options, path)
        stored[name] = entry.stored_key
    return LoadedMappers(str(path), mfile.kind, mappers, mfile.cfg, stored)


# ----------------------------------------------------------------------------- learned embeds

def load_learned_embeds(path: PathLike) -> Dict[str, torch.Tensor]:
    """``learned_embeds*.bin`` (torch, weights only) or a safetensors file: {token: (D,) tensor}, in file
    order (safetensors files list their keys sorted).

    In ViewNeTI these rows are only a token registry (the super-category embeddings): the mappers
    overwrite them. Their order is the training view tokens by camera index, then the object tokens.
    """
    fmt = sniff_format(path)
    if fmt == "safetensors":
        embeds, metadata = load_safetensors(path)
        order = _converted_token_order(path, metadata)
        if order is not None and sorted(order) == sorted(embeds):
            embeds = {token: embeds[token] for token in order}
    else:
        embeds = load_torch_weights(path)
    if not isinstance(embeds, Mapping) or not embeds:
        raise CheckpointError(path, f"expected a dict {{token: embedding}}, got {type(embeds).__name__}")
    for token, value in embeds.items():
        if not isinstance(token, str) or not isinstance(value, torch.Tensor) or value.ndim != 1:
            raise CheckpointError(path, f"entry {token!r}: expected a token string mapped to a 1-d embedding")
    return dict(embeds)


def _converted_token_order(path, metadata) -> Optional[List[str]]:
    # Our converter records the file order, which safetensors' sorted keys lose.
    if "nvs_config" not in metadata and not Path(path).with_suffix(".json").is_file():
        return None
    tokens = (load_with_config(path)[1].get("meta") or {}).get("tokens")
    return list(tokens) if isinstance(tokens, list) else None


def split_view_and_object_tokens(tokens: Sequence[str]) -> Tuple[List[str], List[str]]:
    """View tokens (``<view_...>``) and the rest (object tokens), each in the given order."""
    views = [t for t in tokens if t.startswith("<view_")]
    return views, [t for t in tokens if not t.startswith("<view_")]


# -------------------------------------------------------------------------------- the bundle

@dataclass
class ViewNetiModel:
    """A view mapper, object mappers keyed by token string, and the view normalisation they need."""

    view: Optional[ViewNetiMapper]
    objects: Dict[str, ViewNetiMapper]
    cfg: Dict[str, Any]
    view_range: Union[DTUCameraRange, SphericalViewRange, None] = None
    training_view_tokens: List[str] = field(default_factory=list)
    # DTU calibration cameras (for DTU camera indices and orbit placement), when known
    dtu_calibration: Optional[DTUCalibration] = None

    def view_inputs(self, view_tokens: Sequence[str]) -> torch.Tensor:
        """The view mapper's camera input for these tokens (normalised, float32, one row per token)."""
        if self.view is None:
            raise ValueError("this ViewNeTI model has no view mapper")
        if self.view_range is None:
            what = ("a DTU calibration folder (Calibration/cal18) or the 24 min/max numbers"
                    if self.view.camera_representation == "dtu-12d" else "the training view tokens (learned_embeds)")
            raise ValueError(f"the view mapper has no camera range to normalise views with: load it with {what}")
        if isinstance(self.view_range, DTUCameraRange) != all(is_dtu_view_token(t) for t in view_tokens):
            raise ValueError(f"view tokens do not match the mapper's camera representation "
                             f"{self.view.camera_representation!r}: {list(view_tokens)[:2]}")
        return self.view_range.normalize_tokens(view_tokens)


def _camera_range(calibration) -> Optional[DTUCameraRange]:
    if calibration is None or isinstance(calibration, DTUCameraRange):
        return calibration
    if isinstance(calibration, (str, Path)):
        return DTUCameraRange.from_calibration_folder(calibration)
    return DTUCameraRange.from_numbers(calibration)


def calibration_to_config(calibration: DTUCalibration) -> Dict[str, Any]:
    """The DTU calibration cameras as JSON (stored with trained mappers: ``data.dtu_calibration``)."""
    return {"keys": list(calibration.keys), "source": str(calibration.source),
            "projections": [[float(v) for v in P.reshape(-1).tolist()] for P in calibration.projections]}


def calibration_from_config(value, source: PathLike = "<config>") -> Optional[DTUCalibration]:
    if value is None:
        return None
    try:
        return DTUCalibration(value["keys"], torch.tensor(value["projections"], dtype=torch.float32),
                              str(value.get("source", "")))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(source, f"data.dtu_calibration: expected keys and 3x4 projections ({e})") from None


@dataclass
class StoredViewData:
    """What a mapper file trained by ``nvs_core.viewneti.training`` stores about its views (``cfg['data']``):
    the DTU camera range and calibration cameras, or the spherical range's tokens. Published files store none."""

    dtu_range: Optional[DTUCameraRange] = None
    dtu_calibration: Optional[DTUCalibration] = None
    spherical_tokens: List[str] = field(default_factory=list)


def stored_view_data(cfg: Mapping[str, Any], source: PathLike = "<config>") -> StoredViewData:
    data = cfg.get("data") if isinstance(cfg, Mapping) else None
    if not isinstance(data, Mapping):
        return StoredViewData()
    dtu_range = None
    if data.get("dtu_camera_range") is not None:
        try:
            dtu_range = DTUCameraRange.from_numbers(data["dtu_camera_range"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(source, f"data.dtu_camera_range: expected 24 numbers ({e})") from None
    calibration = calibration_from_config(data.get("dtu_calibration"), source)
    if dtu_range is None and calibration is not None:
        dtu_range = calibration.camera_range()
    tokens = data.get("view_range_tokens") or data.get("training_view_tokens") or []
    spherical = [str(t) for t in tokens if isinstance(t, str) and t.startswith("<view_") and not is_dtu_view_token(t)]
    return StoredViewData(dtu_range, calibration, spherical)


def load_viewneti(view_mapper: Optional[PathLike] = None, object_mapper: Optional[PathLike] = None,
                  learned_embeds: Optional[PathLike] = None, calibration=None,
                  options: Optional[ViewNetiLoadOptions] = None) -> ViewNetiModel:
    """Load a ViewNeTI model from its files (published ``.pt``/``.bin`` or converted safetensors).

    ``calibration`` (DTU views): the DTU SampleSet ``Calibration/cal18`` folder, 24 numbers (12 minima
    then 12 maxima) or a :class:`DTUCameraRange`. Spherical view mappers take their range from the
    training view tokens in ``learned_embeds``. Files written by our training also store their view data
    (:func:`stored_view_data`): it is used when ``calibration`` / ``learned_embeds`` are not given, and
    their DTU calibration cameras come back as ``model.dtu_calibration``.
    """
    if view_mapper is None and object_mapper is None:
        raise ValueError("give a view mapper, an object mapper or both")
    training_view_tokens = []
    if learned_embeds is not None:
        training_view_tokens = split_view_and_object_tokens(list(load_learned_embeds(learned_embeds)))[0]
    view, view_range, cfg, dtu_calibration = None, None, {}, None
    if view_mapper is not None:
        representation = None
        spherical_tokens = [t for t in training_view_tokens if not is_dtu_view_token(t)]
        if spherical_tokens:
            view_range = SphericalViewRange.from_tokens(spherical_tokens)
            representation = view_range.degrees_of_freedom
        loaded = load_mapper_file(view_mapper, options, representation)
        if loaded.kind != "view":
            raise CheckpointError(view_mapper, f"expected a view-mapper file, found a {loaded.kind} mapper file")
        view, cfg = loaded.mapper, loaded.cfg
        stored = stored_view_data(cfg, view_mapper)
        if view.camera_representation == "dtu-12d":
            view_range = _camera_range(calibration)
            if view_range is None:
                view_range = stored.dtu_range
            dtu_calibration = stored.dtu_calibration
        elif view_range is None and stored.spherical_tokens:
            view_range = SphericalViewRange.from_tokens(stored.spherical_tokens)
            if view_range.degrees_of_freedom != view.camera_representation:
                raise CheckpointError(view_mapper, f"the stored view tokens give {view_range.degrees_of_freedom!r} "
                                                   f"views but the mapper takes {view.camera_representation!r}")
            training_view_tokens = training_view_tokens or list(stored.spherical_tokens)
    objects = {}
    if object_mapper is not None:
        loaded = load_mapper_file(object_mapper, options)
        if loaded.kind != "object":
            raise CheckpointError(object_mapper, f"expected an object-mapper file, found a {loaded.kind} mapper file")
        objects, cfg = loaded.mappers, cfg or loaded.cfg
    return ViewNetiModel(view, objects, cfg, view_range, training_view_tokens, dtu_calibration)


# ------------------------------------------------------------------------- converted format

def _entry_prefix(index: int) -> str:
    return f"mappers.{index}."


def convert_viewneti_file(path: PathLike, options: Optional[ViewNetiLoadOptions] = None
                          ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Converter for ``nvs_core.convert``: a published mapper ``.pt`` or ``learned_embeds*.bin``.

    Mappers: tensors ``mappers.{i}.<original key>`` and ``mappers.{i}.encoder.w``; the config holds the
    constructor kwargs, the kind, each mapper's placeholder token and stored key, and the full cfg.
    Learned embeds: the token -> vector dict, with the file's token order in the config.
    """
    options = options or ViewNetiLoadOptions()
    obj = safe_torch_load(path, VIEWNETI_PICKLE_ALLOWED)
    source = {"source": Path(path).name, "source_format": sniff_format(path)}
    if _is_token_registry(obj):
        return dict(obj), {"method": METHOD, "class": "LearnedEmbeds",
                           "meta": {"kind": "learned_embeds", "tokens": list(obj), **source}}
    mfile = _mapper_file_from(obj, path)
    constructor = mapper_constructor(mfile, options)
    tensors, entries = {}, []
    for i, entry in enumerate(mfile.entries):
        prefix = _entry_prefix(i)
        tensors.update({prefix + k: v for k, v in entry.state_dict.items()})
        if entry.encoder_w is not None:
            tensors[prefix + "encoder.w"] = entry.encoder_w.float()
        entries.append({"placeholder_token": entry.placeholder_token, "stored_key": entry.stored_key})
    config = {"method": METHOD, "class": "NetiMapper" if mfile.kind == "neti" else "ViewNetiMapper",
              "constructor": constructor,
              "meta": {"kind": mfile.kind, "entries": entries, "cfg": mfile.cfg, "options": options.to_dict(),
                       **source}}
    return tensors, config


def read_converted_mapper_file(path: PathLike) -> MapperFile:
    tensors, config = load_with_config(path)
    meta = config.get("meta") or {}
    if config.get("method") != METHOD or meta.get("kind") not in ("view", "object", "neti"):
        raise CheckpointError(path, f"expected a converted ViewNeTI mapper (method {METHOD!r}), got method "
                                    f"{config.get('method')!r}")
    entries = []
    for i, info in enumerate(meta.get("entries") or []):
        prefix = _entry_prefix(i)
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k != prefix + "encoder.w"}
        if not state:
            raise CheckpointError(path, f"no tensors under {prefix!r} for mapper {info.get('placeholder_token')!r}")
        entries.append(MapperEntry(info.get("placeholder_token", ""), info.get("stored_key"), state,
                                   tensors.get(prefix + "encoder.w")))
    if not entries:
        raise CheckpointError(path, "converted ViewNeTI file lists no mappers in meta.entries")
    return MapperFile(str(path), meta["kind"], dict(meta.get("cfg") or {}), entries, dict(config["constructor"]), meta)


def read_any_mapper_file(path: PathLike) -> MapperFile:
    fmt = sniff_format(path)
    log.info("%s: detected %s; reading it as a ViewNeTI/NeTI mapper", path, fmt)
    if fmt in ("torch_zip", "torch_legacy"):
        return read_mapper_file(path)
    if fmt in ("safetensors", "json"):
        return read_converted_mapper_file(path)
    raise CheckpointError(path, f"found {fmt}: expected a mapper .pt or a converted .safetensors")


def _register_converter() -> None:
    from ..convert import register_converter

    register_converter(METHOD, convert_viewneti_file)


_register_converter()
