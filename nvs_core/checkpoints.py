"""Safe checkpoint loading (ARCHITECTURE.md section 5).

Nothing in a checkpoint file ever runs: safetensors are validated before parsing, torch files go through
``torch.load(weights_only=True)`` or our own allow-list unpickler, and classes that a format pickles
(ViewNeTI mappers, EDM2 networks) become inert stand-ins holding plain data. Every error is a
:class:`CheckpointError` naming the file and what was expected.

Typical use::

    obj, fmt = load_checkpoint(path)                       # sniff, dispatch, log the format
    sd, cfg = load_with_config("models/nvs/x.safetensors")  # our converted format
    mapper, _ = load_checkpoint(p, allowed={("neti.mapper", "NeTIMapper"): stand_in,
                                            **TORCH_MODULE_STAND_INS})
    weights = module_state_dict(mapper)
"""
from __future__ import annotations

import _compat_pickle
import argparse
import builtins
import collections
import contextlib
import copyreg
import datetime
import functools
import io
import json
import logging
import math
import os
import pathlib
import pickle
import pickletools
import re
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import torch

log = logging.getLogger(__name__)

NVS_FORMAT = "comfyui-nvs"
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy (non-zip) torch.save file
_TORCH_LEGACY_PROTOCOL = 1001
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_JSON_SNIFF_LIMIT = 64 << 20

__all__ = [
    "CheckpointError", "sniff_format", "load_safetensors", "load_torch_weights", "numpy_scalar_safe_globals",
    "InertObject",
    "stand_in", "module_state_dict", "TORCH_MODULE_STAND_INS", "AllowListUnpickler", "safe_unpickle",
    "safe_torch_load", "load_checkpoint", "load_with_config", "save_with_config", "check_state_dict",
]


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message starts with the file name.

    ``global_name`` is set (``"module.qualname"``) when the file was refused for pickling a global.
    """

    def __init__(self, path: Any, message: str, global_name: Optional[str] = None):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.global_name = global_name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# ----------------------------------------------------------------------------------------- sniffing

def sniff_format(path) -> str:
    """Detect a checkpoint format from its content: "safetensors", "torch_zip", "torch_legacy",
    "pickle", "json" or "unknown". Corrupt safetensors and zip files raise :class:`CheckpointError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] == b"PK\x03\x04":
                return "torch_zip" if _zip_pickle_name(_zip_names(path)) else "unknown"
            n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
            if head[8:9] == b"{" and 2 <= n <= _SAFETENSORS_MAX_HEADER:
                _safetensors_header(path)  # validates, so loaders never hit a safetensors panic
                return "safetensors"
            if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
                f.seek(0)
                return "torch_legacy" if _starts_with_torch_magic(f) else "pickle"
    except OSError as e:
        raise CheckpointError(path, f"cannot read file ({e.strerror or e})") from None
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"[") and path.stat().st_size <= _JSON_SNIFF_LIMIT:
        try:
            json.loads(path.read_bytes().decode("utf-8-sig"))
            return "json"
        except ValueError:
            pass
    return "unknown"


def _starts_with_torch_magic(f) -> bool:
    # pickletools only parses opcodes; nothing is constructed.
    try:
        for op, arg, _ in pickletools.genops(f):
            if op.name not in ("PROTO", "FRAME"):
                return op.name == "LONG1" and arg == _TORCH_MAGIC
    except Exception:
        pass
    return False


def _zip_names(path) -> list:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(path, f"corrupt or truncated zip archive ({e}); expected a torch.save "
                                    "checkpoint") from None


def _zip_pickle_name(names: Iterable[str]) -> Optional[str]:
    # torch.save puts everything under one top folder named after the file: "<stem>/data.pkl".
    for n in names:
        if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1):
            return n
    return None


# --------------------------------------------------------------------------------------- safetensors

_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8}


def _safetensors_header(path) -> dict:
    """Read and check a safetensors header against the file size; return the parsed header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(path, "truncated safetensors file: expected an 8-byte header length")
        n = int.from_bytes(raw, "little")
        if n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise CheckpointError(path, f"truncated or corrupt safetensors file: header length says {n} bytes "
                                        f"but only {size - 8} follow")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(path, f"corrupt safetensors header: expected JSON ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header: expected a JSON object")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                  and all(isinstance(s, int) and s >= 0 for s in shape))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(path, f"corrupt safetensors entry {key!r}: expected dtype, shape and "
                                        f"data_offsets, got {str(info)[:200]}")
        if end > data_len:
            raise CheckpointError(path, f"truncated safetensors file: tensor {key!r} needs bytes {begin}..{end} "
                                        f"of the data section, which has {data_len}")
        width = _ST_BYTES.get(dtype)  # unknown (newer) dtypes are left to safetensors
        if width is not None and end - begin != width * math.prod(shape):
            raise CheckpointError(path, f"corrupt safetensors entry {key!r}: {dtype}{list(shape)} needs "
                                        f"{width * math.prod(shape)} bytes, offsets give {end - begin}")
    return header


def load_safetensors(path, device="cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Validate then load a safetensors file; returns ``(state_dict, metadata)``."""
    header = _safetensors_header(path)
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path), device=str(device))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # safetensors' Rust panics derive from BaseException
        raise CheckpointError(path, f"safetensors could not read the file ({_first_line(e)})") from None
    return sd, dict(header.get("__metadata__") or {})


# ------------------------------------------------------------------------------- torch weights_only

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _refused(path, e: BaseException) -> CheckpointError:
    """Turn torch's weights-only UnpicklingError into a CheckpointError naming the offending global."""
    m = _GLOBAL_RE.search(str(e))
    if m is None:
        return CheckpointError(path, f"weights-only load failed ({_first_line(e)}); expected tensors and "
                                     "plain containers only")
    return CheckpointError(path, f"refuses global {m.group(1)}: expected tensors and plain containers only "
                                 "(allow safe classes via extra_safe_globals or an allow-list)",
                           global_name=m.group(1))


def load_torch_weights(path, extra_safe_globals: Iterable = ()) -> Any:
    """``torch.load(weights_only=True)`` to CPU; ``extra_safe_globals`` must themselves be safe classes."""
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None
    except Exception as e:
        raise CheckpointError(path, f"not a readable torch checkpoint ({_first_line(e)})") from None


def numpy_scalar_safe_globals() -> list:
    """``extra_safe_globals`` for numpy scalars as full training checkpoints pickle them (e.g. Lightning
    optimizer/scheduler states holding numpy.float64 learning rates): numpy's scalar reconstructor under its
    numpy-2 name and, mapped explicitly, the numpy-1 name (``numpy.core.multiarray.scalar``, how 2023 files
    spell it), ``numpy.dtype`` and the plain numeric dtype classes. All of them only build numbers."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    for kind in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_):
        dtype_class = type(np.dtype(kind))
        if dtype_class is not np.dtype:
            out.append(dtype_class)
    return out


# ---------------------------------------------------------------------------------------- stand-ins

class InertObject:
    """Inert stand-in for a pickled class: records what the pickle passes, runs nothing from the file.

    ``args``/``kwargs`` are the constructor arguments, ``state`` the ``__setstate__`` state (a dict for
    ordinary objects; slot state is merged in), ``items``/``list_items`` what dict/list subclasses add.
    Keys of a dict state are also readable as attributes.
    """

    _module = ""
    _qualname = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, list_items=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass  # arguments were recorded by __new__ (pickle's NEWOBJ calls only __new__)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) form
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __getattr__(self, name):
        state = self.__dict__.get("state")
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(f"stand-in for {self._module}.{self._qualname} has no attribute {name!r}")

    def __repr__(self):
        keys = list(self.state) if isinstance(self.state, dict) else type(self.state).__name__
        return f"<stand-in {self._module}.{self._qualname} args={len(self.args)} state={keys}>"


@functools.lru_cache(maxsize=None)
def stand_in(module: str, qualname: str) -> type:
    """A named :class:`InertObject` subclass for ``module.qualname`` (cached: one class per name).

    As an allow-list value, the function itself means "a stand-in named after the global"."""
    return type(qualname.rpartition(".")[2], (InertObject,),
                {"_module": module, "_qualname": qualname, "__module__": __name__})


TORCH_MODULE_STAND_INS: Dict[Tuple[str, str], Any] = {("torch.nn.modules.*", "*"): stand_in}
"""Allow-list entry turning any pickled ``torch.nn`` module into a stand-in (see :func:`module_state_dict`)."""


def module_state_dict(obj, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Flatten a stand-in of a pickled ``torch.nn.Module`` into its state dict (parameters and
    persistent buffers, recursively), as ``module.state_dict()`` would have produced."""
    state = obj.state if isinstance(obj, InertObject) else None
    if not isinstance(state, dict):
        return {}
    out = {}
    skip = state.get("_non_persistent_buffers_set") or ()
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if isinstance(t, torch.Tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


# ------------------------------------------------------------------------------ allow-list contents

class _StorageType:
    """What a pickled ``torch.FloatStorage``-style global resolves to: just its dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "ByteStorage": torch.uint8, "CharStorage": torch.int8, "ShortStorage": torch.int16,
    "IntStorage": torch.int32, "LongStorage": torch.int64, "HalfStorage": torch.float16,
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


def _bad(message: str):
    # Raised inside reconstructors; the load wrapper adds the file name.
    raise pickle.UnpicklingError(message)


def _tensor_on(storage, offset, size, stride, dtype=None) -> torch.Tensor:
    if isinstance(storage, torch.storage.TypedStorage):
        untyped, dtype = storage._untyped_storage, dtype or storage.dtype
    elif isinstance(storage, torch.UntypedStorage):
        untyped, dtype = storage, dtype or torch.uint8
    else:
        _bad(f"expected a tensor storage, got {type(storage).__name__}")
    return torch.empty((0,), dtype=dtype).set_(untyped, offset, size, stride)


def _with_grad(t: torch.Tensor, requires_grad, metadata) -> torch.Tensor:
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)
    if requires_grad:
        t.requires_grad_(True)
    return t  # backward hooks are dropped: they would be code


def _rebuild_tensor(storage, offset, size, stride):
    return _tensor_on(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _with_grad(_tensor_on(storage, offset, size, stride), requires_grad, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        _bad(f"expected a torch dtype, got {type(dtype).__name__}")
    return _with_grad(_tensor_on(storage, offset, size, stride, dtype), requires_grad, metadata)


def _set_plain_state(t: torch.Tensor, state) -> torch.Tensor:
    # Tensor attributes pickled alongside (dict state) are data; they go to __dict__, bypassing setters.
    if isinstance(state, dict):
        t.__dict__.update(state)
    return t


def _rebuild_parameter(data, requires_grad, backward_hooks=None):
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _set_plain_state(torch.nn.Parameter(data, requires_grad), state)


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        _bad(f"refuses tensor subclass {getattr(new_type, '__qualname__', new_type)}")
    ret = func(*args)  # func came through find_class, so it is one of our reconstructors
    if not isinstance(ret, torch.Tensor):
        _bad("expected a tensor from the tensor reconstructor")
    return _set_plain_state(ret if type(ret) is new_type else ret.as_subclass(new_type), state)


def _load_from_bytes(b):
    # What pickle.dumps(tensor) embeds: a small torch.save stream, read with torch's own safe loader.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles carry bytes as _codecs.encode(str, "latin1"); nothing else is needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _bad(f"refuses _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_entries() -> dict:
    try:
        import numpy as np
    except ImportError:
        return {}
    core = getattr(np, "_core", None) or np.core
    real_reconstruct, real_scalar = core.multiarray._reconstruct, core.multiarray.scalar
    real_frombuffer = core.numeric._frombuffer

    def dtype(obj, align=False, copy=False):
        if not isinstance(obj, str):
            _bad(f"numpy.dtype expects a type string, got {type(obj).__name__}")
        return np.dtype(obj, bool(align), bool(copy))

    def reconstruct(subtype, shape, typecode):
        if subtype is not np.ndarray:
            _bad("numpy _reconstruct is only allowed for numpy.ndarray")
        return real_reconstruct(np.ndarray, shape, typecode)

    def scalar(dt, data=None):
        if not isinstance(dt, np.dtype):
            _bad("numpy scalar expects a numpy dtype")
        return real_scalar(dt) if data is None else real_scalar(dt, data)

    def frombuffer(buf, dt, shape, order):
        if not isinstance(dt, np.dtype) or dt.hasobject:
            _bad("numpy _frombuffer expects a plain numpy dtype")
        return real_frombuffer(buf, dt, shape, order)

    out = {("numpy", "dtype"): dtype, ("numpy", "ndarray"): np.ndarray}
    for pkg in ("numpy.core", "numpy._core"):
        out.update({(f"{pkg}.multiarray", "_reconstruct"): reconstruct, (f"{pkg}.multiarray", "scalar"): scalar,
                    (f"{pkg}.numeric", "_frombuffer"): frombuffer})
    return out


@functools.lru_cache(maxsize=None)
def _builtin_allow() -> Dict[Tuple[str, str], Any]:
    """Harmless basics, tensor rebuilding and numpy arrays/scalars (copy before mutating)."""
    allow: Dict[Tuple[str, str], Any] = {
        ("builtins", n): getattr(builtins, n)
        for n in ("set", "frozenset", "slice", "complex", "range", "bytearray", "bytes", "list", "dict",
                  "tuple", "int", "float", "bool", "str", "object")
    }
    allow.update({
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("collections", "Counter"): collections.Counter,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,  # only combines already-allowed classes
        ("_codecs", "encode"): _codecs_encode,
        ("argparse", "Namespace"): argparse.Namespace,
        ("types", "SimpleNamespace"): types.SimpleNamespace,
        ("datetime", "datetime"): datetime.datetime, ("datetime", "date"): datetime.date,
        ("datetime", "timedelta"): datetime.timedelta,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath, ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
        ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
        ("torch", "Tensor"): torch.Tensor, ("torch._tensor", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
    })
    allow.update({("torch", n): _StorageType(dt) for n, dt in _STORAGE_DTYPES.items()})
    allow.update(_numpy_entries())
    return allow


def _torch_constant(module: str, name: str):
    # "torch float16" and friends: attribute lookups restricted to dtypes, layouts and memory formats.
    if module == "torch":
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
    return None


_DANGEROUS_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
                      "ctypes", "pty", "code", "codeop", "webbrowser", "multiprocessing", "signal",
                      "pickle", "_pickle", "marshal", "types", "io", "_io", "tempfile", "pathlib"}
_DANGEROUS_BUILTINS = {"eval", "exec", "compile", "getattr", "setattr", "delattr", "__import__", "open",
                       "input", "breakpoint", "globals", "locals", "vars", "type", "memoryview", "help"}
_MISSING = object()


# ------------------------------------------------------------------------------ allow-list unpickler

class AllowListUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals.

    ``allowed`` maps ``(module, qualname)`` to the object the global stands for: a safe reconstructor,
    a safe class, an :class:`InertObject` subclass, or :func:`stand_in` itself (a stand-in named after
    the global). Keys may use wildcards: ``(module, "*")`` and ``("package.*", "*")``. The built-in
    basics (:func:`_builtin_allow`) are always included unless ``builtin=False``. Anything else raises
    :class:`CheckpointError` ("refuses global os.system").
    """

    def __init__(self, file, allowed: Optional[Mapping] = None, *, name: Optional[str] = None,
                 persistent_load: Optional[Callable[[Any], Any]] = None, builtin: bool = True):
        super().__init__(file)
        self.allowed = {**(_builtin_allow() if builtin else {}), **dict(allowed or {})}
        self.name = name or getattr(file, "name", "<stream>")
        self._persistent = persistent_load

    def persistent_load(self, pid):
        if self._persistent is None:
            _bad(f"unexpected persistent id {str(pid)[:80]} in a plain pickle")
        return self._persistent(pid)

    def _lookup(self, module: str, name: str):
        for key in ((module, name), (module, "*")):
            if key in self.allowed:
                return self.allowed[key]
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            key = (".".join(parts[:i]) + ".*", "*")
            if key in self.allowed:
                return self.allowed[key]
        value = _torch_constant(module, name)
        return _MISSING if value is None else value

    def find_class(self, module: str, name: str):
        # Python 2 names (copy_reg, __builtin__) map to their Python 3 homes; the allow-list still decides.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        value = self._lookup(module, name)
        if value is stand_in:
            value = stand_in(module, name)
        inert = isinstance(value, type) and issubclass(value, InertObject)
        # Defense in depth: a caller's allow-list may map dangerous names only to stand-ins.
        dangerous = (module.split(".")[0] in _DANGEROUS_MODULES
                     or (module == "builtins" and name in _DANGEROUS_BUILTINS))
        if value is _MISSING or (dangerous and not inert and value is not _builtin_allow().get((module, name))):
            why = ("not on the allow-list (expected tensors, plain containers and allowed classes)"
                   if value is _MISSING else "a dangerous name may only be allowed as a stand-in")
            raise CheckpointError(self.name, f"refuses global {module}.{name}: {why}",
                                  global_name=f"{module}.{name}")
        return value


def _run(unpickler: AllowListUnpickler) -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if _GLOBAL_RE.search(str(e)):  # refused inside an embedded torch stream
            raise _refused(unpickler.name, e) from None
        raise CheckpointError(unpickler.name, f"unsafe or corrupt pickle data ({_first_line(e)})") from None
    except Exception as e:
        raise CheckpointError(unpickler.name, f"corrupt or truncated pickle data ({_first_line(e)})") from None


def safe_unpickle(path_or_fileobj, allowed: Mapping = {}) -> Any:
    """Unpickle a plain pickle (path or binary file object) with the allow-list unpickler."""
    if hasattr(path_or_fileobj, "read"):
        return _run(AllowListUnpickler(path_or_fileobj, allowed))
    try:
        with open(path_or_fileobj, "rb") as f:
            return _run(AllowListUnpickler(f, allowed, name=str(path_or_fileobj)))
    except OSError as e:
        raise CheckpointError(path_or_fileobj, f"cannot read file ({e.strerror or e})") from None


# --------------------------------------------------------------------------- torch files, our reader

def _untyped(buf: bytearray, element_size: int, swap: bool) -> torch.UntypedStorage:
    t = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    if swap and element_size > 1:
        t = t.view(-1, element_size).flip(1).reshape(-1)
    return t.untyped_storage()


def _typed(untyped: torch.UntypedStorage, dtype: torch.dtype):
    # TypedStorage is what torch's own reconstructors receive; _internal avoids the deprecation warning.
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _storage_pid(path, pid, length: int):
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
        raise CheckpointError(path, f"unexpected persistent id {str(pid)[:80]}: expected a tensor storage")
    return pid[1].dtype


def _load_torch_zip(path, allowed: Mapping) -> Any:
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        pkl = _zip_pickle_name(names)
        if pkl is None:
            raise CheckpointError(path, "zip archive without data.pkl: expected a torch.save checkpoint")
        prefix = pkl[: -len("data.pkl")]
        order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if order not in ("little", "big"):
            raise CheckpointError(path, f"unknown byteorder {order!r}: expected little or big")
        storages: Dict[str, Any] = {}

        def load_storage(pid):
            dtype = _storage_pid(path, pid, 5)
            key, numel = str(pid[2]), pid[4]  # the location (pid[3]) is ignored: everything loads to CPU
            if key not in storages:
                size = dtype.itemsize
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise CheckpointError(path, f"missing storage record {record}")
                info = z.getinfo(record)
                if info.file_size != numel * size:
                    raise CheckpointError(path, f"storage {record}: expected {numel * size} bytes, "
                                                f"found {info.file_size}")
                buf = bytearray(info.file_size)
                with z.open(info) as f:
                    f.readinto(buf)
                storages[key] = _typed(_untyped(buf, size, order != sys.byteorder), dtype)
            return storages[key]

        return _run(AllowListUnpickler(io.BytesIO(z.read(pkl)), allowed, name=str(path),
                                       persistent_load=load_storage))


def _load_torch_legacy(path, allowed: Mapping) -> Any:
    # Layout: pickles of magic number, protocol, sys_info, the object (storages as persistent ids), the
    # list of storage keys; then per key an int64 element count and the raw bytes, little-endian.
    name, file_size = str(path), os.path.getsize(path)
    with open(path, "rb") as f:
        header = [_run(AllowListUnpickler(f, name=name, builtin=False)) for _ in range(3)]
        if header[0] != _TORCH_MAGIC or header[1] != _TORCH_LEGACY_PROTOCOL:
            raise CheckpointError(path, "corrupt legacy torch file: expected magic number and protocol 1001")
        roots: Dict[str, Tuple[torch.UntypedStorage, torch.dtype]] = {}

        def load_storage(pid):
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                return pid[1]  # a pickled module class: it already passed find_class
            dtype = _storage_pid(path, pid, 6)
            _, _, key, _, numel, view = pid
            size = dtype.itemsize
            if key not in roots:
                if numel * size > file_size:  # never allocate more than the file could hold
                    raise CheckpointError(path, f"corrupt legacy torch file: storage {key!r} claims "
                                                f"{numel * size} bytes, the file has {file_size}")
                roots[key] = (torch.UntypedStorage(numel * size), dtype)
            root = roots[key][0]
            if view is not None:
                _, offset, view_numel = view
                root = root[offset * size:(offset + view_numel) * size]
            return _typed(root, dtype)

        result = _run(AllowListUnpickler(f, allowed, name=name, persistent_load=load_storage))
        keys = _run(AllowListUnpickler(f, name=name, builtin=False))
        for key in keys:
            if key not in roots:
                raise CheckpointError(path, f"corrupt legacy torch file: unknown storage key {key!r}")
            root, dtype = roots[key]
            size = dtype.itemsize
            count = int.from_bytes(f.read(8), "little")
            buf = bytearray(root.nbytes())
            if count * size != len(buf) or f.readinto(buf) != len(buf):
                raise CheckpointError(path, f"truncated or corrupt legacy torch file at storage {key!r}: "
                                            f"expected {len(buf)} bytes")
            root.copy_(_untyped(buf, size, sys.byteorder != "little"))
    return result


def safe_torch_load(path, allowed: Mapping = {}) -> Any:
    """Read a torch.save file (zip or legacy) with the allow-list unpickler, for formats that pickle
    custom classes. Prefer :func:`load_torch_weights` when the file holds only tensors and containers."""
    fmt = sniff_format(path)
    if fmt == "torch_zip":
        return _load_torch_zip(path, allowed)
    if fmt == "torch_legacy":
        return _load_torch_legacy(path, allowed)
    raise CheckpointError(path, f"expected a torch.save checkpoint (zip or legacy), found {fmt}")


# --------------------------------------------------------------------------------------- dispatcher

def load_checkpoint(path, allowed: Optional[Mapping] = None) -> Tuple[Any, str]:
    """Sniff the format, load safely and return ``(obj, fmt)``. Safetensors give the state dict.

    Torch files use ``torch.load(weights_only=True)`` unless ``allowed`` is given; if torch refuses a
    global, the built-in allow-list (numpy scalars and arrays, namespaces, ...) gets a second try.
    """
    fmt = sniff_format(path)
    log.info("%s: detected %s checkpoint", path, fmt)
    if fmt == "safetensors":
        return load_safetensors(path)[0], fmt
    if fmt in ("torch_zip", "torch_legacy"):
        if allowed is not None:
            return safe_torch_load(path, allowed), fmt
        try:
            return load_torch_weights(path), fmt
        except CheckpointError as e:
            if e.global_name is None:
                raise
            log.info("%s: torch refused %s; retrying with the built-in allow-list", path, e.global_name)
            return safe_torch_load(path), fmt
    if fmt == "pickle":
        return safe_unpickle(path, allowed or {}), fmt
    if fmt == "json":
        return json.loads(Path(path).read_bytes().decode("utf-8-sig")), fmt
    with open(path, "rb") as f:
        head = f.read(8)
    raise CheckpointError(path, f"unknown format (first bytes {head!r}): expected safetensors, a torch.save "
                                "checkpoint, a pickle or JSON")


# ------------------------------------------------------------------------ converted format (ours)

def _normalize_config(cfg, source) -> dict:
    if not isinstance(cfg, dict):
        raise CheckpointError(source, f"config must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("format") != NVS_FORMAT:
        raise CheckpointError(source, f"expected config format {NVS_FORMAT!r}, got {cfg.get('format')!r}")
    return {"format": NVS_FORMAT, "method": "", "class": "", "constructor": {}, "meta": {}, **cfg}


def load_with_config(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Load ``X.safetensors`` and its config: sidecar ``X.json``, else metadata ``nvs_config`` (a full
    config, or bare constructor kwargs with optional ``nvs_method``/``nvs_class`` metadata)."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    sd, meta = load_safetensors(path)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            cfg = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(sidecar, f"unreadable config: expected JSON ({_first_line(e)})") from None
        return sd, _normalize_config(cfg, sidecar)
    if "nvs_config" not in meta:
        raise CheckpointError(path, f"no config: expected sidecar {sidecar.name} or safetensors metadata "
                                    "'nvs_config'")
    try:
        cfg = json.loads(meta["nvs_config"])
    except ValueError as e:
        raise CheckpointError(path, f"metadata 'nvs_config' is not JSON ({_first_line(e)})") from None
    if isinstance(cfg, dict) and "format" not in cfg:  # bare constructor kwargs
        cfg = {"format": NVS_FORMAT, "method": meta.get("nvs_method", ""), "class": meta.get("nvs_class", ""),
               "constructor": cfg}
    return sd, _normalize_config(cfg, path)


def _contiguous_unshared(state_dict: Mapping, path) -> Dict[str, torch.Tensor]:
    out, seen = {}, set()
    for key, t in state_dict.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(path, f"state dict entry {key!r}: expected str -> tensor, "
                                        f"got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors sharing memory (tied weights): store a copy
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format still
    work); on success it replaces ``path``, so a reader never sees half a file; on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_with_config(path, state_dict: Mapping[str, torch.Tensor], config: Mapping) -> None:
    """Write ``X.safetensors`` and ``X.json`` atomically; the config is also stored in the metadata
    key ``nvs_config`` so the safetensors file works alone."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(path, "expected a .safetensors output path")
    cfg = {"method": "", "class": "", "constructor": {}, "meta": {}, **dict(config), "format": NVS_FORMAT}
    try:
        text = json.dumps(cfg, indent=2)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"config must be JSON-serialisable ({_first_line(e)})") from None
    tensors = _contiguous_unshared(state_dict, path)
    from safetensors.torch import save_file

    with atomic_path(path.with_suffix(".json")) as json_tmp, atomic_path(path) as tensors_tmp:
        save_file(tensors, str(tensors_tmp), metadata={"format": "pt", "nvs_config": json.dumps(cfg)})
        json_tmp.write_text(text + "\n", encoding="utf-8")


def check_state_dict(expected: Mapping[str, Any], got: Mapping[str, torch.Tensor], path) -> None:
    """Compare keys and shapes; ``expected`` maps key -> shape (or a tensor, or None to skip the shape)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing:
        shape = getattr(expected[missing[0]], "shape", expected[missing[0]])
        extra = f"; {len(unexpected)} unexpected, first {unexpected[0]!r}" if unexpected else ""
        raise CheckpointError(path, f"missing key {missing[0]!r} (expected shape "
                                    f"{tuple(shape) if shape is not None else 'any'}); "
                                    f"{len(missing)} missing in all{extra}")
    if unexpected:
        raise CheckpointError(path, f"unexpected key {unexpected[0]!r}; {len(unexpected)} unexpected in all")
    for key, shape in expected.items():
        shape = getattr(shape, "shape", shape)
        if shape is not None and tuple(got[key].shape) != tuple(shape):
            raise CheckpointError(path, f"shape mismatch for {key!r}: expected {tuple(shape)}, "
                                        f"got {tuple(got[key].shape)}")
