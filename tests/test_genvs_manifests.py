"""The full-size GeNVS built from its config has exactly the keys, shapes and parameter/buffer kinds of
the published ``genvs.pt`` model dict (``manifests/genvs.json``, after collapsing the duplicated
denoiser names), and the config inferred from those shapes is the published one."""
import json

import pytest
import torch

from tests.paths import GOLDEN_DIR
from nvs_core.genvs.config import full_config
from nvs_core.genvs.loading import infer_config
from nvs_core.genvs.model import build_genvs

MANIFEST = GOLDEN_DIR / "genvs" / "manifests" / "genvs.json"
pytestmark = pytest.mark.skipif(not MANIFEST.is_file(), reason=f"no GeNVS manifest at {MANIFEST}")


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def model():
    return build_genvs(full_config(), device="meta")


def test_keys_shapes_kinds_in_order(manifest, model):
    params = dict(model.named_parameters())
    got = [(k, list(v.shape), "parameter" if k in params else "buffer", str(v.dtype).replace("torch.", ""))
           for k, v in model.state_dict().items()]
    canonical = [e for e in manifest["keys"] if not e.get("duplicate_of")]
    expected = [(e["key"], e["shape"], e["kind"], e["dtype"]) for e in canonical]
    for g, e in zip(got, expected):
        assert g == e, f"first mismatch {g} != {e}"
    assert len(got) == len(expected) == manifest["num_distinct_tensors"]
    # every duplicate name maps onto one canonical key of the same shape
    shapes = {k: s for k, s, _, _ in got}
    dups = [e for e in manifest["keys"] if e.get("duplicate_of")]
    assert len(dups) == manifest["num_duplicate_names"]
    for e in dups:
        assert e["key"].replace("ddpm_pipeline.model.", "ddpm_pipeline.", 1) == e["duplicate_of"]
        assert shapes[e["duplicate_of"]] == e["shape"]


def test_parameter_counts(manifest, model):
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == manifest["num_parameters"]
    by_module = manifest["num_parameters_by_module"]
    for prefix, key in (("input_unet.encoder.", "input_unet.encoder"), ("input_unet.decoder.", "input_unet.decoder"),
                        ("nerf.", "nerf"), ("ddpm_pipeline.", "ddpm_pipeline (denoiser, counted once)")):
        assert sum(p.numel() for k, p in params.items() if k.startswith(prefix)) == by_module[key], key
    for group in manifest["optimizer_param_groups"]:
        module = getattr(model, group["module"])
        assert len(list(module.parameters())) == group["num_param_tensors"]
        assert sum(p.numel() for p in module.parameters()) == group["num_params"]


def test_config_inferred_from_the_manifest_shapes(manifest):
    sd = {e["key"]: torch.empty(e["shape"], device="meta") for e in manifest["keys"] if not e.get("duplicate_of")}
    cfg = infer_config(sd)
    assert cfg.to_dict() == full_config().to_dict()
    assert cfg.resolution_z == manifest["constructor_kwargs"]["nerf"]["resolution_z"]
    published = manifest["constructor_kwargs"]["ddpm_pipeline"]
    for key in ("depths", "channels", "self_attn_depths", "mapping_out", "dropout_rate", "sigma_min", "sigma_max"):
        assert getattr(cfg.denoiser, key) == published[key], key
