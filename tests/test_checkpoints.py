"""Safe checkpoint loading: format sniffing, round trips, hostile files, stand-ins, the convert CLI."""
import json
import os
import pickle
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nvs_core.checkpoints import (
    TORCH_MODULE_STAND_INS, AllowListUnpickler, CheckpointError, InertObject, check_state_dict,
    load_checkpoint, load_safetensors, load_torch_weights, load_with_config, module_state_dict,
    safe_torch_load, safe_unpickle, save_with_config, sniff_format, stand_in,
)
from nvs_core import convert

ROOT = Path(__file__).resolve().parents[1]


def _sd():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int64),
            "h": torch.randn(2, 2, generator=g).half(), "bf": torch.ones(3, dtype=torch.bfloat16)}


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# Hostile payloads: unpickling them unsafely would create the marker file.
class _Shell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class Mapper:
    """Stands for a third-party class pickled whole (ViewNeTI-style); its code must never run."""

    def __init__(self):
        self.weight = torch.ones(2, 3)
        self.cfg = {"layers": 2}

    def __setstate__(self, state):
        raise AssertionError("real __setstate__ ran")


# ------------------------------------------------------------------------------------ round trips

def test_safetensors_round_trip(tmp_path):
    p = tmp_path / "a.bin"  # content decides, not the extension
    save_file(_sd(), str(p), metadata={"k": "v"})
    assert sniff_format(p) == "safetensors"
    sd, meta = load_safetensors(p)
    _same(sd, _sd())
    assert meta["k"] == "v"
    obj, fmt = load_checkpoint(p)
    assert fmt == "safetensors"
    _same(obj, _sd())


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_round_trip(tmp_path, legacy):
    p = tmp_path / "m.ckpt"
    sd = _sd()
    sd["view"] = sd["w"][1:, 2:]  # a non-contiguous view sharing storage
    obj = {"state_dict": sd, "epoch": 3, "names": ["a", "b"], "od": OrderedDict(x=1), "s": {1, 2}}
    torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
    assert sniff_format(p) == ("torch_legacy" if legacy else "torch_zip")
    for loaded in (load_torch_weights(p), safe_torch_load(p), load_checkpoint(p)[0], load_checkpoint(p, {})[0]):
        _same(loaded["state_dict"], sd)
        assert loaded["epoch"] == 3 and loaded["names"] == ["a", "b"] and loaded["s"] == {1, 2}
        assert loaded["od"] == OrderedDict(x=1)


def test_torch_zip_parameters_and_new_dtypes(tmp_path):
    p = tmp_path / "p.pt"
    obj = {"p": torch.nn.Parameter(torch.randn(2, 2)), "f8": torch.ones(3).to(torch.float8_e4m3fn),
           "u16": torch.arange(4).to(torch.uint16), "dt": torch.float16, "size": torch.Size([2, 3])}
    torch.save(obj, p)
    got = safe_torch_load(p)
    assert isinstance(got["p"], torch.nn.Parameter) and torch.equal(got["p"], obj["p"])
    assert got["f8"].dtype == torch.float8_e4m3fn and torch.equal(got["f8"].float(), torch.ones(3))
    assert torch.equal(got["u16"].long(), torch.arange(4)) and got["dt"] is torch.float16 and got["size"] == (2, 3)


def test_plain_pickle_round_trip(tmp_path):
    p = tmp_path / "x.pkl"
    obj = {"t": torch.arange(6.0).reshape(2, 3), "a": np.arange(4, dtype=np.float32), "n": np.int64(7),
           "c": 1 + 2j, "sl": slice(1, 5), "fs": frozenset({3})}
    for protocol in (2, 4, 5):
        p.write_bytes(pickle.dumps(obj, protocol=protocol))
        assert sniff_format(p) == "pickle"
        got, fmt = load_checkpoint(p)
        assert fmt == "pickle" and torch.equal(got["t"], obj["t"]) and np.array_equal(got["a"], obj["a"])
        assert got["n"] == 7 and got["c"] == 1 + 2j and got["sl"] == slice(1, 5) and got["fs"] == {3}


def test_json_sniffed(tmp_path):
    p = tmp_path / "c.weights"
    p.write_text(json.dumps({"a": [1, 2]}))
    assert sniff_format(p) == "json"
    assert load_checkpoint(p) == ({"a": [1, 2]}, "json")


def test_numpy_scalars_in_torch_checkpoint(tmp_path):
    p = tmp_path / "np.pt"
    torch.save({"step": np.int64(1200), "lr": np.float32(1e-4), "arr": np.arange(3.0), "w": torch.ones(2)}, p)
    with pytest.raises(CheckpointError, match="numpy"):
        load_torch_weights(p)  # torch's default allow-list lacks numpy scalars
    for got in (safe_torch_load(p), load_checkpoint(p)[0]):
        assert got["step"] == 1200 and isinstance(got["step"], np.int64)
        assert got["lr"] == np.float32(1e-4) and np.array_equal(got["arr"], np.arange(3.0))


# -------------------------------------------------------------------------------- hostile files

def test_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"x": _Shell(marker)}))
    for load in (safe_unpickle, lambda q: load_checkpoint(q)[0]):
        with pytest.raises(CheckpointError, match=r"refuses global (os|posix|nt)\.system") as e:
            load(p)
        assert str(p) in str(e.value)
    assert not marker.exists()


def test_pickle_with_builtins_eval_is_refused(tmp_path):
    p = tmp_path / "eval.pkl"
    p.write_bytes(pickle.dumps(_Eval()))
    with pytest.raises(CheckpointError, match=r"refuses global builtins\.eval"):
        safe_unpickle(p)


def test_dangerous_globals_cannot_be_allowed_except_as_stand_ins(tmp_path):
    p = tmp_path / "evil.pkl"
    marker = tmp_path / "pwned"
    p.write_bytes(pickle.dumps(_Shell(marker)))
    name = os.system.__module__
    with pytest.raises(CheckpointError, match="refuses global"):
        safe_unpickle(p, {(name, "system"): os.system})
    inert = safe_unpickle(p, {(name, "system"): stand_in})
    assert isinstance(inert, InertObject) and inert.args == (f"touch {marker}",)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_file_with_malicious_reduce_is_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Shell(marker)}, p, _use_new_zipfile_serialization=not legacy)
    pattern = r"refuses global (os|posix|nt)\.system"
    for load in (load_torch_weights, safe_torch_load, lambda q: load_checkpoint(q)[0],
                 lambda q: load_checkpoint(q, allowed={})[0]):
        with pytest.raises(CheckpointError, match=pattern) as e:
            load(p)
        assert str(p) in str(e.value)
    assert not marker.exists()


def test_malicious_tensor_bytes_inside_plain_pickle(tmp_path):
    # pickle.dumps(tensor) embeds a torch stream; a hostile one must be refused there too.
    marker = tmp_path / "pwned"
    import io
    buf = io.BytesIO()
    torch.save(_Shell(marker), buf, _use_new_zipfile_serialization=False)

    class Smuggle:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (buf.getvalue(),))

    p = tmp_path / "smuggle.pkl"
    p.write_bytes(pickle.dumps(Smuggle()))
    with pytest.raises(CheckpointError, match=r"(os|posix|nt)\.system"):
        safe_unpickle(p)
    assert not marker.exists()


def _write_safetensors(tmp_path, name="t.safetensors"):
    p = tmp_path / name
    save_file({"a": torch.randn(64, 64), "b": torch.zeros(10)}, str(p))
    return p


def test_truncated_safetensors(tmp_path):
    p = _write_safetensors(tmp_path)
    p.write_bytes(p.read_bytes()[:-100])
    for fn in (sniff_format, load_safetensors, load_checkpoint):
        with pytest.raises(CheckpointError, match="truncated") as e:
            fn(p)
        assert str(p) in str(e.value)


def test_safetensors_header_larger_than_file(tmp_path):
    p = _write_safetensors(tmp_path)
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    p.write_bytes((n + 10_000_000).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match=r"header length says \d+ bytes") as e:
        load_safetensors(p)
    assert str(p) in str(e.value)


def test_safetensors_bad_header_json(tmp_path):
    p = _write_safetensors(tmp_path)
    data = bytearray(p.read_bytes())
    data[12:16] = b"\xff\xfe!!"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_checkpoint(p)


def test_random_bytes_are_unknown(tmp_path):
    p = tmp_path / "noise.safetensors"
    p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    assert sniff_format(p) == "unknown"
    with pytest.raises(CheckpointError, match="unknown format") as e:
        load_checkpoint(p)
    assert str(p) in str(e.value)


def test_corrupt_zip_names_file(tmp_path):
    p = tmp_path / "z.pt"
    torch.save(_sd(), p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="zip") as e:
        load_checkpoint(p)
    assert str(p) in str(e.value)


def test_state_dict_mismatches():
    expected = {"a": (2, 3), "b": torch.zeros(4)}
    check_state_dict(expected, {"a": torch.zeros(2, 3), "b": torch.zeros(4)}, "f.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"f\.safetensors: shape mismatch for 'a': expected \(2, 3\), got \(3, 2\)"):
        check_state_dict(expected, {"a": torch.zeros(3, 2), "b": torch.zeros(4)}, "f.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key 'b'.*unexpected, first 'c'"):
        check_state_dict(expected, {"a": torch.zeros(2, 3), "c": torch.zeros(1)}, "f")
    with pytest.raises(CheckpointError, match=r"unexpected key 'c'"):
        check_state_dict(expected, {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, "f")


# ---------------------------------------------------------------------------------- stand-ins

def test_stand_in_captures_state_without_running_code(tmp_path):
    p = tmp_path / "mapper.pkl"
    p.write_bytes(pickle.dumps({"mapper": Mapper()}))
    with pytest.raises(CheckpointError, match=rf"refuses global {__name__}\.Mapper"):
        safe_unpickle(p)
    got = safe_unpickle(p, {(__name__, "Mapper"): stand_in})
    m = got["mapper"]
    assert isinstance(m, InertObject) and type(m) is stand_in(__name__, "Mapper")
    assert torch.equal(m.state["weight"], torch.ones(2, 3)) and m.cfg == {"layers": 2}
    assert "Mapper" in repr(m)


def test_stand_in_module_tree_in_torch_file(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    for legacy in (False, True):
        p = tmp_path / f"net{legacy}.pt"
        torch.save({"net": net, "step": 5}, p, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=r"refuses global torch\.nn\.modules"):
            load_torch_weights(p)
        got, _ = load_checkpoint(p, allowed=TORCH_MODULE_STAND_INS)
        _same(module_state_dict(got["net"]), net.state_dict())


def test_allow_list_unpickler_on_file_object(tmp_path):
    import io
    blob = io.BytesIO(pickle.dumps([OrderedDict(a=1), {2, 3}]))
    assert AllowListUnpickler(blob).load() == [OrderedDict(a=1), {2, 3}]
    with pytest.raises(CheckpointError, match="refuses global collections.OrderedDict"):
        AllowListUnpickler(io.BytesIO(pickle.dumps(OrderedDict())), builtin=False).load()


# ------------------------------------------------------------------------- converted format / CLI

def test_save_with_config_round_trip(tmp_path):
    sd = _sd()
    sd["tied"] = sd["w"]  # shared storage
    sd["t"] = sd["w"].t()  # non-contiguous
    p = tmp_path / "out" / "m.safetensors"
    save_with_config(p, sd, {"method": "viewneti", "class": "Mapper", "constructor": {"dim": 4}})
    assert sorted(x.name for x in p.parent.iterdir()) == ["m.json", "m.safetensors"]  # no temp files left
    got, cfg = load_with_config(p)
    _same(got, {k: v.contiguous() for k, v in sd.items()})
    assert cfg["format"] == "comfyui-nvs" and cfg["method"] == "viewneti" and cfg["constructor"] == {"dim": 4}
    (tmp_path / "out" / "m.json").unlink()  # the metadata copy makes the single file enough
    assert load_with_config(p)[1]["constructor"] == {"dim": 4}


def test_load_with_config_bare_kwargs_and_errors(tmp_path):
    p = tmp_path / "single.safetensors"
    save_file({"a": torch.zeros(1)}, str(p),
              metadata={"nvs_config": json.dumps({"dim": 8}), "nvs_method": "genvs"})
    sd, cfg = load_with_config(p)
    assert cfg["constructor"] == {"dim": 8} and cfg["method"] == "genvs"
    q = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(q))
    with pytest.raises(CheckpointError, match="no config: expected sidecar plain.json"):
        load_with_config(q)
    (tmp_path / "plain.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="expected config format 'comfyui-nvs'"):
        load_with_config(q)


def test_convert_cli_end_to_end(tmp_path):
    src = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": _sd(), "global_step": np.int64(10)}, src)
    out = tmp_path / "conv" / "model.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "nvs_core", "convert", str(src), "--method", "state_dict",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch_zip" in r.stdout and "4 tensors" in r.stdout
    sd, cfg = load_with_config(out)
    _same(sd, _sd())
    assert cfg["method"] == "state_dict" and cfg["meta"]["source_format"] == "torch_zip"

    bad = tmp_path / "noise.bin"
    bad.write_bytes(b"\x01\x02garbage" * 10)
    r = subprocess.run([sys.executable, "-m", "nvs_core", "convert", str(bad),
                        "--out", str(tmp_path / "x.safetensors")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown format" in r.stderr and str(bad) in r.stderr


def test_convert_registry(tmp_path):
    @convert.register_converter("toy")
    def toy(path):
        return {"x": torch.ones(1)}, {"class": "Toy", "constructor": {"n": 1}}

    try:
        out = tmp_path / "toy.safetensors"
        convert.convert("unused", "toy", out)
        assert load_with_config(out)[1]["class"] == "Toy"
        with pytest.raises(CheckpointError, match="unknown conversion method 'nope'"):
            convert.convert("unused", "nope", out)
    finally:
        convert._CONVERTERS.pop("toy", None)


def test_no_unsafe_calls_in_product_code():
    for name in ("checkpoints.py", "convert.py"):
        text = (ROOT / "nvs_core" / name).read_text()
        assert not re.search(r"\bpickle\.loads?\(|\bexec\(|\beval\(", text), name
        for line in text.splitlines():
            assert "torch.load(" not in line or "weights_only=True" in line, line


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    from nvs_core.checkpoints import atomic_path

    target = tmp_path / "sub" / "out.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp != target
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]
