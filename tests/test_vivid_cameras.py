"""VIVID's camera label from NVS cameras, and RealEstate10K pose files."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from nvs_core.cameras import orbit
from nvs_core.realestate10k import read_pose_file, read_sequence
from nvs_core.vivid.geometry import (compose_geometry, crop_resize_intrinsics, geometry_from_cameras,
                                     parse_camera_line, relative_pose)


def _lines(cameras):
    lines = ["https://www.youtube.com/watch?v=example"]
    for i, (c2w, intr) in enumerate(zip(cameras.c2w, cameras.intrinsics)):
        w2c = torch.linalg.inv(c2w)[:3].flatten().tolist()
        lines.append(f"{1000 * i} " + " ".join(f"{v:.12f}" for v in intr.tolist()) + " 0 0 "
                     + " ".join(f"{v:.12f}" for v in w2c))
    return lines


def test_geometry_from_cameras_matches_the_published_line_pipeline():
    cams = orbit(4, 0.2, 0.0, 1.2, 2.0, math.radians(50), 640, 360)
    lines = _lines(cams)[1:]
    ours = geometry_from_cameras(cams[0], cams[1:], 64)
    for i, line in enumerate(lines[1:]):
        _, src_K, src_w2c = parse_camera_line(lines[0])
        _, tgt_K, tgt_w2c = parse_camera_line(line)
        ref = compose_geometry(relative_pose(src_w2c, tgt_w2c), crop_resize_intrinsics(src_K, 64, 360, 640),
                               crop_resize_intrinsics(tgt_K, 64, 360, 640), 64)
        assert torch.allclose(ours[i], ref, atol=2e-5)


def test_identity_target_and_translation_scale():
    cams = orbit(2, 0.0, 0.0, 1.0, 2.0, math.radians(50), 64, 64)
    same = geometry_from_cameras(cams[0], cams[[0]], 64)
    g1 = geometry_from_cameras(cams[0], cams[[1]], 64)
    g2 = geometry_from_cameras(cams[0], cams[[1]], 64, translation_scale=2.0)
    from nvs_core.vivid.geometry import decompose_geometry
    t1, _, _ = decompose_geometry(g1.double())
    t2, _, _ = decompose_geometry(g2.double())
    assert torch.allclose(t2[..., 3], 2 * t1[..., 3], atol=1e-4)
    assert torch.allclose(t2[..., :3], t1[..., :3], atol=1e-5)
    eye, _, _ = decompose_geometry(same.double())
    assert torch.allclose(eye[0], torch.eye(4, dtype=torch.float64)[:3], atol=1e-4)
    with pytest.raises(ValueError, match="one source camera"):
        geometry_from_cameras(cams, orbit(3, 0.0, 0.0, 1.0, 2.0, 0.8, 64, 64), 64)


def test_realestate10k_pose_file_and_frames(tmp_path):
    cams = orbit(3, 0.1, 0.0, 0.5, 2.0, math.radians(50), 640, 360)
    pose = tmp_path / "seq.txt"
    pose.write_text("\n".join(_lines(cams)) + "\n")
    stamps, read = read_pose_file(pose)
    assert stamps == ["0", "1000", "2000"]
    assert torch.allclose(read.c2w, cams.c2w, atol=1e-9) and torch.allclose(read.intrinsics, cams.intrinsics)
    (tmp_path / "seq").mkdir()
    for s in stamps:
        Image.fromarray(np.full((36, 64, 3), 100, np.uint8)).save(tmp_path / "seq" / f"{s}.png")
    views = read_sequence(pose, stride=2)
    assert len(views) == 2 and views.images.shape == (2, 36, 64, 3) and views.names == ["0", "2000"]
    pose.write_text("https://x\n0 1 2 3\n")
    with pytest.raises(ValueError, match="line 2: expected 19 numbers"):
        read_pose_file(pose)


def test_aliased_intrinsics_reproduce_the_published_pipeline():
    cams = orbit(2, 0.1, 0.0, 0.4, 2.0, math.radians(50), 640, 360)
    from nvs_core.vivid.geometry import dataset_geometry
    lines = _lines(cams)[1:]
    published = dataset_geometry(lines[0], lines[1], imsize=64, srsize=256, aliased=True)
    ours_64 = geometry_from_cameras(cams[0], cams[[1]], 64, aliased_sizes=(256, 64))
    ours_256 = geometry_from_cameras(cams[0], cams[[1]], 256, aliased_sizes=(256, 64))
    assert torch.allclose(ours_64[0], published["geometry"], atol=2e-5)
    assert torch.allclose(ours_256[0], published["sr_geometry"], atol=2e-5)
    correct = geometry_from_cameras(cams[0], cams[[1]], 64)
    assert not torch.allclose(correct, ours_64, atol=1e-3)
