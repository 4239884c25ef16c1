"""RealFusion nodes without ComfyUI: reconstruct (stand-in SD objects through the node's guidance seam), render,
save/load, bad inputs, interrupt."""
import sys
from importlib import import_module

import pytest
import torch

from tests.conftest import load_pack

pack = load_pack()
rf_nodes = import_module(f"{pack.__name__}.nodes.nodes_realfusion")
rf = import_module(f"{pack.__name__}.nvs_core.realfusion")
cameras_mod = import_module(f"{pack.__name__}.nvs_core.cameras")
progress_mod = import_module(f"{pack.__name__}.nvs_core.progress")

TINY = dict(grid_levels=4, grid_resolution=64, log2_hashmap_size=10, hidden_dim=16, hidden_dim_bg=16, grid_size=32,
            grid_levels_mask=0)


def tiny_field(seed=0):
    """A tiny random field with a filled occupancy grid (the blob makes the centre dense)."""
    torch.manual_seed(seed)
    field = rf.RealFusionField(rf.FieldConfig(**TINY))
    field.update_occupancy(jitter=False)
    return field.train(False).requires_grad_(False)


def save_tiny(path):
    rf.save_field(path, tiny_field())
    return path


def _node(node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


def test_render_outputs():
    cams = cameras_mod.orbit(2, 0.3, 0.0, 3.14, 1.8, 0.9, 24, 24)
    image, depth, normals, mask = _node("NVSFieldRender").render(tiny_field(), cams, "lambertian")
    assert image.shape == (2, 24, 24, 3) and depth.shape == (2, 24, 24, 3) and normals.shape == (2, 24, 24, 3)
    assert mask.shape == (2, 24, 24) and float(mask.max()) > 0.5 and float(mask.min()) < 0.5
    assert 0 <= float(image.min()) and float(image.max()) <= 1
