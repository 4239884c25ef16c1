"""DTU projection matrices <-> NVS cameras, novel-view tokens and the spherical view numbers."""
import math

import pytest
import torch

from nvs_core.cameras import Cameras, look_at
from nvs_core.viewneti import camera_tokens as ct
from tests.paths import GOLDEN_DIR

CAL18 = GOLDEN_DIR / "viewneti" / "cal18_synthetic"
DTU_K = torch.tensor([[2892.33, 0.0, 823.21], [0.0, 2883.18, 619.07], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _dtu_like_projections(count=6, seed=0):
    """DTU-style P = s K [R | t]: cameras about 600 mm from a point, in DTU's y-down frame."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.tensor([40.0, -20.0, 600.0], dtype=torch.float64)
    angles = torch.rand(count, 2, generator=generator, dtype=torch.float64) - 0.5
    eye = target + 600 * torch.stack([angles[:, 0].sin(), angles[:, 1].sin(), -angles[:, 0].cos()], dim=1)
    c2w = look_at(eye, target, up=(0.0, -1.0, 0.0))  # DTU's up is -Y
    w2c = torch.linalg.inv(c2w)[:, :3]
    scale = 1 + 1e-6 * torch.randn(count, 1, 1, generator=generator, dtype=torch.float64)
    return scale * (DTU_K @ w2c)


def _close_per_row(a, b, rel=1e-6):
    """|a - b| <= rel * the largest magnitude in that matrix row."""
    row_scale = b.abs().amax(dim=-1, keepdim=True)
    return bool(((a - b).abs() <= rel * row_scale).all())


def test_dtu_to_cameras_and_back():
    P = _dtu_like_projections()
    cams = ct.cameras_from_dtu_projections(P)
    assert (cams.width, cams.height) == (1600, 1200)
    back = ct.dtu_projections_from_cameras(cams, scale=ct.dtu_projection_scale(P))
    assert _close_per_row(back, P, 1e-9)
    assert _close_per_row(ct.dtu_projections_from_cameras(cams), P, 1e-5)  # without the file's scale


def test_cameras_to_dtu_and_back():
    cams = Cameras.from_spherical(torch.tensor([0.3, -0.1, 0.6]), torch.tensor([0.0, 1.0, -2.5]), 600.0,
                                  math.radians(40), 1600, 1200, target=(10.0, 5.0, -600.0))
    again = ct.cameras_from_dtu_projections(ct.dtu_projections_from_cameras(cams))
    assert torch.allclose(again.c2w, cams.c2w, atol=1e-6, rtol=1e-6)
    assert torch.allclose(again.intrinsics, cams.intrinsics, atol=1e-9)


def test_dtu_world_maps_to_y_up():
    # A DTU camera with R = I looks along DTU +Z with image-down along DTU +Y ...
    w2c = torch.eye(4, dtype=torch.float64)[:3]
    w2c[:, 3] = torch.tensor([0.0, 0.0, 600.0])
    cams = ct.cameras_from_dtu_projections(DTU_K @ w2c)
    right, down, forward = cams.c2w[0, :3, 0], cams.c2w[0, :3, 1], cams.c2w[0, :3, 2]
    # ... which in our world is an upright camera on +Z looking towards -Z: azimuth 0, as the orbit builders.
    assert torch.allclose(right, torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(down, torch.tensor([0, -1.0, 0], dtype=torch.float64))
    assert torch.allclose(forward, torch.tensor([0, 0, -1.0], dtype=torch.float64))
    assert torch.allclose(cams.centers[0], torch.tensor([0, 0, 600.0], dtype=torch.float64))


@pytest.mark.skipif(not CAL18.is_dir(), reason=f"golden calibration set not found at {CAL18}")
def test_calibration_cameras_round_trip_and_stand_upright():
    calib = ct.DTUCalibration.from_folder(CAL18)
    cams = calib.to_cameras()
    P = calib.projections.double()
    back = ct.dtu_projections_from_cameras(cams, scale=ct.dtu_projection_scale(P))
    # The files' pixel skew (about 2e-4 px, from their 6-decimal rounding) is the only loss, in row 0.
    assert _close_per_row(back[:, 1:], P[:, 1:], 1e-9)
    center = ct.dtu_scene_center(cams) * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)  # DTU frame
    offsets = 50 * torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = torch.cat([center + offsets, torch.ones(20, 1, dtype=torch.float64)], dim=1)

    def pixels(M):
        projected = M @ points.T
        return projected[:, :2] / projected[:, 2:]

    assert (pixels(back) - pixels(P)).abs().max() < 1e-3
    assert (cams.c2w[:, 1, 1] < -0.8).all(), "image-down points world-down"
    center = ct.dtu_scene_center(cams)
    distances = (cams.centers - center).norm(dim=1)
    assert distances.min() > 400 and distances.max() < 800


def test_novel_view_tokens_from_cameras():
    P = _dtu_like_projections(8)
    dtu_cams = ct.cameras_from_dtu_projections(P)
    center = ct.dtu_scene_center(dtu_cams)
    assert torch.allclose(center, torch.tensor([40.0, 20.0, -600.0], dtype=torch.float64), atol=1e-6)
    camera_range = ct.DTUCameraRange.from_projections(P)
    orbit = Cameras.from_spherical(torch.tensor([0.05, 0.1]), torch.tensor([0.2, -0.1]), 600.0,
                                   dtu_cams.fov_y[0], 1600, 1200, target=center)
    tokens = ct.dtu_view_tokens_for_cameras(orbit)
    keys = [ct.parse_dtu_view_token(t, int_key=True).key for t in tokens]
    assert keys == [100, 101]
    normalised = camera_range.normalize_tokens(tokens)
    assert normalised.shape == (2, 12) and normalised.abs().max() < 3
    assert ct.dtu_view_tokens_for_cameras(orbit, keys=[7, 8])[1].startswith("<view_dtu12d_cam8_")
    with pytest.raises(ValueError, match="2 cameras but 1 keys"):
        ct.dtu_view_tokens_for_cameras(orbit, keys=[7])


def test_spherical_view_from_cameras():
    cams = Cameras.from_spherical(torch.tensor([math.radians(30), 0.0]), torch.tensor([math.radians(45), 0.0]),
                                  2.0, math.radians(40), 64, 64, target=(1.0, 0.0, 0.0))
    view = ct.spherical_view_from_cameras(cams, target=(1.0, 0.0, 0.0))
    assert torch.allclose(view, torch.tensor([[60.0, 45.0, 2.0], [90.0, 0.0, 2.0]], dtype=torch.float64))
