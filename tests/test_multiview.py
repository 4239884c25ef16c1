import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from nvs_core.cameras import Cameras, orbit
from nvs_core.multiview import MultiView, load_folder, save_folder
from nvs_core.procedural import render_multiview


@pytest.fixture(scope="module")
def views() -> MultiView:
    cams = orbit(4, 0.3, 0.0, 2 * math.pi, 2.5, math.radians(45), 32, 24)
    return render_multiview(3, cams)


def _cameras(n=3, w=32, h=24) -> Cameras:
    cams = orbit(n, 0.4, 0.2, 1.5, 2.7, math.radians(50), w, h)
    cams.intrinsics[:, 2:] += torch.tensor([0.03, -0.02], dtype=torch.float64)  # off-centre principal point
    return cams


def _write_images(folder, names, w=32, h=24, alpha=False):
    gen = np.random.default_rng(0)
    arrays = []
    for name in names:
        arr = gen.integers(0, 256, (h, w, 4 if alpha else 3), dtype=np.uint8)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / name)
        arrays.append(arr)
    return arrays


def _assert_same_cameras(a: Cameras, b: Cameras, atol=1e-6):
    assert (a.width, a.height) == (b.width, b.height) and len(a) == len(b)
    assert torch.allclose(a.c2w, b.c2w, atol=atol) and torch.allclose(a.intrinsics, b.intrinsics, atol=atol)


# --------------------------------------------------------------------- the type
def test_validation_names_the_field(views):
    with pytest.raises(ValueError, match=r"images must be a float tensor \[N,H,W,3\]"):
        MultiView(views.images[..., :2], views.cameras)
    with pytest.raises(ValueError, match="cameras has 3 cameras but images has 4"):
        MultiView(views.images, views.cameras[[0, 1, 2]])
    with pytest.raises(ValueError, match=r"masks must be \[N,H,W\] = \[4, 24, 32\]"):
        MultiView(views.images, views.cameras, masks=views.masks[:, :10])
    with pytest.raises(ValueError, match="depth"):
        MultiView(views.images, views.cameras, depth=views.depth[:2])
    with pytest.raises(ValueError, match="names"):
        MultiView(views.images, views.cameras, names=["a"])
    # Cameras of another nominal size are re-targeted (a resize) and [N,H,W,1] masks are accepted.
    mv = MultiView(views.images, views.cameras.with_size(64, 48), masks=views.masks[..., None])
    assert (mv.cameras.width, mv.cameras.height) == (32, 24) and mv.masks.shape == (4, 24, 32)


def test_indexing_cat_and_summary(views):
    assert len(views) == 4 and views.width == 32 and views.height == 24
    one = views[-1]
    assert len(one) == 1 and one.names == ["view_003"] and torch.equal(one.images[0], views.images[3])
    assert torch.equal(one.cameras.c2w, views.cameras.c2w[3:])
    part = views[1:3]
    assert part.names == ["view_001", "view_002"] and torch.equal(part.depth, views.depth[1:3])
    picked = views[[3, 0]]
    assert picked.names == ["view_003", "view_000"] and torch.equal(picked.masks[1], views.masks[0])
    assert views[torch.tensor([True, False, False, True])].names == ["view_000", "view_003"]
    for bad in (4, [0, 4]):
        with pytest.raises(IndexError):
            views[bad]
    bare = MultiView(views.images[:2], views.cameras[[0, 1]])
    both = MultiView.cat([views, bare])
    assert len(both) == 6 and torch.all(both.masks[4:] == 1) and torch.all(both.depth[4:] == 0)
    assert both.names[:4] == views.names and len(set(both.names)) == 6
    assert MultiView.cat([bare, bare]).masks is None
    with pytest.raises(ValueError, match="resize them"):
        MultiView.cat([views, render_multiview(3, views.cameras, height=12, width=16)])
    summary = json.loads(json.dumps(views.to_dict()))
    assert summary["count"] == 4 and summary["has_masks"] and len(summary["cameras"]["cameras"]) == 4


# --------------------------------------------------------------------- save / load
def test_save_load_round_trip(views, tmp_path):
    path = save_folder(views, tmp_path / "out")
    assert path.name == "cameras.json" and len(list((tmp_path / "out").glob("*.png"))) == 4
    back = load_folder(tmp_path / "out")
    _assert_same_cameras(back.cameras, views.cameras, atol=1e-12)
    assert back.names == views.names
    assert (back.images - views.images).abs().max() <= 0.5 / 255 + 1e-6
    assert (back.masks - views.masks).abs().max() == 0  # binary masks survive 8 bits exactly
    assert back.depth is None  # depth is not written
    # On black, the masked-out pixels change; the objects do not.
    dark = load_folder(tmp_path / "out", background="black")
    assert torch.all(dark.images[dark.masks == 0] == 0)
    assert torch.equal(dark.images[dark.masks == 1], back.images[back.masks == 1])


def test_our_json_variants(tmp_path):
    cams = _cameras()
    arrays = _write_images(tmp_path, ["img2.png", "img10.png", "img1.png"])  # natural order: 1, 2, 10
    K = cams.K()
    entries = [{"c2w": cams.to_c2w("opengl")[0].tolist(), "K": K[0].tolist()},
               {"w2c": cams.to_w2c("opengl")[1].tolist(), "K": K[1].tolist()},
               {"w2c": cams.to_w2c("opengl")[2][:3].tolist(), "K": K[2].tolist()}]
    (tmp_path / "cams.json").write_text(json.dumps({"width": 32, "height": 24, "convention": "opengl",
                                                    "cameras": entries}))
    mv = load_folder(tmp_path, "cams.json")
    _assert_same_cameras(mv.cameras, cams)
    assert mv.names == ["img1", "img2", "img10"] and mv.masks is None
    assert torch.allclose(mv.images[2], torch.from_numpy(arrays[1]).float() / 255)
    # Projection matrices, Z-up world with the "blender" convention, cameras for a 2x larger image.
    z_up = [{"file": "img1.png", "P": P.tolist()} for P in cams.to_projection(64, 48, world="z_up")[:1]]
    (tmp_path / "p.json").write_text(json.dumps({"width": 64, "height": 48, "convention": "blender",
                                                 "cameras": z_up}))
    _assert_same_cameras(load_folder(tmp_path, tmp_path / "p.json").cameras, cams[0])


def _transforms(cams: Cameras, files, **intrinsics) -> dict:
    c2w = cams.to_c2w("blender")
    return dict(intrinsics, frames=[{"file_path": f, "transform_matrix": m.tolist()} for f, m in zip(files, c2w)])


def test_nerf_synthetic_transforms(tmp_path):
    cams = orbit(3, 0.4, 0.2, 1.5, 4.0, math.radians(40), 32, 32)
    _write_images(tmp_path, ["train/r_0.png", "train/r_1.png", "train/r_2.png"], 32, 32, alpha=True)
    fov_x = 2 * math.atan(0.5 / cams.intrinsics[0, 0].item())
    data = _transforms(cams, ["./train/r_0", "./train/r_1", "train/r_2.png"], camera_angle_x=fov_x)
    (tmp_path / "transforms.json").write_text(json.dumps(data))
    mv = load_folder(tmp_path)
    _assert_same_cameras(mv.cameras, cams)
    assert mv.names == ["r_0", "r_1", "r_2"] and mv.masks.shape == (3, 32, 32)
    # Soft alpha is kept as the mask and the colour is composited on the background.
    rgba = torch.from_numpy(np.array(Image.open(tmp_path / "train/r_1.png"))).float() / 255
    assert torch.allclose(mv.masks[1], rgba[..., 3])
    assert torch.allclose(mv.images[1], rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]), atol=1e-6)


def test_instant_ngp_transforms_with_downscaled_images(tmp_path):
    cams = _cameras(2, 32, 24)
    K = cams.K(64, 48)[0]  # the file describes the full-size 64x48 capture; the images are half size
    _write_images(tmp_path, ["a.jpg", "b.jpg"])
    data = _transforms(cams, ["a", "b"], fl_x=K[0, 0].item(), fl_y=K[1, 1].item(), cx=K[0, 2].item(),
                       cy=K[1, 2].item(), w=64, h=48)
    data["frames"][1]["cx"] = cams.K(64, 48)[1, 0, 2].item()  # per-frame override
    (tmp_path / "transforms.json").write_text(json.dumps(data))
    mv = load_folder(tmp_path)
    _assert_same_cameras(mv.cameras, cams)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="cameras.json or transforms.json|expected one of"):
        load_folder(tmp_path)
    cams = _cameras(2)
    _write_images(tmp_path, ["a.png", "b.png"])
    bad = tmp_path / "cameras.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cameras.json: not valid JSON"):
        load_folder(tmp_path)
    bad.write_text(json.dumps({"views": []}))
    with pytest.raises(ValueError, match="'cameras' list"):
        load_folder(tmp_path)
    good = cams.to_dict()
    bad.write_text(json.dumps(dict(good, cameras=[dict(c, c2w=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])
                                                  for c in good["cameras"]])))
    with pytest.raises(ValueError, match=r"cameras.json: camera 0: 'c2w' must be 4x4 or 3x4"):
        load_folder(tmp_path)
    bad.write_text(json.dumps(dict(good, cameras=good["cameras"][:1])))
    with pytest.raises(ValueError, match="lists 1 cameras without 'file' entries but .* holds 2 images"):
        load_folder(tmp_path)
    bad.write_text(json.dumps(dict(good, cameras=[dict(c, file="missing.png") for c in good["cameras"]])))
    with pytest.raises(FileNotFoundError, match="camera 0 refers to .*missing.png"):
        load_folder(tmp_path)
    bad.write_text(json.dumps(dict(good, convention="colmap")))
    with pytest.raises(ValueError, match="convention"):
        load_folder(tmp_path)
    _write_images(tmp_path, ["b.png"], 16, 16)
    bad.write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"b.png is 16x16 but .*a.png is 32x24"):
        load_folder(tmp_path)
    transforms = tmp_path / "t.json"
    transforms.write_text(json.dumps(_transforms(cams, ["a", "c"], camera_angle_x=0.8)))
    with pytest.raises(FileNotFoundError, match="frame 1 refers to .*c "):
        load_folder(tmp_path, transforms)
    transforms.write_text(json.dumps(_transforms(cams[[0]], ["a"])))
    with pytest.raises(ValueError, match="frame 0 has no intrinsics"):
        load_folder(tmp_path, transforms)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    transforms.write_text(json.dumps(_transforms(cams[[0]], ["broken"], camera_angle_x=0.8)))
    with pytest.raises(ValueError, match="broken.png: cannot read image"):
        load_folder(tmp_path, transforms)
