"""GeNVS field, renderer and camera conversion on a tiny random model."""
import math

import pytest
import torch

from nvs_core.cameras import orbit
from nvs_core.genvs.cameras import circle_path, from_genvs, spherical_path, to_genvs
from nvs_core.genvs.nerf import NeRFField, RenderDraws, SourceViews, render_views, rays_per_chunk
from nvs_core.genvs.pipeline import generate_views
from nvs_core.progress import silent_progress


@pytest.fixture(scope="module")
def field():
    torch.manual_seed(0)
    f = NeRFField(resolution_z=4, sigma_color_rank=2, color_feat_dim=4, hidden_dim=8)
    with torch.no_grad():
        f.sigma_color_net.net[-1].bias[0] = 1.0   # dense enough to see opacity
    return f.train(False)


def _src(num_views=2, size=8):
    cams = orbit(num_views, 0.3, 0.0, 2.0, 1.3, 0.8, 64, 64)
    g = to_genvs(cams)
    return SourceViews(torch.rand(1, num_views, 8, size, size), g.poses[None], g.camera_k), g


def _look_from(eye, target=(0.0, 0.0, 0.0)):
    """An OpenGL c2w in a Z-up world at ``eye`` looking at ``target``."""
    eye, target = torch.tensor(eye), torch.tensor(target)
    fwd = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    up = torch.linalg.cross(right, fwd)
    m = torch.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -fwd, eye
    return m


def test_rays_that_miss_render_background_not_nan(field):
    src, g = _src()
    away = _look_from((0.0, -3.0, 0.5), (0.0, -6.0, 0.5))        # looks away from the cube
    inside = _look_from((0.2, 0.1, 0.3), (0.0, 1.0, 0.0))        # camera inside the cube
    with torch.no_grad():
        f, d, o = render_views(field, torch.stack([away, inside])[None], g.intrinsics, src, 16, 16,
                               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(f).all() and torch.isfinite(d).all() and torch.isfinite(o).all()
    assert torch.all(f[0, 0] == 1) and torch.all(o[0, 0] == 0) and torch.all(d[0, 0] == 0)
    assert o[0, 1].min() > 0                                       # inside: every ray starts at near = 0.5


def test_chunking_does_not_change_the_render(field):
    src, g = _src(3)
    tgt = g.poses[None, :2]
    draws = RenderDraws.draw(1, 2, 16 * 16, random_importance=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = render_views(field, tgt, g.intrinsics, src, 16, 16, draws, memory_mb=1000)
        b = render_views(field, tgt, g.intrinsics, src, 16, 16, draws, memory_mb=0.05)
    assert rays_per_chunk(field, 3, 0.05) < 16 * 16 < rays_per_chunk(field, 3, 1000)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_memory_budget_for_six_full_size_views():
    full = NeRFField()        # the published field: 16 x 64 volume channels, 16 features
    chunk = rays_per_chunk(full, 6, 512)
    assert 64 * 64 > chunk > 64           # a 64x64 render from 6 views needs several chunks within 512 MB
    per_ray_bytes = 4 * 128 * (6 * full.floats_per_sample_view() + 48)
    assert chunk * per_ray_bytes <= 512 * 2 ** 20


def test_view_mean_uses_each_source_distance(field):
    src, g = _src(2)
    p = torch.zeros(1, 1, 3)
    coords = field.cam_coords(p, src)            # the origin sits at depth d_v of every view -> z' = 0
    torch.testing.assert_close(coords[..., 2], torch.zeros_like(coords[..., 2]), atol=1e-6, rtol=0)


def test_camera_conversion_round_trip_and_axes():
    cams = orbit(5, math.radians(20), 0.3, 2.0, 1.3, math.radians(40), 64, 64)
    g = to_genvs(cams)
    back = from_genvs(g.poses, g.intrinsics, 64, image_size=64)
    torch.testing.assert_close(back.c2w, cams.c2w, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.intrinsics, cams.intrinsics, atol=1e-7, rtol=0)
    # NVS elevation > 0 (camera above the target along +Y) is +Z in GeNVS's world
    assert torch.all(g.poses[:, 2, 3] > 0)
    assert torch.allclose(g.poses[:, :3, 3].norm(dim=-1), torch.full((5,), 1.3), atol=1e-6)
    fy = cams.intrinsics[0, 1] * 64
    torch.testing.assert_close(g.camera_k.double(), (fy / 32).reshape(1), atol=1e-9, rtol=0)


def test_paths():
    ref = _look_from((1.3, 0.0, 0.3))
    circle = circle_path(ref, 8)
    assert torch.allclose(circle[0], ref)
    assert torch.allclose(circle[2, :3, 3], torch.tensor([0.0, 1.3, 0.3]), atol=1e-6)
    sphere = spherical_path(1.3, 10)
    assert torch.allclose(sphere[:, :3, 3].norm(dim=-1), torch.full((10,), 1.3), atol=1e-5)


def test_bad_inputs():
    from nvs_core.genvs import build_genvs, tiny_config

    torch.manual_seed(0)
    model = build_genvs(tiny_config(image_size=32, render_size=4, decoder_channels=32, color_feat_dim=8,
                                    mapping_out=32, channels=(16, 32)))
    cams = to_genvs(orbit(3, 0.3, 0.0, 2.0, 1.3, 0.8, 32, 32), render_size=4)
    with pytest.raises(ValueError, match="2 source images but 1 source cameras"):
        generate_views(model, torch.rand(2, 3, 32, 32), cams[[0]], cams[[1]], steps=1, progress=silent_progress)
    with pytest.raises(ValueError, match="no target cameras"):
        generate_views(model, torch.rand(1, 3, 32, 32), cams[[0]], cams[[]], steps=1, progress=silent_progress)
    with pytest.raises(ValueError, match="noise must be one of"):
        generate_views(model, torch.rand(1, 3, 32, 32), cams[[0]], cams[[1]], steps=1, noise="x",
                       progress=silent_progress)


def test_srn_reader(tmp_path):
    from PIL import Image

    from nvs_core.multiview import load_srn

    for sub in ("rgb", "pose"):
        (tmp_path / sub).mkdir()
    eye = [[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, -1.0, 1.3], [0, 0, 0, 1.0]]   # OpenCV, looking down -z
    for i in range(3):
        Image.new("RGBA", (16, 16), (10, 20, 30, 0)).save(tmp_path / "rgb" / f"{i:06d}.png")
        (tmp_path / "pose" / f"{i:06d}.txt").write_text(" ".join(str(v) for row in eye for v in row))
    with pytest.raises(FileNotFoundError, match="intrinsics"):
        load_srn(tmp_path)
    (tmp_path / "intrinsics.txt").write_text("131.25 64 64 0.\n0. 0. 0.\n1.\n128 128\n")
    mv = load_srn(tmp_path)
    assert mv.names == ["000000", "000001", "000002"] and mv.images.shape == (3, 16, 16, 3)
    assert torch.all(mv.images == 1)                       # transparent pixels composited on white
    assert torch.allclose(mv.cameras.intrinsics[0], torch.tensor([131.25 / 128, 131.25 / 128, 0.5, 0.5],
                                                                 dtype=torch.float64))
    g = to_genvs(mv.cameras)
    assert torch.allclose(g.poses[0], torch.tensor(eye) @ torch.diag(torch.tensor([1.0, -1, -1, 1])))
    with pytest.raises(FileNotFoundError, match="no image for view"):
        load_srn(tmp_path, views=["000009"])
    with pytest.raises(FileNotFoundError, match="SRN instance"):
        load_srn(tmp_path / "rgb")
