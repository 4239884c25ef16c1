"""RealFusion field pieces on tiny grids: grid gather/scatter, chunking, box, z-drop, normals, shading, level mask."""
import pytest
import torch

from nvs_core.realfusion.field import (FieldConfig, RealFusionField, freq_encode, morton3d, morton3d_invert,
                                       packbits, trunc_exp)
from nvs_core.realfusion.grid import TiledGridEncoder, corners, level_table

TINY = dict(grid_levels=4, grid_resolution=64, hidden_dim=16, hidden_dim_bg=8, grid_size=16)


def _reference_features(enc, x, bound):
    """Naive autograd reference: index_select + weights, no custom backward."""
    u = (x + bound) / (2 * bound)
    inside = ((u >= 0) & (u <= 1)).all(-1)
    u = torch.where(inside[:, None], u, torch.zeros_like(u))
    out = []
    for lv in enc.levels:
        rows, w = corners(u, lv)
        f = (w[..., None] * enc.embeddings[rows + lv.offset]).sum(1)
        out.append(f * inside[:, None])
    return torch.cat(out, -1)


def test_grid_gradient_matches_naive_autograd():
    torch.manual_seed(0)
    enc = TiledGridEncoder(4, 2, 4, 8, 24, init_std=0.5)
    x = torch.rand(300, 3) * 2.4 - 1.2  # some points outside the box
    g = torch.randn(300, 8)
    (enc(x, 1.0) * g).sum().backward()
    fast = enc.embeddings.grad.clone()
    enc.embeddings.grad = None
    ref = _reference_features(enc, x, 1.0)
    (ref * g).sum().backward()
    assert torch.allclose(fast, enc.embeddings.grad, atol=1e-5)
    assert torch.allclose(enc(x, 1.0), ref.detach(), atol=1e-6)


def test_grid_chunking_and_outside_points():
    torch.manual_seed(1)
    enc = TiledGridEncoder(4, 2, 4, 8, 24, init_std=0.5)
    x = torch.rand(101, 3) * 2 - 1
    x[:5] = torch.tensor([[1.01, 0, 0], [0, -1.2, 0], [0, 0, 3.0], [float("nan"), 0, 0], [2, 2, 2]])
    full = enc(x, 1.0)
    enc.chunk = 7
    assert torch.equal(enc(x, 1.0), full)
    assert torch.equal(full[:5], torch.zeros(5, 8))
    (enc(x[:5], 1.0).sum()).backward()
    assert torch.count_nonzero(enc.embeddings.grad) == 0


def test_z_is_dropped_at_fine_levels():
    levels = level_table(4, 4, 8, 24)
    assert [len(lv.strides) for lv in levels] == [3, 3, 3, 2]  # (25)^2 > 256 at level 3
    u = torch.tensor([[0.3, 0.6, 0.1], [0.3, 0.6, 0.9]])
    rows_a, _ = corners(u[:1], levels[3])
    rows_b, _ = corners(u[1:], levels[3])
    assert torch.equal(rows_a, rows_b)
    assert not torch.equal(corners(u[:1], levels[0])[0], corners(u[1:], levels[0])[0])


def test_level_mask_and_tiny_default_mask_everything():
    torch.manual_seed(0)
    field = RealFusionField(FieldConfig(**TINY))  # constructor mask 8 > 4 levels: every feature masked
    x = torch.rand(10, 3) - 0.5
    assert torch.equal(field.features(x), torch.zeros(10, 8))
    field.grid_levels_mask = 2
    with torch.no_grad():
        field.encoder.embeddings.uniform_(-1, 1)
    h = field.features(x)
    assert torch.equal(h[:, 4:], torch.zeros(10, 4)) and h[:, :4].abs().sum() > 0


def test_normals_point_away_from_a_density_blob():
    torch.manual_seed(0)
    field = RealFusionField(FieldConfig(**TINY), grid_levels_mask=0)
    with torch.no_grad():
        for p in field.sigma_net.parameters():
            p.zero_()
    x = torch.tensor([[0.2, 0.0, 0.0], [0.0, -0.15, 0.0], [0.0, 0.0, 0.1]])
    n = field.normal(x)
    assert torch.allclose(n, torch.nn.functional.normalize(x, dim=-1), atol=1e-3)
    light = torch.tensor([1.0, 0.0, 0.0])
    _, color, _ = field(x, None, light, ratio=0.1, shading="textureless")
    assert torch.allclose(color[0], torch.full((3,), 1.0), atol=1e-3)  # lit side
    assert torch.allclose(color[1], torch.full((3,), 0.1), atol=1e-3)  # ambient only
    _, color, _ = field(x, None, light, shading="normal")
    assert torch.allclose(color, (n + 1) / 2)
    with pytest.raises(ValueError, match="shading"):
        field(x, None, light, shading="phong")


def test_trunc_exp_gradient_is_clamped():
    x = torch.tensor([0.0, 20.0], requires_grad=True)
    trunc_exp(x).sum().backward()
    assert torch.allclose(x.grad, torch.exp(torch.tensor([0.0, 15.0])))


def test_freq_encoding_layout():
    x = torch.tensor([[0.1, -0.2, 0.3]])
    enc = freq_encode(x, 6, kernel=False)
    assert enc.shape == (1, 39)
    assert torch.allclose(enc[0, 3:6], torch.sin(x[0])) and torch.allclose(enc[0, 36:39], torch.cos(32 * x[0]))
    assert torch.allclose(freq_encode(x, 6, kernel=True), enc, atol=1e-6)


def test_morton_and_packbits():
    coords = torch.randint(0, 128, (500, 3))
    assert torch.equal(morton3d_invert(morton3d(coords)), coords)
    assert morton3d(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]])).tolist() == [1, 2, 4]
    grid = torch.zeros(16)
    grid[[0, 3, 9]] = 5.0
    assert packbits(grid, 1.0).tolist() == [0b1001, 0b10]


def test_occupancy_update_decays_and_thresholds():
    field = RealFusionField(FieldConfig(**TINY))

    def sphere(p):
        return 20.0 * (p.norm(dim=-1) < 0.3).float()

    field.update_occupancy(jitter=False, density_fn=sphere)
    first = field.density_grid.clone()
    assert field.mean_density == pytest.approx(first.mean().item())
    assert 0 < field.occupancy_fraction() < 0.1
    field.update_occupancy(jitter=False, density_fn=lambda p: torch.zeros(len(p)))
    assert torch.allclose(field.density_grid, first * 0.95)
