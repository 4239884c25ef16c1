"""RealFusion field files: the published df.pth layout, our safetensors format, conversion, bad files."""
from collections import OrderedDict

import pytest
import torch

from nvs_core.checkpoints import CheckpointError
from nvs_core.convert import convert
from nvs_core.realfusion.field import FieldConfig
from nvs_core.realfusion.loading import build_field, load_field, read_field_checkpoint, save_field

TINY = dict(grid_levels=4, grid_resolution=64, hidden_dim=16, hidden_dim_bg=8, grid_size=32)


def _df_pth(path, field, **top):
    ckpt = {"epoch": 5, "global_step": 500, "stats": {"loss": [0.5], "valid_loss": [0.0], "results": [0.0],
                                                       "checkpoints": [], "best_result": None},
            "mean_count": 123, "mean_density": 2.5, "model": OrderedDict(field.state_dict()), **top}
    torch.save(ckpt, path)
    return path


@pytest.fixture
def tiny_field():
    torch.manual_seed(0)
    field = build_field(FieldConfig(**TINY))
    with torch.no_grad():
        field.encoder.embeddings.uniform_(-0.5, 0.5)
        field.density_grid.uniform_(0, 20)
        field.density_bitfield.random_(0, 256)
    return field


def test_df_pth_roundtrip_forces_level_mask_and_keeps_state(tmp_path, tiny_field):
    path = _df_pth(tmp_path / "df.pth", tiny_field)
    field = load_field(path)
    assert field.grid_levels_mask == 0 and not field.training
    assert field.mean_density == 2.5 and field.mean_count == 123
    assert field.config.grid_levels == 4 and field.config.grid_resolution == 64 and field.config.hidden_dim == 16
    assert field.config.grid_size == 32
    for key, value in tiny_field.state_dict().items():
        assert torch.equal(field.state_dict()[key], value), key
    x = torch.rand(20, 3) - 0.5
    tiny_field.grid_levels_mask = 0
    with torch.no_grad():
        assert torch.equal(field.common_forward(x)[0], tiny_field.common_forward(x)[0])


def test_safetensors_roundtrip(tmp_path, tiny_field):
    tiny_field.mean_density, tiny_field.mean_count = 1.25, 77
    save_field(tmp_path / "f.safetensors", tiny_field)
    assert (tmp_path / "f.json").is_file()
    field = load_field(tmp_path / "f.safetensors")
    assert field.mean_density == 1.25 and field.mean_count == 77 and field.grid_levels_mask == 0
    for key, value in tiny_field.state_dict().items():
        assert torch.equal(field.state_dict()[key], value), key


def test_convert_registry_and_cli(tmp_path, tiny_field, capsys):
    from nvs_core.__main__ import main

    src = _df_pth(tmp_path / "df.pth", tiny_field)
    state, config = convert(src, "realfusion", tmp_path / "a.safetensors")
    assert config["method"] == "realfusion" and config["meta"]["mean_count"] == 123
    assert config["meta"]["global_step"] == 500
    assert main(["convert", str(src), "--method", "realfusion", "--out", str(tmp_path / "b.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = load_field(tmp_path / "a.safetensors"), load_field(tmp_path / "b.safetensors")
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value)


def test_other_models_are_refused_with_the_key(tmp_path, tiny_field):
    sd = OrderedDict(tiny_field.state_dict())
    # A stable-dreamfusion tcnn-style or other NeRF model: no tiled-grid encoder.
    other = OrderedDict((k.replace("encoder.embeddings", "encoder.params"), v) for k, v in sd.items())
    torch.save({"model": other, "mean_density": 1.0}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="missing key 'encoder.embeddings'"):
        load_field(tmp_path / "other.pth")
    # A density/colour net with another output width.
    wide = OrderedDict(sd)
    wide["sigma_net.net.2.weight"] = torch.zeros(7, 16)
    wide["sigma_net.net.2.bias"] = torch.zeros(7)
    torch.save({"model": wide}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="expected 4 outputs"):
        load_field(tmp_path / "wide.pth")
    # An extra key (strict load).
    extra = OrderedDict(sd)
    extra["sigma_net.net.3.weight"] = torch.zeros(4, 4)
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="other.pth|extra.pth"):
        load_field(tmp_path / "extra.pth")
    # Not a checkpoint dict at all.
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a RealFusion checkpoint"):
        load_field(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_field(tmp_path / "junk.pth")


def test_pickled_code_is_refused(tmp_path, tiny_field):
    torch.save({"model": tiny_field}, tmp_path / "module.pth")  # pickles classes: never unpickled
    with pytest.raises(CheckpointError, match="refuses global"):
        read_field_checkpoint(tmp_path / "module.pth")


def test_converted_file_of_another_method_is_refused(tmp_path):
    from nvs_core.checkpoints import save_with_config

    save_with_config(tmp_path / "v.safetensors", {"w": torch.zeros(2)}, {"method": "vivid"})
    with pytest.raises(CheckpointError, match="expected a converted RealFusion field"):
        load_field(tmp_path / "v.safetensors")
