"""Building VIVID networks from constructor kwargs and loading their weights safely.

Formats:
- the published ``.pkl`` snapshots (``load_vivid_pickle``): an ``EasyDict`` whose ``ema`` entry
  is the network, each class pickled by EDM2's ``torch_utils.persistence`` together with the
  source code of its module. We read it with an allow-list unpickler: the source is never
  executed, persistent objects become inert stand-ins holding plain state, and any global
  outside the allow-list is refused;
- our converted format (``X.safetensors`` + ``X.json`` with the constructor kwargs), written by
  ``convert_vivid_pickle`` / ``python -m nvs_core convert X.pkl --method vivid``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..checkpoints import (CheckpointError, InertObject, check_state_dict, load_with_config, module_state_dict,
                           safe_unpickle, save_with_config, sniff_format, stand_in)
from .precond import NVPrecond

PathLike = Union[str, Path]
log = logging.getLogger(__name__)

# Constructor kwargs of the published nets as the training presets produce them. The real files'
# ``_init_kwargs`` take precedence (e.g. whether vivid-sr has extra_attn, whether vivid-uncond
# was trained with uncond=True).
_COMMON = dict(dropout=0.0, epipolar_attention_bias=False, no_time_enc=False, depth_input=False,
               warp_depth_coor=False, use_fp16=True, img_channels=3, label_dim=20)
VIVID_PRESETS: Dict[str, Dict[str, Any]] = {
    "vivid-base": dict(_COMMON, model_channels=128, extra_attn=1, super_res=False, uncond=False,
                       noisy_sr=None, img_resolution=64),
    "vivid-uncond": dict(_COMMON, model_channels=128, extra_attn=1, super_res=False, uncond=True,
                         noisy_sr=None, img_resolution=64),
    "vivid-sr": dict(_COMMON, model_channels=64, extra_attn=None, super_res=True, uncond=False,
                     noisy_sr=0.25, img_resolution=256),
}

METHOD = "vivid"
NETWORK_CLASS = "NVPrecond"


# --------------------------------------------------------------------------------------------
# Networks from kwargs.

def build_vivid_network(init_kwargs: Mapping[str, Any], device: Union[torch.device, str, None] = None,
                        dtype: Optional[torch.dtype] = None) -> NVPrecond:
    """An ``NVPrecond`` in eval mode from a checkpoint's ``_init_kwargs`` (any preset, any size).

    ``device='meta'`` builds the structure without allocating weights.
    """
    kwargs = copy.deepcopy(dict(init_kwargs))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        net = NVPrecond(**kwargs)
    net.train(False).requires_grad_(False)
    return net.to(dtype) if dtype is not None else net


def vivid_network_from_weights(init_kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                               device: Union[torch.device, str, None] = None,
                               dtype: Optional[torch.dtype] = torch.float32,
                               source: PathLike = "<state dict>") -> NVPrecond:
    """Build from kwargs and load the weights strictly (errors name ``source`` and the first bad key).

    ``dtype=None`` keeps the stored dtype: a float16 snapshot then runs on the CPU in float32 with
    float16 gains, exactly as the original does after unpickling. Default: float32.
    """
    net = build_vivid_network(init_kwargs)
    check_state_dict(net.state_dict(), state_dict, source)
    if dtype is None:
        dtypes = {t.dtype for t in state_dict.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    net.to(dtype).load_state_dict(dict(state_dict), strict=True)
    return net.to(device) if device is not None else net


# --------------------------------------------------------------------------------------------
# Published .pkl snapshots.

class EasyDictData(dict):
    """Plain-data stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _persistent_object(meta: Any) -> InertObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj(meta)``.

    The original execs ``meta['module_src']`` and instantiates ``class_name`` from it; we keep
    only the class name and the attribute state, and drop the source unread.
    """
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise ValueError("persistent object metadata: expected a dict with type 'class' and a class_name")
    obj = stand_in("torch_utils.persistence", meta["class_name"])()
    obj.__setstate__(meta.get("state"))
    return obj


# Everything a VIVID snapshot pickles besides tensors and plain containers (those, and the tensor
# reconstructors, are in the framework's built-in allow-list).
VIVID_PICKLE_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("dnnlib.util", "EasyDict"): EasyDictData,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("torch.nn.modules.container", "ModuleDict"): stand_in,
    ("torch.nn.modules.container", "ModuleList"): stand_in,
    ("torch.nn.modules.container", "Sequential"): stand_in,
}


@dataclass
class VividCheckpoint:
    """What a published snapshot holds, as plain data."""

    source: str
    class_name: str
    init_kwargs: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]  # in the original state_dict() order, stored dtype kept
    extras: Dict[str, Any] = field(default_factory=dict)  # other top-level entries, described

    def build(self, device: Union[torch.device, str, None] = None,
              dtype: Optional[torch.dtype] = torch.float32) -> NVPrecond:
        return vivid_network_from_weights(self.init_kwargs, self.state_dict, device, dtype, self.source)


def _describe(value: Any) -> Any:
    """Class name and non-tensor state of a stand-in; plain values unchanged."""
    if isinstance(value, InertObject):
        state = value.state if isinstance(value.state, dict) else {}
        plain = {k: v for k, v in state.items() if not k.startswith("_") or k in ("_init_args", "_init_kwargs")}
        return {"class_name": value._qualname, "state": plain}
    return dict(value) if isinstance(value, dict) else value


def load_vivid_pickle(path: PathLike, network_key: Optional[str] = None) -> VividCheckpoint:
    """Read a published VIVID ``.pkl`` snapshot safely: the network's state dict and ``_init_kwargs``.

    Takes ``network_key`` or else ``ema`` (else ``net``). Never executes the embedded module source;
    refuses (CheckpointError naming it) any global outside :data:`VIVID_PICKLE_ALLOWED` and the
    framework's tensor/container basics. Tensors keep their stored dtype (float16).
    """
    data = safe_unpickle(str(path), VIVID_PICKLE_ALLOWED)
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a snapshot dict (EasyDict with 'ema'), got {type(data).__name__}")
    key = network_key or ("ema" if "ema" in data else "net")
    network = data.get(key)
    if not isinstance(network, InertObject) or not isinstance(network.state, dict):
        raise CheckpointError(path, f"expected a persistent network under {key!r}; top-level keys: {list(data)}")
    class_name = network._qualname
    if class_name != NETWORK_CLASS:
        raise CheckpointError(path, f"{key!r} is a {class_name}: expected a VIVID {NETWORK_CLASS}")
    if network.state.get("_init_args"):
        raise CheckpointError(path, "network has positional constructor args: expected keyword args only")
    init_kwargs = network.state.get("_init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise CheckpointError(path, "network has no _init_kwargs: cannot rebuild it")
    state_dict = {k: t.detach() for k, t in module_state_dict(network).items()}
    extras = {k: _describe(v) for k, v in data.items() if k != key}
    return VividCheckpoint(str(path), class_name, dict(init_kwargs), state_dict, extras)


# --------------------------------------------------------------------------------------------
# Converted format and format detection.

def convert_vivid_pickle(path: PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Converter for ``nvs_core.convert``: (state_dict, config) of a published snapshot."""
    ckpt = load_vivid_pickle(path)
    return ckpt.state_dict, {"method": METHOD, "class": NETWORK_CLASS, "constructor": ckpt.init_kwargs,
                             "meta": {"source": Path(path).name, "source_format": "pickle"}}


def save_vivid_converted(path: PathLike, ckpt: VividCheckpoint) -> None:
    """Write ``path`` (.safetensors) and its ``.json`` config with the constructor kwargs."""
    config = {"method": METHOD, "class": NETWORK_CLASS, "constructor": ckpt.init_kwargs,
              "meta": {"source": Path(ckpt.source).name}}
    save_with_config(path, ckpt.state_dict, config)


def load_vivid_checkpoint(path: PathLike) -> VividCheckpoint:
    """A published ``.pkl`` snapshot or a converted ``.safetensors`` (+ config), detected from content."""
    fmt = sniff_format(path)
    log.info("%s: detected %s; reading it as a VIVID checkpoint", path, fmt)
    if fmt == "pickle":
        return load_vivid_pickle(path)
    if fmt == "safetensors":
        state_dict, config = load_with_config(path)
        if config.get("method") not in ("", METHOD) or not config.get("constructor"):
            raise CheckpointError(path, f"expected a converted VIVID checkpoint (method {METHOD!r} with "
                                        f"constructor kwargs), got method {config.get('method')!r}")
        return VividCheckpoint(str(path), config.get("class") or NETWORK_CLASS, dict(config["constructor"]),
                               state_dict, {"meta": config.get("meta", {})})
    raise CheckpointError(path, f"found {fmt}: expected a VIVID .pkl snapshot or a converted .safetensors")


def load_vivid(path: PathLike, device: Union[torch.device, str, None] = None,
               dtype: Optional[torch.dtype] = torch.float32) -> NVPrecond:
    """Load a VIVID network from either format, ready for sampling."""
    return load_vivid_checkpoint(path).build(device, dtype)


def _register_converter() -> None:
    from ..convert import register_converter

    register_converter(METHOD, convert_vivid_pickle)


_register_converter()
