"""Loading GeNVS weights: published-format genvs.pt, duplicates, prefixes, bad files, converted format."""
import pytest
import torch

from nvs_core.checkpoints import CheckpointError, save_with_config
from nvs_core.convert import convert
from nvs_core.genvs.config import tiny_config
from nvs_core.genvs.loading import (collapse_duplicates, infer_config, load_genvs, load_genvs_checkpoint,
                                    read_genvs_pt)
from nvs_core.genvs.model import build_genvs

DUP = "ddpm_pipeline.model."


def _cfg():
    return tiny_config(image_size=32, render_size=8, decoder_channels=32, color_feat_dim=8, mapping_out=32,
                       channels=(16, 32))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_genvs(_cfg())


def _published_dict(model, prefix=""):
    """The model dict as the training script saves it: the denoiser twice, sharing storage."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[prefix + k] = v
    for k, v in model.state_dict().items():
        if k.startswith("ddpm_pipeline."):
            sd[prefix + DUP + k[len("ddpm_pipeline."):]] = v
    return sd


def test_published_format_round_trip(model, tmp_path):
    path = tmp_path / "genvs.pt"
    torch.save({"optim": {"state": {}, "param_groups": []}, "model": _published_dict(model), "step": 5, "epoch": 1},
               path)
    ckpt = read_genvs_pt(path)
    assert ckpt.extras["step"] == 5 and ckpt.extras["epoch"] == 1
    assert list(ckpt.state_dict) == list(model.state_dict())
    assert ckpt.config.to_dict()["nerf"] == _cfg().to_dict()["nerf"]
    loaded = ckpt.build()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not loaded.training


def test_module_prefix_and_bare_dict(model, tmp_path):
    path = tmp_path / "ddp.pt"
    torch.save(_published_dict(model, "module."), path)
    ckpt = read_genvs_pt(path)
    assert set(ckpt.state_dict) == set(model.state_dict())


def test_duplicate_copies_that_differ_are_refused(model, tmp_path):
    sd = {k: v.clone() for k, v in _published_dict(model).items()}
    key = DUP + "inner_model.inner_model.proj_in.weight"
    sd[key] += 1
    with pytest.raises(CheckpointError, match="duplicated denoiser copies differ"):
        collapse_duplicates(sd, "x.pt")
    path = tmp_path / "bad.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*differ"):
        load_genvs(path)


def test_not_a_genvs_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"unet.conv.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="expected a GeNVS checkpoint|not a GeNVS checkpoint"):
        load_genvs(path)
    path2 = tmp_path / "vivid_like.pt"
    torch.save({"model": {"unet.enc.conv.weight": torch.zeros(2, 2)}}, path2)
    with pytest.raises(CheckpointError, match="not a GeNVS checkpoint"):
        load_genvs(path2)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="expected genvs.pt"):
        load_genvs(text)


def test_nan_weights_are_refused(model, tmp_path):
    sd = _published_dict(model)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["nerf.sigma_color_net.net.1.bias"][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="NaN"):
        load_genvs(path)


def test_converted_format_and_wrong_method(model, tmp_path):
    src = tmp_path / "genvs.pt"
    torch.save({"model": _published_dict(model)}, src)
    out = tmp_path / "genvs.safetensors"
    sd, cfg = convert(src, "genvs", out)
    assert cfg["method"] == "genvs" and cfg["constructor"]["decoder"]["channels"] == 32
    back = load_genvs(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert load_genvs_checkpoint(out, noise="high").config.denoiser.sigma_max == 80.0
    other = tmp_path / "other.safetensors"
    save_with_config(other, {"w": torch.zeros(1)}, {"method": "vivid", "constructor": {"a": 1}})
    with pytest.raises(CheckpointError, match="expected a converted GeNVS checkpoint"):
        load_genvs(other)
    from safetensors.torch import save_file

    plain = tmp_path / "sd_unet.safetensors"          # e.g. a Stable Diffusion file in the GeNVS folder
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match=r"sd_unet\.safetensors: expected a converted GeNVS checkpoint"):
        load_genvs(plain)


def test_infer_config_matches_the_built_model(model):
    cfg = infer_config(model.state_dict())
    want = _cfg().to_dict()
    got = cfg.to_dict()
    for section in ("encoder", "nerf"):
        assert got[section] == want[section]
    assert got["decoder"]["channels"] == want["decoder"]["channels"]
    for key in ("depths", "channels", "self_attn_depths", "mapping_out", "mapping_cond_dim", "unet_cond_dim"):
        assert got["denoiser"][key] == want["denoiser"][key]
