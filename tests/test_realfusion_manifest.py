"""The full-size RealFusion field built from the published defaults matches the df.pth manifest exactly
(keys in order, shapes, dtypes, parameter/buffer kind, parameter counts, grid level table)."""
import json

import pytest
import torch

from tests.paths import GOLDEN_DIR
from nvs_core.realfusion.field import FieldConfig
from nvs_core.realfusion.loading import build_field, infer_config

MANIFEST = GOLDEN_DIR / "realfusion" / "manifests" / "realfusion_df.json"
pytestmark = pytest.mark.skipif(not MANIFEST.is_file(), reason=f"no RealFusion manifest at {MANIFEST}")


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def field():
    return build_field(FieldConfig(), device="meta")


def test_keys_shapes_dtypes_kinds(manifest, field):
    params = dict(field.named_parameters())
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", ""), "parameter" if k in params else "buffer")
           for k, v in field.state_dict().items()]
    expected = [(e["key"], e["shape"], e["dtype"], e["kind"]) for e in manifest["keys"]]
    assert got == expected
    assert len(got) == manifest["num_tensors"] == 17


def test_parameter_counts(manifest, field):
    params = dict(field.named_parameters())
    assert sum(p.numel() for p in params.values()) == manifest["num_parameters"] == 1_806_983
    for top, count in manifest["num_parameters_by_top_module"].items():
        assert sum(p.numel() for k, p in params.items() if k.startswith(top + ".")) == count, top
    buffers = sum(b.numel() for b in field.buffers())
    assert buffers == manifest["num_buffer_elements"]


def test_level_table(manifest, field):
    enc = manifest["encoder"]
    assert field.encoder.levels[-1].resolution == 1537
    assert [lv.resolution for lv in field.encoder.levels] == [lv["kernel_resolution"] for lv in enc["levels"]]
    assert [lv.resolution_python for lv in field.encoder.levels] == [lv["resolution_python"] for lv in enc["levels"]]
    assert [lv.rows for lv in field.encoder.levels] == [lv["rows"] for lv in enc["levels"]]
    assert [lv.offset for lv in field.encoder.levels] == [lv["offset"] for lv in enc["levels"]]
    assert [len(lv.strides) for lv in field.encoder.levels] == [lv["dims_in_index"] for lv in enc["levels"]]
    assert [lv.scale for lv in field.encoder.levels] == [lv["kernel_scale_float32"] for lv in enc["levels"]]


def test_options_are_the_defaults(manifest):
    opts, cfg = manifest["options"], FieldConfig()
    for key in ("bound", "grid_levels", "grid_resolution", "grid_levels_mask", "blob_density", "blob_radius",
                "bg_radius", "density_thresh"):
        assert getattr(cfg, key) == opts[key], key


def test_config_inferred_from_a_published_state_dict(field):
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in field.state_dict().items()}
    b = 0.75
    state["aabb_train"] = torch.tensor([-b, -b, -b, b, b, b])
    state["encoder.offsets"] = torch.tensor([lv.offset for lv in field.encoder.levels] + [898848], dtype=torch.int32)
    cfg = infer_config(state)
    assert cfg.grid_resolution == 2048 and cfg.grid_levels == 16 and cfg.grid_levels_mask == 0
    assert cfg.hidden_dim == 64 and cfg.num_layers == 3 and cfg.bg_radius > 0 and cfg.freq_degree == 6
