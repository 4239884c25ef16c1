import math

import pytest
import torch

from nvs_core import cameras as cam

TOL = 1e-6


def _cams(n=5, seed=0, width=64, height=48):
    g = torch.Generator().manual_seed(seed)
    el = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2.8
    az = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 6.0
    r = 1.0 + 3.0 * torch.rand(n, generator=g, dtype=torch.float64)
    target = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5)
    c = cam.Cameras.from_spherical(el, az, r, math.radians(50), width, height, target=target)
    # Off-centre principal points and non-square pixels exercise the intrinsics paths.
    c.intrinsics[:, 0] *= 1.1
    c.intrinsics[:, 2] += 0.03
    return c


def test_front_camera_convention():
    c = cam.Cameras.from_spherical(0.0, 0.0, 2.0, math.radians(40), 64, 64)
    c2w = c.c2w[0]
    assert torch.allclose(c2w[:3, 3], torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), atol=TOL)
    assert torch.allclose(c2w[:3, 2], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64), atol=TOL)  # looks at origin
    # OpenCV camera y points down in the image, so image-up (-y) is world +Y.
    assert torch.allclose(-c2w[:3, 1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=TOL)
    assert torch.allclose(c2w[:3, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=TOL)


def test_elevation_90_looks_straight_down():
    c = cam.Cameras.from_spherical(math.pi / 2, 0.3, 3.0, math.radians(40), 64, 64)
    assert torch.allclose(c.centers[0], torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64), atol=TOL)
    assert torch.allclose(c.c2w[0, :3, 2], torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64), atol=TOL)
    assert torch.allclose(torch.linalg.det(c.c2w[0, :3, :3]), torch.tensor(1.0, dtype=torch.float64))


def test_azimuth_plus_90_is_plus_x_counter_clockwise_from_above():
    c = cam.Cameras.from_spherical(0.0, math.pi / 2, 2.0, math.radians(40), 64, 64)
    assert torch.allclose(c.centers[0], torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), atol=TOL)
    # Seen from above (looking down -Y) with +X to the right, +Z points down the screen: the turn from
    # +Z (azimuth 0) to +X (azimuth 90) is counter-clockwise, a right-handed turn about +Y.
    small = cam.Cameras.from_spherical(0.0, 0.1, 1.0, 1.0, 8, 8).centers[0]
    assert small[0] > 0 and small[2] > 0


def test_rotations_are_proper_and_orbit_closes():
    o = cam.orbit(8, 0.2, 0.0, 2 * math.pi, 2.0, 0.7, 32, 32)
    assert len(o) == 8
    R = o.c2w[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(8, 3, 3), atol=TOL)
    step = o.centers[1] - o.centers[0]
    closing = o.centers[0] - o.centers[7]
    assert torch.allclose(step.norm(), closing.norm(), atol=TOL)  # no repeated first view
    partial = cam.orbit(3, 0.0, 0.0, math.pi, 2.0, 0.7, 32, 32)
    assert torch.allclose(partial.centers[-1], torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64), atol=TOL)


@pytest.mark.parametrize("convention", cam.CONVENTIONS)
def test_c2w_w2c_round_trips(convention):
    c = _cams()
    back = cam.Cameras.from_c2w(c.to_c2w(convention), c.K(), c.width, c.height, convention)
    assert torch.allclose(back.c2w, c.c2w, atol=TOL) and torch.allclose(back.intrinsics, c.intrinsics, atol=TOL)
    back = cam.Cameras.from_w2c(c.to_w2c(convention), c.K(), c.width, c.height, convention)
    assert torch.allclose(back.c2w, c.c2w, atol=TOL)


def test_opengl_axes_and_blender_world():
    c = cam.Cameras.from_spherical(0.0, 0.0, 2.0, 0.7, 16, 16)
    gl = c.to_c2w("opengl")[0]
    assert torch.allclose(gl[:3, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=TOL)  # looks down -z
    assert torch.allclose(gl[:3, 1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=TOL)  # y up
    bl = c.to_c2w("blender")[0]
    # Y-up (0,0,2) is Z-up (0,-2,0); Blender's up axis is +Z.
    assert torch.allclose(bl[:3, 3], torch.tensor([0.0, -2.0, 0.0], dtype=torch.float64), atol=TOL)
    assert torch.allclose(bl[:3, 1], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=TOL)


@pytest.mark.parametrize("world", ["y_up", "z_up"])
def test_projection_round_trip(world):
    c = _cams()
    P = c.to_projection(world=world)
    assert P.shape == (5, 3, 4)
    back = cam.Cameras.from_projection(P * 3.7, c.width, c.height, world=world)  # P is defined up to scale
    assert torch.allclose(back.c2w, c.c2w, atol=TOL)
    assert torch.allclose(back.intrinsics, c.intrinsics, atol=TOL)
    back = cam.Cameras.from_projection(-P, c.width, c.height, world=world)
    assert torch.allclose(back.c2w, c.c2w, atol=TOL)


def test_projection_projects_like_rays():
    c = _cams(n=2)
    origins, dirs = c.rays(normalize=True, dtype=torch.float64)
    points = origins + 1.7 * dirs
    P = c.to_projection()
    hom = torch.cat([points, torch.ones_like(points[..., :1])], -1)
    pix = torch.einsum("nij,nhwj->nhwi", P, hom)
    pix = pix[..., :2] / pix[..., 2:]
    ys, xs = torch.meshgrid(torch.arange(c.height) + 0.5, torch.arange(c.width) + 0.5, indexing="ij")
    assert torch.allclose(pix[0, ..., 0], xs.double(), atol=1e-6)
    assert torch.allclose(pix[1, ..., 1], ys.double(), atol=1e-6)


def test_json_round_trip_and_variants():
    c = _cams()
    back = cam.cameras_from_dict(c.to_dict())
    assert torch.allclose(back.c2w, c.c2w, atol=TOL) and torch.allclose(back.intrinsics, c.intrinsics, atol=TOL)
    gl = {"width": c.width, "height": c.height, "convention": "opengl",
          "cameras": [{"c2w": m.tolist(), "K": k.tolist()} for m, k in zip(c.to_c2w("opengl"), c.K())]}
    assert torch.allclose(cam.cameras_from_dict(gl).c2w, c.c2w, atol=TOL)
    projections = [p.tolist() for p in c.to_projection()]
    assert torch.allclose(cam.cameras_from_dict(projections, c.width, c.height).c2w, c.c2w, atol=TOL)
    fov = cam.cameras_from_dict({"width": 32, "height": 32, "cameras": [{"c2w": torch.eye(4).tolist(), "fov": 90}]})
    assert torch.allclose(fov.intrinsics[0, 1], torch.tensor(0.5, dtype=torch.float64))


@pytest.mark.parametrize("bad, message", [
    ({"cameras": []}, "width"),
    ({"width": 8, "height": 8, "cameras": []}, "non-empty"),
    ({"width": 8, "height": 8, "cameras": [{"c2w": [[1, 0], [0, 1]], "fov": 40}]}, "camera 0: 'c2w' must be 4x4 or 3x4"),
    ({"width": 8, "height": 8, "cameras": [{"c2w": torch.eye(4).tolist()}]}, "intrinsics"),
    ({"width": 8, "height": 8, "convention": "dx", "cameras": [{"fov": 3}]}, "unknown camera convention"),
    ({"width": 8, "height": 8, "cameras": [{"c2w": (2 * torch.eye(4)).tolist(), "fov": 40}]}, "rotation"),
])
def test_json_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        cam.cameras_from_dict(bad)


def test_intrinsics_survive_resizing_and_pixel_conversion():
    c = cam.Cameras.from_spherical(0.0, 0.0, 2.0, math.radians(60), 64, 32)
    K = c.K()
    assert torch.allclose(K[0, 1, 1], torch.tensor(16 / math.tan(math.radians(30)), dtype=torch.float64))
    assert torch.allclose(K[0, 0, 0], K[0, 1, 1])  # square pixels
    assert torch.allclose(K[0, :2, 2], torch.tensor([32.0, 16.0], dtype=torch.float64))
    assert torch.allclose(c.K(128, 64), K * torch.tensor([[2, 2, 2], [2, 2, 2], [1, 1, 1]], dtype=torch.float64))
    assert torch.allclose(c.fov_y, torch.tensor([math.radians(60)], dtype=torch.float64))


def test_rays_pass_through_pixel_centres():
    c = cam.Cameras.from_spherical(0.0, 0.0, 2.0, math.radians(90), 2, 2)
    origins, dirs = c.rays(normalize=False, dtype=torch.float64)
    assert torch.allclose(origins[0, 0, 0], torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    # 2x2 image, 90 degree fov: pixel (0,0) centre is at (-0.5,-0.5) in normalised camera coordinates.
    expected_cam = torch.tensor([-0.5, -0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(dirs[0, 0, 0], c.c2w[0, :3, :3] @ expected_cam)
    assert dirs[0, 0, 0, 1] > 0  # the top row looks up (+Y)


def test_plucker_moment_is_invariant_along_the_ray():
    c = _cams(n=2)
    pl = c.plucker(dtype=torch.float64)
    o, d = c.rays(dtype=torch.float64)
    shifted = torch.linalg.cross(o + 0.8 * d, d)
    assert pl.shape == (2, c.height, c.width, 6)
    assert torch.allclose(pl[..., :3], shifted, atol=1e-9)
    assert torch.allclose(pl[..., 3:].norm(dim=-1), torch.ones(2, c.height, c.width, dtype=torch.float64))


def test_relative_poses():
    c = _cams()
    rel = c.relative_to(2)
    assert torch.allclose(rel.c2w[2], torch.eye(4, dtype=torch.float64), atol=TOL)
    # Relative poses do not depend on the world frame.
    g = torch.eye(4, dtype=torch.float64)
    g[:3, :3] = cam.spherical_c2w(0.4, 1.1, 1.0)[0, :3, :3]
    g[:3, 3] = torch.tensor([0.3, -1.0, 2.0])
    assert torch.allclose(c.transformed(g).relative_to(2).c2w, rel.c2w, atol=TOL)
    assert torch.allclose(c.relative_to(c[2]).c2w, rel.c2w, atol=TOL)


def test_look_at_matches_spherical_and_handles_vertical():
    c = _cams()
    target = c.centers + c.c2w[:, :3, 2]
    la = cam.look_at(c.centers, target)
    assert torch.allclose(la, c.c2w, atol=1e-6)
    down = cam.look_at(torch.tensor([[0.0, 2.0, 0.0]]), torch.zeros(3))
    assert torch.isfinite(down).all() and torch.allclose(down[0, :3, 2], torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))


def test_slicing_cat_and_sizes():
    c = _cams(n=6)
    assert len(c[1:4]) == 3 and len(c[[0, 5]]) == 2 and len(c[-1]) == 1
    both = cam.Cameras.cat([c[:2], c[4:]])
    assert torch.equal(both.c2w, c.c2w[[0, 1, 4, 5]])
    with pytest.raises(ValueError, match="resize"):
        cam.Cameras.cat([c, c.with_size(10, 10)])
    with pytest.raises(IndexError):
        c[6]


def test_spiral_and_trajectory():
    s = cam.spiral(10, -0.2, 0.6, 1.5, 2.0, 0.8, 32, 32)
    el = torch.asin(s.centers[:, 1] / 2.0)
    assert torch.allclose(el[[0, -1]], torch.tensor([-0.2, 0.6], dtype=torch.float64), atol=TOL)
    keys = cam.orbit(3, 0.2, 0.0, math.pi / 2, 2.0, 0.8, 32, 32)
    path = cam.interpolate(keys, 5)
    assert torch.allclose(path.c2w[[0, 2, 4]], keys.c2w, atol=1e-6)
    R = path.c2w[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-6)


def test_load3d_conversion():
    info = {"position": {"x": 0, "y": 0, "z": 3}, "target": {"x": 0, "y": 0, "z": 0}, "zoom": 2, "cameraType": "perspective"}
    c = cam.cameras_from_load3d(info, math.radians(35), 64, 64)
    ref = cam.Cameras.from_spherical(0.0, 0.0, 3.0, math.radians(35), 64, 64)
    assert torch.allclose(c.c2w, ref.c2w, atol=TOL)
    assert torch.allclose(c.intrinsics[0, 1], 2 * ref.intrinsics[0, 1])  # zoom 2 halves tan(fov/2)
    with pytest.raises(ValueError, match="perspective"):
        cam.cameras_from_load3d({**info, "cameraType": "orthographic"}, 0.6, 8, 8)
    with pytest.raises(ValueError, match="position"):
        cam.cameras_from_load3d({"target": {}}, 0.6, 8, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(radius=0.0), "radius"), (dict(radius=-1.0), "radius"),
    (dict(fov=0.0), "field of view"), (dict(fov=math.pi), "field of view"),
])
def test_bad_spherical_inputs(kwargs, message):
    args = dict(elevation=0.0, azimuth=0.0, radius=2.0, fov=0.8, width=8, height=8) | kwargs
    with pytest.raises(ValueError, match=message):
        cam.Cameras.from_spherical(**args)
