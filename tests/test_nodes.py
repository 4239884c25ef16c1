"""Every node imports without ComfyUI, declares a complete, documented interface, and runs."""
import json
import math
import sys

import pytest
import torch

from tests.conftest import load_pack
from tests.paths import GOLDEN_DIR

pack = load_pack()
core = sys.modules[f"{pack.__name__}.nvs_core"]
from importlib import import_module  # noqa: E402

cameras_mod = import_module(f"{pack.__name__}.nvs_core.cameras")

CATEGORIES = {"NVS/camera", "NVS/ViewNeTI", "NVS/NVS-Adapter", "NVS/GeNVS", "NVS/VIVID", "NVS/RealFusion",
              "NVS/training", "NVS/metrics", "NVS/io"}
HOST_TYPES = {"MODEL", "CLIP", "VAE", "CLIP_VISION", "CLIP_VISION_OUTPUT", "CONDITIONING", "LATENT"}
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
B, H, W = 3, 32, 32


def _example(kind: str):
    if kind == "NVS_CAMERA":
        return cameras_mod.orbit(B, 0.3, 0.0, 2 * math.pi, 2.5, math.radians(40), W, H)
    if kind == "IMAGE":
        return torch.rand(B, H, W, 3, generator=torch.Generator().manual_seed(0))
    if kind == "MASK":
        return torch.ones(B, H, W)
    if kind == "LOAD3D_CAMERA":
        return {"position": {"x": 1.0, "y": 1.0, "z": 2.0}, "target": {"x": 0, "y": 0, "z": 0}, "zoom": 1,
                "cameraType": "perspective"}
    if kind == "NVS_MULTIVIEW":
        node = pack.NODE_CLASS_MAPPINGS["NVSProceduralScene"]()
        return node.render(seed=1, cameras=_example("NVS_CAMERA"), background="white")[2]
    if kind == "NVS_VIVID":  # tiny random base + guidance + SR nets, in memory
        from tests.test_nodes_vivid import tiny_vivid_models
        return tiny_vivid_models()
    if kind == "NVS_FIELD":  # a tiny random RealFusion field with its occupancy grid
        from tests.test_nodes_realfusion import tiny_field
        return tiny_field()
    if kind == "NVS_GENVS":  # a tiny random GeNVS network, in memory
        from tests.test_nodes_genvs import tiny_genvs_model
        return tiny_genvs_model()
    raise KeyError(kind)


# Inputs whose defaults cannot make a meaningful run.
OVERRIDES = {
    "NVSCameraFromJSON": lambda tmp: {"camera_json": json.dumps(_example("NVS_CAMERA").to_dict())},
    "NVSLoadMultiviewFolder": lambda tmp: {"folder": str(_saved_folder(tmp))},
    "NVSVIVIDLoader": lambda tmp: {"base_model": str(_tiny_vivid_file(tmp))},
    "NVSVIVIDSampler": lambda tmp: {"source_image": _example("IMAGE")[:1], "source_camera": _example("NVS_CAMERA")[0],
                                    "steps": 2},
    "NVSVIVIDTrain": lambda tmp: {"network": "tiny 16px", "steps": 2, "batch_size": 2},
    "NVSGeNVSTrain": lambda tmp: {"network": "tiny 16px", "steps": 2, "batch_size": 2},
    "NVSGeNVSLoader": lambda tmp: {"model": str(_tiny_genvs_file(tmp))},
    "NVSGeNVSSampler": lambda tmp: {"steps": 2},
    "NVSGeNVSOrbit": lambda tmp: {"steps": 2, "frames": 2},
    "NVSLoadDTUScan": lambda tmp: {"root": str(_tiny_dtu_root(tmp))},
    "NVSFieldLoader": lambda tmp: {"field_file": str(_tiny_field_file(tmp))},
    "NVSFieldExportMesh": lambda tmp: {"resolution": 24, "texture_size": 64},
    "NVSAdapterLoader": lambda tmp: {"adapter": str(_tiny_nvsadapter_file(tmp))},
    "NVSViewNeTILoader": lambda tmp: {"view_mapper": str(GOLDEN_DIR / "viewneti/checkpoints/mapper-steps-10_view.pt"),
                                      "dtu_calibration": str(GOLDEN_DIR / "viewneti/cal18_synthetic")},
}


def _tiny_vivid_file(tmp):
    from tests.test_nodes_vivid import BASE, save_tiny

    return save_tiny(tmp, "vivid-tiny.safetensors", BASE)


def _tiny_nvsadapter_file(tmp):
    from tests.test_nodes_nvsadapter import save_tiny

    return save_tiny(tmp)


def _tiny_genvs_file(tmp):
    from tests.test_nodes_genvs import save_tiny

    return save_tiny(tmp / "genvs-tiny.safetensors")


def _tiny_field_file(tmp):
    from tests.test_nodes_realfusion import save_tiny

    return save_tiny(tmp / "field-tiny.safetensors")


def _tiny_dtu_root(tmp):
    from tests.test_nodes_dtu import tiny_dtu_root

    return tiny_dtu_root(tmp)


def _saved_folder(tmp):
    multiview = import_module(f"{pack.__name__}.nvs_core.multiview")
    multiview.save_folder(_example("NVS_MULTIVIEW"), tmp / "scene")
    return tmp / "scene"


def _inputs(node_id, cls, tmp):
    spec = cls.INPUT_TYPES()
    values = {}
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            kind, opts = decl[0], (decl[1] if len(decl) > 1 else {})
            if isinstance(kind, list):
                values[name] = opts.get("default", kind[0] if kind else None)  # model lists may be empty
            elif kind in WIDGETS:
                values[name] = opts["default"]
            elif section == "required":
                values[name] = _example(kind)
    values.update(OVERRIDES.get(node_id, lambda tmp: {})(tmp))
    return values


def _needs_host(cls):
    spec = cls.INPUT_TYPES()
    return any(d[0] in HOST_TYPES for d in spec.get("required", {}).values() if isinstance(d[0], str))


NODES = sorted(pack.NODE_CLASS_MAPPINGS.items())


def test_pack_imports_without_comfyui():
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    assert pack.WEB_DIRECTORY == "./js"
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_node_interface(node_id, cls):
    assert node_id.startswith("NVS")
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("NVS ")
    assert cls.CATEGORY in CATEGORIES
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple)
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS", "OUTPUT_IS_LIST"):
        if hasattr(cls, attr):
            assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), attr
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            opts = decl[1] if len(decl) > 1 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if decl[0] in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name} default out of range"


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_node_runs(node_id, cls, tmp_path, monkeypatch):
    if _needs_host(cls):
        pytest.skip(f"{node_id} needs ComfyUI model objects: covered in tests/host")
    # Nodes that write files (training, saving) write below tmp_path.
    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("NVS_OUTPUT_DIR", str(tmp_path / "output"))
    result = getattr(cls(), cls.FUNCTION)(**_inputs(node_id, cls, tmp_path))
    if isinstance(result, dict):
        assert all(isinstance(v, list) for v in result.get("ui", {}).values())
        result = result["result"]
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
    is_list = getattr(cls, "OUTPUT_IS_LIST", (False,) * len(result))
    for kind, value, listed in zip(cls.RETURN_TYPES, result, is_list):
        items = value if listed else [value]
        assert isinstance(items, list)
        for item in items:
            if kind == "IMAGE":
                assert item.ndim == 4 and item.shape[-1] == 3 and 0 <= item.min() and item.max() <= 1
            elif kind == "MASK":
                assert item.ndim == 3
            elif kind == "NVS_CAMERA":
                assert item.c2w.shape[1:] == (4, 4)
            elif kind == "STRING":
                assert isinstance(item, str) and item
            elif kind == "FLOAT":
                assert isinstance(item, float)


# ----------------------------------------------------------------------------- behaviour of camera nodes
def _node(node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


def test_camera_node_convention():
    (c,) = _node("NVSCamera").build(elevation=0.0, azimuth=0.0, radius=2.0, fov=40.0, width=64, height=64)
    assert torch.allclose(c.centers[0], torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), atol=1e-6)
    (c,) = _node("NVSCamera").build(elevation=0.0, azimuth=90.0, radius=2.0, fov=40.0, width=64, height=64)
    assert torch.allclose(c.centers[0], torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(radius=0.0), "radius"), (dict(radius=-2.0), "radius"), (dict(fov=0.0), "fov"), (dict(fov=180.0), "fov")])
def test_camera_node_bad_inputs(kwargs, message):
    args = dict(elevation=0.0, azimuth=0.0, radius=2.0, fov=40.0, width=64, height=64) | kwargs
    with pytest.raises(ValueError, match=message):
        _node("NVSCamera").build(**args)


def test_orbit_node_closes_without_repeat():
    (c,) = _node("NVSOrbitCameras").build(count=4, elevation=0.0, azimuth_start=0.0, azimuth_sweep=360.0, radius=1.0,
                                         fov=40.0, width=32, height=32)
    expected = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, -1], [-1, 0, 0]], dtype=torch.float64)
    assert torch.allclose(c.centers, expected, atol=1e-6)


def test_camera_info_json_round_trip():
    cams = _example("NVS_CAMERA")
    out = _node("NVSCameraInfo").describe(cams)
    text = out["result"][0]
    data = json.loads(text)
    assert set(data) >= {"width", "height", "cameras"} and len(data["cameras"]) == B
    assert len(data["cameras"][0]["c2w"]) == 4 and len(data["cameras"][0]["K"]) == 3
    (back,) = _node("NVSCameraFromJSON").parse(camera_json=text, width=8, height=8)
    assert torch.allclose(back.c2w, cams.c2w, atol=1e-9) and (back.width, back.height) == (W, H)


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ('{"cameras": [1]}', "camera 0"),
                                           ("[]", "non-empty")])
def test_camera_from_json_errors(text, message):
    with pytest.raises(ValueError, match=message):
        _node("NVSCameraFromJSON").parse(camera_json=text, width=8, height=8)


def test_camera_batch_and_relative():
    cams = _example("NVS_CAMERA")
    (both,) = _node("NVSCameraBatch").batch(cams, "", cameras_2=cams)
    assert len(both) == 2 * B
    (picked,) = _node("NVSCameraBatch").batch(cams, "2, 0-1, -1")
    assert torch.equal(picked.c2w, cams.c2w[[2, 0, 1, 2]])
    with pytest.raises(ValueError, match="out of range"):
        _node("NVSCameraBatch").batch(cams, "7")
    with pytest.raises(ValueError, match="cannot read"):
        _node("NVSCameraBatch").batch(cams, "a-b")
    (rel,) = _node("NVSRelativeCameras").relative(cams, 1)
    assert torch.allclose(rel.c2w[1], torch.eye(4, dtype=torch.float64), atol=1e-9)
    (rel2,) = _node("NVSRelativeCameras").relative(cams, 0, reference=cams[1])
    assert torch.allclose(rel2.c2w, rel.c2w)
    with pytest.raises(ValueError, match="single camera"):
        _node("NVSRelativeCameras").relative(cams, 0, reference=cams)
    with pytest.raises(ValueError, match="reference_index"):
        _node("NVSRelativeCameras").relative(cams, 5)


def test_preview_draws_something():
    (img,) = _node("NVSCameraPreview").preview(_example("NVS_CAMERA"), 30.0, 30.0, 128, 0.2)
    assert img.shape == (1, 128, 128, 3)
    assert (img.std(dim=(1, 2)) > 0.01).all()


def test_metrics_node_values_and_errors():
    gt = _example("IMAGE")
    pred = (gt + 0.1).clamp(0, 1)
    out = _node("NVSMetrics").measure(pred, gt, lpips=False)
    psnr, ssim, lp, mean_psnr, mean_ssim, table = out["result"]
    assert len(psnr) == B and lp == [] and mean_psnr == pytest.approx(sum(psnr) / B)
    assert "PSNR" in table and out["ui"]["text"] == [table]
    with pytest.raises(ValueError, match="same batch size"):
        _node("NVSMetrics").measure(pred[:2], gt, lpips=False)
    with pytest.raises(ValueError, match="mask"):
        _node("NVSMetrics").measure(pred, gt, lpips=False, mask=torch.ones(B, 8, 8))
    with pytest.raises(ValueError, match="lpips"):
        _node("NVSMetrics").measure(pred, gt, lpips=True)


# ----------------------------------------------------------------------------- behaviour of data nodes
def test_procedural_scene_node_outputs_agree():
    cams = _example("NVS_CAMERA")
    images, masks, views = _node("NVSProceduralScene").render(seed=4, cameras=cams, background="white")
    assert images.shape == (B, H, W, 3) and masks.shape == (B, H, W)
    assert torch.equal(views.images, images) and len(views.cameras) == B and views.depth is not None
    again = _node("NVSProceduralScene").render(seed=4, cameras=cams, background="white")[0]
    assert torch.equal(again, images)
    with pytest.raises(ValueError, match="background"):
        _node("NVSProceduralScene").render(seed=4, cameras=cams, background="pink")


def test_multiview_from_images_checks_counts():
    cams = _example("NVS_CAMERA")
    with pytest.raises(ValueError, match="one camera per image"):
        _node("NVSMultiviewFromImages").build(_example("IMAGE")[:2], cams)
    (views,) = _node("NVSMultiviewFromImages").build(_example("IMAGE"), cams, masks=torch.ones(1, H, W))
    assert views.masks.shape == (B, H, W)
    images, masks, cameras = _node("NVSMultiviewSplit").split(views)
    assert torch.equal(images, views.images) and cameras is views.cameras


def test_load_multiview_folder_node(tmp_path):
    folder = _saved_folder(tmp_path)
    views, images, masks, cams = _node("NVSLoadMultiviewFolder").load(str(folder), "", "white")
    original = _example("NVS_MULTIVIEW")
    assert torch.allclose(cams.c2w, original.cameras.c2w, atol=1e-6)
    assert (images - original.images).abs().max() < 1.5 / 255
    with pytest.raises(ValueError, match="folder"):
        _node("NVSLoadMultiviewFolder").load("  ", "", "white")
    with pytest.raises(FileNotFoundError):
        _node("NVSLoadMultiviewFolder").load(str(tmp_path / "missing"), "", "white")
