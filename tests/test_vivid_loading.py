"""VIVID checkpoint loading: refusals, conversion round trip, clear errors."""
import pickle
import sys
import types

import pytest
import torch

from tests.paths import GOLDEN_DIR
from nvs_core.checkpoints import CheckpointError
from nvs_core.vivid.loading import (VIVID_PRESETS, build_vivid_network, load_vivid, load_vivid_checkpoint,
                                    load_vivid_pickle, save_vivid_converted, vivid_network_from_weights)

SNAPSHOT = GOLDEN_DIR / "vivid" / "case_f_vivid_tiny_snapshot.pkl"
needs_snapshot = pytest.mark.skipif(not SNAPSHOT.is_file(), reason=f"no VIVID snapshot fixture at {SNAPSHOT}")

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8,
            img_resolution=8, img_channels=3, label_dim=20, use_fp16=False)


def _pickle_calling(module: str, name: str) -> bytes:
    """A protocol-0 pickle that calls module.name('x') when loaded by a plain unpickler."""
    return f"c{module}\n{name}\n(S'x'\ntR.".encode()


@pytest.mark.parametrize("module,name", [("os", "system"), ("dnnlib.util", "call_func_by_name"),
                                         ("torch_utils.persistence", "_src_to_module"), ("builtins", "exec")])
def test_refuses_globals_outside_the_allow_list(tmp_path, module, name):
    path = tmp_path / "evil.pkl"
    path.write_bytes(_pickle_calling(module, name))
    with pytest.raises(CheckpointError) as info:
        load_vivid_pickle(path)
    assert f"{module}.{name}" in str(info.value) and "evil.pkl" in str(info.value)


def test_persistent_source_is_never_executed(tmp_path, monkeypatch):
    """A persistent object whose embedded source would raise loads as inert data."""

    def _reconstruct_persistent_obj(meta):  # what the pickle will name; never called when loading
        raise AssertionError("the original reconstructor must not run")

    class Persistent:
        def __init__(self, meta):
            self.meta = meta

        def __reduce__(self):
            return (_reconstruct_persistent_obj, (self.meta,))

    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = fake.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    meta = dict(type="class", version=6, module_src="raise RuntimeError('executed')", class_name="NVPrecond",
                state=dict(_parameters={}, _buffers={}, _modules={}, _init_args=(), _init_kwargs=dict(TINY)))
    with monkeypatch.context() as patch:  # only while pickling
        patch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
        patch.setitem(sys.modules, fake.__name__, fake)
        raw = pickle.dumps({"ema": Persistent(meta)}, protocol=4)
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(raw)
    ckpt = load_vivid_pickle(path)
    assert ckpt.init_kwargs == TINY and ckpt.state_dict == {}
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules


@needs_snapshot
def test_conversion_round_trip_keeps_float16(tmp_path):
    ckpt = load_vivid_pickle(SNAPSHOT)
    out = tmp_path / "vivid-tiny.safetensors"
    save_vivid_converted(out, ckpt)
    again = load_vivid_checkpoint(out)
    assert again.init_kwargs == ckpt.init_kwargs
    assert list(again.state_dict) == list(ckpt.state_dict) or set(again.state_dict) == set(ckpt.state_dict)
    for key, tensor in ckpt.state_dict.items():
        assert again.state_dict[key].dtype == torch.float16 and torch.equal(again.state_dict[key], tensor)
    assert load_vivid(out).unet.out_gain.dtype == torch.float32


@needs_snapshot
def test_converter_is_registered():
    from nvs_core.convert import converters

    state_dict, config = converters()["vivid"](str(SNAPSHOT))
    assert config["method"] == "vivid" and config["constructor"]["model_channels"] == 16
    assert len(state_dict) == 219


def test_shape_mismatch_names_file_and_key():
    net = build_vivid_network(TINY)
    state_dict = dict(net.state_dict())
    state_dict["unet.out_conv.weight"] = torch.zeros(3, 9, 3, 3)
    with pytest.raises(CheckpointError, match=r"my\.pkl.*unet\.out_conv\.weight"):
        vivid_network_from_weights(TINY, state_dict, source="my.pkl")
    del state_dict["unet.out_conv.weight"]
    with pytest.raises(CheckpointError, match="missing key 'unet.out_conv.weight'"):
        vivid_network_from_weights(TINY, state_dict, source="my.pkl")


def test_presets_build_on_meta():
    for name, kwargs in VIVID_PRESETS.items():
        net = build_vivid_network(kwargs, device="meta")
        assert (net.encoder is None) == bool(kwargs["uncond"]), name
