"""ViewNeTI / NeTI mappers: structure, encodings and nested dropout (no fixtures needed)."""
import pytest
import torch

from nvs_core.viewneti.mapper import (NetiMapper, NetiTimeLayerEncoding, ViewNetiMapper, nested_dropout,
                                      seeded_fourier_matrix)

VIEW_SIGMAS = [0.03, 2.0] + [0.5] * 12
VIEW_KEYS = ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias",
             "net.4.weight", "net.4.bias", "output_layer.0.weight", "output_layer.0.bias"]


def test_view_mapper_keys_and_fourier_matrix_outside_state_dict():
    mapper = ViewNetiMapper(VIEW_SIGMAS, target_norm=0.4, bypass_alpha=5.0)
    assert list(mapper.state_dict()) == VIEW_KEYS
    assert mapper.state_dict()["output_layer.0.weight"].shape == (2048, 64)
    assert mapper.encoder.w.shape == (32, 14)
    assert torch.equal(mapper.encoder.w, seeded_fourier_matrix(VIEW_SIGMAS))
    mapper = mapper.to(torch.float64)  # the matrix follows the module's dtype although it is not saved
    assert mapper.encoder.w.dtype == torch.float64


def test_building_a_mapper_does_not_reseed_the_global_rng():
    # Upstream reseeds with 0 while building, so its fresh networks never depended on the caller's seed.
    torch.manual_seed(5)
    first = ViewNetiMapper([0.03, 2.0])
    torch.manual_seed(6)
    second = ViewNetiMapper([0.03, 2.0])
    assert torch.equal(first.encoder.w, second.encoder.w)
    assert not torch.equal(first.net[0].weight, second.net[0].weight)


def test_seeded_matrix_matches_global_seed_formula():
    state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        w = torch.randn(32, 3)
    finally:
        torch.set_rng_state(state)
    w[:, 0] *= 0.03
    w[:, 1] *= 2.0
    w[:, 2] *= 0.5
    assert torch.equal(seeded_fourier_matrix([0.03, 2.0, 0.5]), w)


def test_view_mapper_outputs():
    torch.manual_seed(0)
    mapper = ViewNetiMapper(VIEW_SIGMAS, target_norm=0.4, bypass_alpha=5.0).train(False)
    t, l = torch.tensor([0.0, 999.0, 250.7]), torch.tensor([0.0, 15.0, 6.0])
    view = torch.rand(3, 12) * 2 - 1
    x = mapper.normalized_inputs(t, l, view)
    assert torch.allclose(x[:, 0], torch.tensor([-1.0, 0.998, -0.4986]), atol=1e-6)
    assert torch.allclose(x[:, 1], torch.tensor([-1.0, 0.875, -0.25]))
    out = mapper(t, l, view)
    assert out.word.shape == out.bypass.shape == (3, 1024)
    assert torch.allclose(out.word.norm(dim=1), torch.full((3,), 0.4))
    assert out.bypass_alpha == 5.0 and not out.bypass_unconstrained
    # One camera row broadcasts over many (t, l) rows.
    single = mapper(t, l, view[:1])
    assert torch.allclose(single.word[0], out.word[0])
    with pytest.raises(ValueError, match="needs 12 normalised camera numbers"):
        mapper(t, l)
    with pytest.raises(ValueError, match="expects 12 camera numbers"):
        mapper(t, l, view[:, :3])


def test_object_mapper_without_bypass_or_norm():
    mapper = ViewNetiMapper([0.03, 2.0], word_dim=8, hidden_dim=16, output_bypass=False).train(False)
    assert mapper.output_layer[0].out_features == 8 and not mapper.is_view_mapper
    out = mapper(torch.tensor([10.0]), torch.tensor([3.0]))
    assert out.bypass is None and out.word.shape == (1, 8)


def test_gradients_reach_the_mapper():
    mapper = ViewNetiMapper([0.03, 2.0], target_norm=0.4)
    out = mapper(torch.tensor([10.0, 500.0]), torch.tensor([3.0, 7.0]))
    (out.word.sum() + out.bypass.sum()).backward()
    assert mapper.net[0].weight.grad is not None and mapper.encoder.w.grad is None


def test_nested_dropout():
    hidden = torch.ones(4, 10)
    assert torch.equal(nested_dropout(hidden, False, 0.5), hidden)
    truncated = nested_dropout(hidden, False, 0.5, truncation_idx=3)
    assert truncated[:, :3].eq(1).all() and truncated[:, 3:].eq(0).all() and hidden.eq(1).all()
    generator = torch.Generator().manual_seed(0)
    cut = nested_dropout(hidden, True, 1.0, generator=generator)
    for row in cut:  # each row keeps a prefix and loses the rest
        kept = int(row.sum())
        assert row[:kept].eq(1).all() and row[kept:].eq(0).all()
    assert torch.equal(nested_dropout(hidden, True, 0.0, generator=generator), hidden)


def test_neti_mapper_structure_and_anchor_init():
    generator = torch.Generator().manual_seed(1)
    mapper = NetiMapper(target_norm=0.39, generator=generator).train(False)
    keys = list(mapper.state_dict())
    assert keys[:4] == ["input_layer.weight", "input_layer.bias", "net.0.weight", "net.0.bias"]
    assert mapper.net[0] is mapper.input_layer and len(keys) == 14
    anchors = mapper.input_layer.weight.detach()
    assert anchors.shape == (160, 2048)
    # Row (t/100)*16 + l is the unit-length encoding of (t, l).
    assert torch.allclose(anchors[3 * 16 + 5], mapper.encoder(torch.tensor([300.0]), torch.tensor([5.0]))[0], atol=1e-6)
    assert torch.allclose(anchors.norm(dim=1), torch.ones(160), atol=1e-5)
    out = mapper(torch.tensor([300.0, 466.0]), torch.tensor([5.0, 3.0]))
    whole = torch.cat([out.word, out.bypass], dim=1)
    assert torch.allclose(whole.norm(dim=1), torch.full((2,), 0.39))  # normalised as a whole
    assert out.bypass_alpha == 0.2 and out.word.shape == (2, 768)


def test_neti_encoding_takes_the_given_matrix():
    w = torch.randn(8, 2)
    enc = NetiTimeLayerEncoding(num_w=8, w=w)
    assert torch.equal(enc.w, w)
    with pytest.raises(ValueError, match=r"shape \(8, 2\)"):
        NetiTimeLayerEncoding(num_w=8, w=torch.randn(4, 2))
