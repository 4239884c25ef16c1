"""The full-size NVS-Adapter built from ``SD21_BASE`` matches the published checkpoint's adapter manifest exactly
(keys in order, shapes, 344 tensors, 217,126,080 parameters, EMA names), and its layers follow the SD backend's
layer convention (0..15 = IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03..OUT11)."""
import json

import pytest
import torch

from tests.paths import GOLDEN_DIR
from nvs_core.nvsadapter.config import SD21_BASE, NVSAdapterConfig
from nvs_core.nvsadapter.loading import PREFIX, ema_key, infer_config
from nvs_core.nvsadapter.model import NVSAdapter
from nvs_core.sd.interface import LDM_BLOCKS, NUM_LAYERS

MANIFEST = GOLDEN_DIR / "nvsadapter" / "manifests" / "adapter_keys_sd21_base.json"
needs_manifest = pytest.mark.skipif(not MANIFEST.is_file(), reason=f"no NVS-Adapter manifest at {MANIFEST}")


def _full_size() -> NVSAdapter:
    with torch.device("meta"):
        return NVSAdapter(SD21_BASE)


@needs_manifest
def test_full_size_adapter_matches_manifest():
    manifest = json.loads(MANIFEST.read_text())
    state = _full_size().state_dict()
    got = [(k, list(v.shape)) for k, v in state.items()]
    expected = [(e["adapter_key"], e["shape"]) for e in manifest["tensors"]]
    assert got == expected
    assert len(state) == manifest["num_tensors"] == 344
    assert sum(v.numel() for v in state.values()) == manifest["num_params"] == 217_126_080
    for entry in manifest["tensors"]:
        assert entry["key"] == PREFIX + entry["adapter_key"]
        assert ema_key(entry["key"]) == entry["ema_key"]
    assert len({ema_key(e["key"]) for e in manifest["tensors"]}) == 344  # the dot-less names do not collide


@needs_manifest
def test_config_is_inferred_from_manifest_shapes():
    manifest = json.loads(MANIFEST.read_text())
    shapes = {e["adapter_key"]: torch.empty(e["shape"], device="meta") for e in manifest["tensors"]}
    assert infer_config(shapes) == SD21_BASE


def test_layers_follow_the_backend_layer_convention():
    layers = SD21_BASE.layers()
    assert len(layers) == NUM_LAYERS
    for layer, (kind, block) in zip(layers, LDM_BLOCKS):
        assert layer.name == {"input": f"input_blocks.{block}.1", "middle": "middle_block.1",
                              "output": f"output_blocks.{block}.1"}[kind]
    assert [l.level for l in layers] == [0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert [l.tokens for l in layers][:7] == [1024, 1024, 256, 256, 64, 64, 16]
    assert [l.channels for l in layers] == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640,
                                            320, 320, 320]
    assert all(l.heads == l.channels // 64 for l in layers)


def test_config_round_trips_through_json():
    data = json.loads(json.dumps(SD21_BASE.to_dict()))
    assert NVSAdapterConfig.from_dict(data) == SD21_BASE
    with pytest.raises(ValueError, match="unknown NVS-Adapter config entries"):
        NVSAdapterConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="posemb_dim"):
        NVSAdapterConfig(posemb_dim=100)
