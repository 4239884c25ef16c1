"""VIVID networks built from the published constructor kwargs match the state-dict manifests exactly
(keys in order, shapes, parameter/buffer kind), so the released checkpoints load with strict=True."""
import json

import pytest
import torch

from tests.paths import GOLDEN_DIR
from nvs_core.vivid.loading import VIVID_PRESETS, build_vivid_network
from nvs_core.vivid.networks import XAttnBlock

MANIFEST_DIR = GOLDEN_DIR / "vivid" / "manifests"
MANIFESTS = sorted(MANIFEST_DIR.glob("vivid-*.json")) if MANIFEST_DIR.is_dir() else []


@pytest.mark.skipif(not MANIFESTS, reason=f"no VIVID manifests under {MANIFEST_DIR}")
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_network_matches_manifest(path):
    manifest = json.loads(path.read_text())
    net = build_vivid_network(manifest["constructor_kwargs"], device="meta", dtype=torch.float16)
    params = dict(net.named_parameters())
    got = [(k, list(v.shape), "parameter" if k in params else "buffer", str(v.dtype).replace("torch.", ""))
           for k, v in net.state_dict().items()]
    expected = [(e["key"], e["shape"], e["kind"], e["dtype"]) for e in manifest["keys"]]
    for g, e in zip(got, expected):
        assert g == e, f"{path.name}: first mismatch {g} != {e}"
    assert len(got) == len(expected) == manifest["num_tensors"]

    assert sum(p.numel() for p in params.values()) == manifest["num_parameters"]
    for top, count in manifest["num_parameters_by_top_module"].items():
        assert sum(p.numel() for k, p in params.items() if k.startswith(top + ".")) == count, top

    attention = {}
    for name, module in net.named_modules():
        if getattr(module, "num_heads", 0):
            attention[name] = {"cls": type(module).__name__, "channels": module.out_channels,
                               "heads": module.num_heads}
    assert attention == manifest["attention_blocks"]
    # The denoiser's cross-attention blocks pair 1:1 with the encoder's attention outputs.
    if net.encoder is not None:
        encoder_attention = [n for n in attention if n.startswith("encoder.")]
        assert len(encoder_attention) == len(net.unet.cross_attention_blocks())
    assert all(isinstance(b, XAttnBlock) for b in net.unet.cross_attention_blocks())


@pytest.mark.skipif(not MANIFESTS, reason=f"no VIVID manifests under {MANIFEST_DIR}")
@pytest.mark.parametrize("name", sorted(VIVID_PRESETS))
def test_presets_are_the_manifest_kwargs(name):
    manifest = json.loads((MANIFEST_DIR / f"{name}.json").read_text())
    assert VIVID_PRESETS[name] == manifest["constructor_kwargs"]
