"""Full-size key/shape manifests of the published checkpoints against mappers built from the published cfg."""
import json

import pytest
import torch

from nvs_core.viewneti.config import viewneti_mapper_kwargs
from nvs_core.viewneti.mapper import NetiMapper, ViewNetiMapper
from tests.paths import GOLDEN_DIR

MANIFESTS = GOLDEN_DIR / "viewneti" / "manifests"
CFG_FILE = GOLDEN_DIR / "viewneti" / "checkpoint_cfg.json"
pytestmark = pytest.mark.skipif(not MANIFESTS.is_dir() or not CFG_FILE.is_file(),
                                reason=f"ViewNeTI manifests not found under {MANIFESTS}")


def _layout(module):
    return [[key, list(t.shape), str(t.dtype).replace("torch.", "")] for key, t in module.state_dict().items()]


def _manifest(name):
    return json.loads((MANIFESTS / name).read_text())


@pytest.mark.parametrize("kind", ["view", "object"])
def test_viewneti_mapper_matches_manifest(kind):
    manifest = _manifest(f"viewneti_mapper_{kind}_arch15.json")
    mapper = ViewNetiMapper(**viewneti_mapper_kwargs(json.loads(CFG_FILE.read_text()), kind))
    assert _layout(mapper) == manifest["state_dict"]
    assert sum(t.numel() for t in mapper.state_dict().values()) == manifest["state_dict_param_count"]
    encoder = manifest["encoder"]
    assert list(mapper.encoder.w.shape) == encoder["w"][0]
    assert mapper.encoder.sigmas == encoder["sigmas"] and mapper.encoder.dim == encoder["dim"]


def test_neti_mapper_matches_manifest():
    manifest = _manifest("neti_mapper.json")
    mapper = NetiMapper(encoder_w=torch.zeros(1024, 2))
    assert _layout(mapper) == manifest["state_dict"]
    assert list(mapper.encoder.w.shape) == manifest["encoder"]["w"]
    state = mapper.state_dict()
    for first, second in manifest["shared_storage"]:  # one module registered twice
        assert state[first].untyped_storage().data_ptr() == state[second].untyped_storage().data_ptr()


def test_learned_embeds_manifest_lists_view_tokens_then_objects():
    manifest = _manifest("viewneti_learned_embeds.json")
    keys = manifest["example_keys"]
    first_object = next(i for i, k in enumerate(keys) if not k.startswith("<view_"))
    assert all(k.startswith("<view_") for k in keys[:first_object])
    assert not any(k.startswith("<view_") for k in keys[first_object:])
