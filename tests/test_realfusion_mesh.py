"""RealFusion mesh export: density grid, threshold, marching cubes, cleanup, vertex colours, the textured
path (xatlas UVs, pure-PyTorch UV rasteriser, nearest inpainting), GLB/OBJ that load back with trimesh,
frames, and the empty-field error."""
import numpy as np
import pytest
import torch

from nvs_core.realfusion import mesh as rm
from nvs_core.realfusion.field import FieldConfig, RealFusionField

trimesh = pytest.importorskip("trimesh")

TINY = dict(grid_levels=4, grid_resolution=64, hidden_dim=16, hidden_dim_bg=8, grid_size=16)


class Ball(RealFusionField):
    """A ball of radius 0.4 centred at (0.2, 0, 0) (RealFusion frame), albedo red for x > 0.2 else blue."""

    def common_forward(self, x):
        r = (x - torch.tensor([0.2, 0.0, 0.0], device=x.device)).norm(dim=-1)
        sigma = 50.0 * torch.sigmoid((0.4 - r) * 60)
        right = (x[:, 0] > 0.2).float()
        albedo = torch.stack([right, 0.1 * torch.ones_like(right), 1 - right], -1)
        return sigma, albedo


@pytest.fixture(scope="module")
def ball():
    field = Ball(FieldConfig(**TINY), grid_levels_mask=0)
    field.mean_density = 20.0  # threshold min(20, 10) = 10
    return field


def _analytic(points):
    return {"sigma": torch.exp(-points.norm(dim=-1)), "albedo": torch.zeros(points.shape[0], 3)}


def test_threshold_is_the_published_rule(ball):
    volume = rm.density_volume(ball, 24)
    assert volume.shape == (24, 24, 24) and volume.dtype == np.float32
    assert rm.mesh_threshold(ball, volume) == 10.0
    ball.mean_density = 4.0
    assert rm.mesh_threshold(ball, volume) == 4.0
    ball.mean_density = 0.0  # never updated: the mean inside the box
    axis = np.linspace(-1, 1, 24)
    inside = np.abs(axis) <= ball.bound
    expected = min(volume[np.ix_(inside, inside, inside)].mean(), 10.0)
    assert rm.mesh_threshold(ball, volume) == pytest.approx(expected)
    ball.mean_density = 20.0


def test_density_volume_is_indexed_x_y_z():
    field = RealFusionField(FieldConfig(**TINY), grid_levels_mask=0)
    field.density = _analytic
    volume = rm.density_volume(field, 9, chunk=81 * 2)  # several slab groups
    axis = np.linspace(-1, 1, 9)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    np.testing.assert_allclose(volume, np.exp(-np.sqrt(x ** 2 + y ** 2 + z ** 2)), rtol=1e-5)


def test_vertex_colour_glb_loads_back(ball, tmp_path):
    mesh = rm.export_mesh(ball, tmp_path / "ball.glb", resolution=48)
    loaded = trimesh.load(tmp_path / "ball.glb", force="mesh")
    assert len(loaded.faces) == len(mesh.faces) > 100
    assert loaded.is_watertight and loaded.volume > 0  # closed, normals outward
    # the ball is at x = +0.2 in RealFusion's frame, hence at x = -0.2 in the NVS (glTF) frame
    centre = loaded.vertices.mean(0)
    assert centre[0] == pytest.approx(-0.2, abs=0.02) and abs(centre[1]) < 0.02
    radius = np.linalg.norm(loaded.vertices - centre, axis=1)
    assert radius.mean() == pytest.approx(0.4, abs=0.03)
    colors = np.asarray(loaded.visual.vertex_colors)[:, :3].astype(float) / 255
    red_side = loaded.vertices[:, 0] < -0.25  # NVS x < -0.2 is RealFusion x > 0.2
    assert colors[red_side, 0].mean() > 0.9 and colors[~red_side & (loaded.vertices[:, 0] > -0.15), 2].mean() > 0.9


def test_realfusion_frame_keeps_published_coordinates(ball):
    nvs = rm.extract_mesh(ball, 32)
    rf = rm.extract_mesh(ball, 32, frame="realfusion")
    np.testing.assert_allclose(nvs.vertices[:, 0], -rf.vertices[:, 0])
    np.testing.assert_array_equal(nvs.faces, rf.faces[:, ::-1])
    assert trimesh.Trimesh(rf.vertices, rf.faces).volume > 0


def test_cleanup_drops_small_pieces():
    field = RealFusionField(FieldConfig(**TINY), grid_levels_mask=0)

    def two_balls(points):
        big = 50.0 * torch.sigmoid((0.4 - points.norm(dim=-1)) * 60)
        small = 50.0 * torch.sigmoid((0.08 - (points - torch.tensor([0.6, 0.6, 0.6])).norm(dim=-1)) * 60)
        return {"sigma": big + small, "albedo": torch.ones(points.shape[0], 3)}

    field.density = two_balls
    field.mean_density = 10.0
    everything = rm.extract_mesh(field, 48)
    cleaned = rm.extract_mesh(field, 48, min_component_fraction=0.05)
    assert len(trimesh.Trimesh(everything.vertices, everything.faces).split(only_watertight=False)) == 2
    assert len(trimesh.Trimesh(cleaned.vertices, cleaned.faces).split(only_watertight=False)) == 1
    assert len(cleaned.faces) < len(everything.faces)


def test_empty_field_says_so_and_writes_nothing(tmp_path):
    field = RealFusionField(FieldConfig(**TINY, blob_density=0.0), grid_levels_mask=0)
    with torch.no_grad():
        field.sigma_net.net[-1].weight.zero_()
        field.sigma_net.net[-1].bias[0] = -12.0  # sigma = exp(-12) everywhere
    with pytest.raises(rm.EmptyFieldError, match="empty everywhere"):
        rm.export_mesh(field, tmp_path / "empty.glb", resolution=16)
    assert not list(tmp_path.iterdir())
    field.mean_density = 1e9  # a level above every density: no crossing
    with torch.no_grad():
        field.sigma_net.net[-1].bias[0] = 0.0
    with pytest.raises(rm.EmptyFieldError, match="no surface"):
        rm.extract_mesh(field, 16, threshold=5.0)


def test_uv_rasteriser_covers_triangles_exactly():
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    face_id, bary = rm.rasterize_uv(uv, faces, 8, chunk=16)  # several chunks
    assert (face_id >= 0).all()
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    centre_u, centre_v = (cols + 0.5) / 8, (rows + 0.5) / 8
    below = centre_u + centre_v < 1
    assert torch.equal(face_id[below], torch.zeros_like(face_id[below]))
    assert torch.equal(face_id[~below], torch.ones_like(face_id[~below]))
    # barycentrics reproduce the texel centre
    tri = uv[faces[face_id]]
    p = (bary[..., None] * tri).sum(-2)
    torch.testing.assert_close(p[..., 0], centre_u, atol=1e-5, rtol=0)
    torch.testing.assert_close(p[..., 1], centre_v, atol=1e-5, rtol=0)


def test_inpainting_fills_a_band_from_the_border():
    texture = np.zeros((12, 12, 3), np.uint8)
    mask = np.zeros((12, 12), bool)
    mask[4:8, 4:8] = True
    texture[mask] = 200
    texture[5:7, 5:7] = 50  # interior, outside the search band
    out = rm.inpaint_nearest(texture, mask)
    assert (out[1:4, 4:8] == 200).all() and (out[8:11, 4:8] == 200).all()  # dilation 3 copied from the border
    assert (out[0] == 0).all()  # beyond the band
    assert (out[5:7, 5:7] == 50).all()


@pytest.mark.skipif(not rm.xatlas_available(), reason="xatlas is not installed")
def test_textured_glb_and_obj(ball, tmp_path):
    mesh = rm.export_mesh(ball, tmp_path / "ball.glb", resolution=24, textured=True, texture_size=128)
    assert mesh.textured and mesh.texture.shape == (128, 128, 3)
    loaded = trimesh.load(tmp_path / "ball.glb", force="mesh")
    assert len(loaded.faces) == len(mesh.faces)
    assert loaded.visual.uv is not None and loaded.visual.material.baseColorTexture.size == (128, 128)
    # colours sampled from the texture at the vertices follow the albedo
    colors = np.asarray(loaded.visual.to_color().vertex_colors)[:, :3].astype(float) / 255
    red_side = loaded.vertices[:, 0] < -0.3
    blue_side = loaded.vertices[:, 0] > -0.1
    assert colors[red_side, 0].mean() > 0.8 and colors[blue_side, 2].mean() > 0.8
    rm.write_obj(mesh, tmp_path / "ball.obj")
    assert (tmp_path / "ball.mtl").is_file() and (tmp_path / "ball_albedo.png").is_file()
    obj = trimesh.load(tmp_path / "ball.obj", force="mesh")
    assert len(obj.faces) == len(mesh.faces)
    obj_colors = np.asarray(obj.visual.to_color().vertex_colors)[:, :3].astype(float) / 255
    assert obj_colors[obj.vertices[:, 0] < -0.3, 0].mean() > 0.8


def test_vertex_colour_obj(ball, tmp_path):
    mesh = rm.export_mesh(ball, tmp_path / "plain.obj", resolution=20)
    loaded = trimesh.load(tmp_path / "plain.obj", force="mesh", process=False)
    assert len(loaded.faces) == len(mesh.faces)


def test_outside_box_shortcut_is_exact():
    torch.manual_seed(1)
    field = RealFusionField(FieldConfig(**TINY), grid_levels_mask=0)
    with torch.no_grad():
        field.encoder.embeddings.uniform_(-0.5, 0.5)
    points = torch.rand(3000, 3) * 2.4 - 1.2  # inside and outside the 0.75 box
    torch.testing.assert_close(rm._sigma(field, points, 512), field.density(points)["sigma"].detach(),
                               rtol=1e-5, atol=1e-6)
