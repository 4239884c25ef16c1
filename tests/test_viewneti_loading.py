"""Loading ViewNeTI/NeTI artefacts: upstream-format files written here with stand-in classes, the
published-format golden files, load options, errors, and the converter command line."""
import copy
import json
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from nvs_core.checkpoints import CheckpointError
from nvs_core.convert import convert
from nvs_core.viewneti.config import ViewNetiLoadOptions, effective_pe_sigmas, viewneti_mapper_kwargs
from nvs_core.viewneti.loading import (load_learned_embeds, load_mapper_file, load_viewneti, read_mapper_file)
from nvs_core.viewneti.mapper import ViewNetiMapper, seeded_fourier_matrix
from tests.paths import GOLDEN_DIR, ROOT

GOLDEN = GOLDEN_DIR / "viewneti"
CAM0_TOKEN = ("<view_dtu12d_cam0_2607p4299_-3p8449_1498p1781_-533936p6875_-192p0769_2862p5525_681p7982_"
              "23434p6875_-0p2416_-0p0310_0p9699_22p5401>")
CFG = {
    "learnable_mode": 5,
    "data": {"camera_representation": "dtu-12d", "placeholder_object_token": "<object>"},
    "model": {"arch_view_net": 15, "arch_mlp_hidden_dims": 32, "word_embedding_dim": 16,
              "output_bypass_view": True, "output_bypass_object": True,
              "output_bypass_alpha_view": 2.0, "output_bypass_alpha_object": 5.0,
              "target_norm_view": 0.39, "target_norm_object": 0.38,
              "pe_sigmas": {"sigma_t": 0.03, "sigma_l": 2.0, "sigma_theta": 2.0, "sigma_phi": 2.0, "sigma_r": 2.0,
                            "sigma_dtu12": 0.5},
              "pe_sigma_exp_key": 2, "pe_t_exp_key": 0, "pe_l_exp_key": 0, "use_nested_dropout": False,
              "nested_dropout_prob": 0.5, "original_ti": False, "bypass_unconstrained_view": False,
              "bypass_unconstrained_object": False, "arch_view_disable_tl": False, "num_pe_time_anchors": 10},
}


@pytest.fixture
def upstream_classes(monkeypatch):
    """Classes named like upstream's ``models.positional_encoding`` ones, so torch.save pickles them by
    that name exactly as the published files do. Our loader must never import them."""
    package, module = types.ModuleType("models"), types.ModuleType("models.positional_encoding")

    class FourierPositionalEncodingNDims(nn.Module):
        def __init__(self, sigmas, w):
            super().__init__()
            self.sigmas, self.dim, self.normalize, self.w = list(sigmas), 64, False, w

    class NeTIPositionalEncoding(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.sigma_t, self.sigma_l, self.num_w, self.w = 0.03, 2.0, w.shape[0], w

    for cls in (FourierPositionalEncodingNDims, NeTIPositionalEncoding):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    package.positional_encoding = module
    monkeypatch.setitem(sys.modules, "models", package)
    monkeypatch.setitem(sys.modules, "models.positional_encoding", module)
    return module


def _mapper_entry(classes, kind, token, cfg=CFG, w=None):
    kwargs = viewneti_mapper_kwargs(cfg, kind)
    mapper = ViewNetiMapper(**kwargs)
    w = seeded_fourier_matrix(kwargs["sigmas"]) if w is None else w
    encoder = classes.FourierPositionalEncodingNDims(kwargs["sigmas"], w.clone().requires_grad_(True))
    return {"state_dict": mapper.state_dict(), "encoder": encoder, "placeholder_object_token": token}, mapper


def _write_view_file(path, classes, cfg=CFG, w=None):
    entry, mapper = _mapper_entry(classes, "view", "dummy", cfg, w)
    torch.save({"cfg": cfg, "mappers": {"dummy_key": entry}}, path)
    return mapper


def _write_object_file(path, classes, tokens=("<object>",), cfg=CFG):
    entries, mappers = {}, {}
    for i, token in enumerate(tokens):
        entries[49411 + i], mappers[token] = _mapper_entry(classes, "object", token, cfg)
    torch.save({"cfg": cfg, "mappers": entries}, path)
    return mappers


def _same_outputs(a, b, view_params=None):
    t, l = torch.tensor([0.0, 466.0, 999.0]), torch.tensor([0.0, 3.0, 15.0])
    with torch.no_grad():
        x, y = a(t, l, view_params), b(t, l, view_params)
    return torch.equal(x.word, y.word) and torch.equal(x.bypass, y.bypass)


def test_published_layout_loads_without_importing_upstream(tmp_path, upstream_classes):
    view_path, object_path = tmp_path / "mapper-steps-10_view.pt", tmp_path / "mapper-steps-10_object.pt"
    view = _write_view_file(view_path, upstream_classes)
    objects = _write_object_file(object_path, upstream_classes, ("<scan3>", "<scan8>"))
    mfile = read_mapper_file(view_path)
    assert mfile.kind == "view" and mfile.entries[0].stored_key == "dummy_key" and mfile.cfg == CFG
    assert mfile.entries[0].encoder_class == "FourierPositionalEncodingNDims"

    model = load_viewneti(view_path, object_path, calibration=[-1e7] * 12 + [1e7] * 12)
    assert list(model.objects) == ["<scan3>", "<scan8>"], "keyed by placeholder string, not the stored ids"
    assert not model.view.training and not any(p.requires_grad for p in model.view.parameters())
    params = model.view_inputs([CAM0_TOKEN] * 3)
    assert _same_outputs(model.view, view.train(False), params)
    assert _same_outputs(model.objects["<scan8>"], objects["<scan8>"].train(False))
    # The published view mapper takes the object mapper's alpha; the option fixes that.
    assert model.view.bypass_alpha == 5.0
    fixed = load_viewneti(view_path, options=ViewNetiLoadOptions(view_alpha_from_object=False))
    assert fixed.view.bypass_alpha == 2.0 and fixed.view_range is None


def test_fourier_matrix_option(tmp_path, upstream_classes):
    path = tmp_path / "mapper-steps-1_view.pt"
    odd = torch.full((32, 14), 0.25)
    _write_view_file(path, upstream_classes, w=odd)
    assert torch.equal(load_mapper_file(path).mapper.encoder.w, odd)
    seed0 = load_mapper_file(path, ViewNetiLoadOptions(fourier_matrix="seed0")).mapper.encoder.w
    assert torch.equal(seed0, seeded_fourier_matrix([0.03, 2.0] + [0.5] * 12))
    with pytest.raises(ValueError, match="fourier_matrix"):
        ViewNetiLoadOptions(fourier_matrix="file")


def test_config_without_later_fields_loads(tmp_path, upstream_classes):
    cfg = copy.deepcopy(CFG)
    for key in ("bypass_unconstrained_view", "bypass_unconstrained_object"):
        del cfg["model"][key]  # upstream's loader leaves alpha unset (and crashes) without these
    path = tmp_path / "old_view.pt"
    _write_view_file(path, upstream_classes, cfg)
    mapper = load_mapper_file(path).mapper
    assert mapper.bypass_alpha == 5.0 and not mapper.bypass_unconstrained


def test_effective_sigmas_follow_the_experiment_keys():
    cfg = copy.deepcopy(CFG)
    cfg["model"].update(pe_sigma_exp_key=3, pe_t_exp_key=2, pe_l_exp_key=1)
    cfg["model"]["pe_sigmas"].update(sigma_phi=1.5, sigma_t=9.0)
    sigmas = effective_pe_sigmas(cfg)
    assert sigmas == {"sigma_t": 0.2, "sigma_l": 4.0, "sigma_theta": 1.5, "sigma_phi": 1.5, "sigma_r": 1.5,
                      "sigma_dtu12": 0.25}
    assert viewneti_mapper_kwargs(cfg, "view", "theta-phi")["sigmas"] == [0.2, 4.0, 1.5, 1.5]


def test_refusals(tmp_path, upstream_classes):
    cfg = copy.deepcopy(CFG)
    cfg["model"]["arch_view_net"] = 12
    path = tmp_path / "legacy_view.pt"
    torch.save({"cfg": cfg, "mappers": {"dummy_key": _mapper_entry(upstream_classes, "view", "dummy")[0]}}, path)
    with pytest.raises(CheckpointError, match="arch_view_net 12 is not supported"):
        load_mapper_file(path)

    class Sneaky:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil_view.pt"
    torch.save({"cfg": CFG, "mappers": {"dummy_key": {"state_dict": {}, "encoder": Sneaky(),
                                                      "placeholder_object_token": "dummy"}}}, evil)
    with pytest.raises(CheckpointError, match="refuses global builtins.print"):
        read_mapper_file(evil)
    with pytest.raises(CheckpointError, match="expected a view-mapper file"):
        _write_object_file(tmp_path / "o.pt", upstream_classes)
        load_viewneti(view_mapper=tmp_path / "o.pt")


def test_neti_mapper_file(tmp_path, upstream_classes):
    from nvs_core.viewneti.mapper import NetiMapper

    original = NetiMapper(target_norm=0.3, generator=torch.Generator().manual_seed(3)).train(False)
    cfg = {"model": {"target_norm": 0.3, "pe_sigmas": {"sigma_t": 0.03, "sigma_l": 2.0}, "output_bypass": True,
                     "use_nested_dropout": True, "nested_dropout_prob": 0.5, "num_pe_time_anchors": 10,
                     "use_positional_encoding": True}}
    path = tmp_path / "mapper-steps-500.pt"
    torch.save({"state_dict": original.state_dict(), "cfg": cfg,
                "encoder": upstream_classes.NeTIPositionalEncoding(original.encoder.w.clone())}, path)
    loaded = load_mapper_file(path)
    assert loaded.kind == "neti"
    assert _same_outputs(loaded.mapper, original)

    out = tmp_path / "neti.safetensors"
    convert(path, "viewneti", out)
    assert _same_outputs(load_mapper_file(out).mapper, original)


def test_converter_command_line_round_trip(tmp_path, upstream_classes):
    src, out = tmp_path / "mapper-steps-10_object.pt", tmp_path / "converted" / "object.safetensors"
    mappers = _write_object_file(src, upstream_classes, ("<scan3>", "<scan8>"))
    result = subprocess.run([sys.executable, "-m", "nvs_core", "convert", str(src), "--method", "viewneti",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["method"] == "viewneti" and config["meta"]["kind"] == "object"
    assert [e["placeholder_token"] for e in config["meta"]["entries"]] == ["<scan3>", "<scan8>"]
    assert [e["stored_key"] for e in config["meta"]["entries"]] == [49411, 49412]
    loaded = load_mapper_file(out)
    assert list(loaded.mappers) == ["<scan3>", "<scan8>"]
    for token, mapper in mappers.items():
        assert _same_outputs(loaded.mappers[token], mapper.train(False))
        assert list(loaded.mappers[token].state_dict()) == list(mapper.state_dict())


def test_learned_embeds_convert_keeping_their_order(tmp_path):
    rows = torch.randn(3, 8)
    tokens = ["<view_dtu12d_cam25_x>", "<view_dtu12d_cam3_x>", "<object>"]  # not alphabetical
    src = tmp_path / "learned_embeds-steps-10.bin"
    torch.save({token: rows[i] for i, token in enumerate(tokens)}, src)  # row views of one storage
    assert [v.storage_offset() for v in load_learned_embeds(src).values()] == [0, 8, 16]
    out = tmp_path / "embeds.safetensors"
    convert(src, "viewneti", out)
    embeds = load_learned_embeds(out)
    assert list(embeds) == tokens and all(torch.equal(embeds[t], rows[i]) for i, t in enumerate(tokens))
    with pytest.raises(CheckpointError, match="token registry, not a mapper checkpoint"):
        read_mapper_file(src)


@pytest.mark.skipif(not (GOLDEN / "checkpoints").is_dir(), reason="golden ViewNeTI checkpoints not found")
def test_golden_files_convert_and_reload(tmp_path):
    src = GOLDEN / "checkpoints" / "mapper-steps-10_view.pt"
    original = load_mapper_file(src).mapper
    out = tmp_path / "view.safetensors"
    convert(src, "viewneti", out)
    again = load_mapper_file(out).mapper
    params = torch.rand(3, 12) * 2 - 1
    assert _same_outputs(original, again, params)
    assert torch.equal(original.encoder.w, again.encoder.w)
    embeds = load_learned_embeds(GOLDEN / "checkpoints" / "learned_embeds-steps-10.bin")
    assert len(embeds) == 4 and all(v.shape == (1024,) for v in embeds.values())
