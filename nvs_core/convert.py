"""Checkpoint conversion to our format: ``X.safetensors`` + ``X.json`` (ARCHITECTURE.md section 5).

Method modules register a converter ``fn(path) -> (state_dict, config)`` with
:func:`register_converter`; the generic "state_dict" converter handles any safely loadable tensor dict.
CLI: ``python -m nvs_core convert SRC --method NAME --out DST.safetensors``.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from .checkpoints import CheckpointError, load_checkpoint, save_with_config

Converter = Callable[[str], Tuple[Dict[str, torch.Tensor], dict]]
_CONVERTERS: Dict[str, Converter] = {}


def register_converter(name: str, fn: Optional[Converter] = None):
    """Register ``fn`` under ``name`` (a later registration replaces it); usable as a decorator."""
    if fn is None:
        return lambda f: register_converter(name, f)
    _CONVERTERS[name] = fn
    return fn


def converters() -> Dict[str, Converter]:
    return dict(_CONVERTERS)


def tensor_dict(obj, path) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: the object itself or its ``state_dict`` entry."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, f"expected a non-empty dict of tensors, got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"entry {key!r} is {type(value).__name__}: expected a dict of tensors")
    return dict(obj)


@register_converter("state_dict")
def convert_state_dict(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    obj, fmt = load_checkpoint(path)
    return tensor_dict(obj, path), {"method": "state_dict", "meta": {"source": Path(path).name,
                                                                    "source_format": fmt}}


def _discover(method: str) -> None:
    # Method packages register their converter on import; by convention in nvs_core.<method>[.loading].
    if not method.isidentifier():
        return
    for name in (f"{__package__}.{method}", f"{__package__}.{method}.loading"):
        if method in _CONVERTERS:
            return
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):  # a real missing dependency: report it
                raise


def convert(src, method: str, out) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Run converter ``method`` on ``src`` and write ``out`` (+ sidecar JSON); returns what was written."""
    if method not in _CONVERTERS:
        _discover(method)
    if method not in _CONVERTERS:
        raise CheckpointError(src, f"unknown conversion method {method!r}: expected one of {sorted(_CONVERTERS)}")
    state_dict, config = _CONVERTERS[method](str(src))
    config = {"method": method, **config}
    save_with_config(out, state_dict, config)
    return state_dict, config


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert a checkpoint to safetensors + JSON config",
                              description="Load SRC safely and write DST.safetensors plus DST.json.")
    p.add_argument("src", help="checkpoint to convert (format is detected from content)")
    p.add_argument("--method", default="state_dict",
                   help="converter name (default: state_dict, for any plain tensor dict)")
    p.add_argument("--out", required=True, help="output path ending in .safetensors")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    try:
        state_dict, config = convert(args.src, args.method, args.out)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    numel = sum(t.numel() for t in state_dict.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state_dict.values()})
    fmt = config.get("meta", {}).get("source_format", "?")
    print(f"{args.src}: {fmt} checkpoint, method {args.method}: {len(state_dict)} tensors, "
          f"{numel:,} values ({', '.join(dtypes)})")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0
