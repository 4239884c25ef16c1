"""The GeNVS demo (reduced): files, metrics, the autoregressive orbit GIF, evaluation, the CLI dispatch, and
the committed demo model."""
import json
import math

import pytest
import torch
from PIL import Image

from nvs_core import __main__ as cli
from nvs_core.checkpoints import load_with_config
from nvs_core.genvs import demo
from nvs_core.genvs import training as T
from nvs_core.genvs.loading import load_genvs
from nvs_core.vivid.data import procedural_eval_set
from tests.test_genvs_training import tiny_network


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("genvs_demo")
    config = T.TrainConfig(network=tiny_network(), data={**T.DEMO_DATA, "samples_per_pixel": 1}, total_steps=1,
                           batch_size=1, out_dir=str(out), checkpoint_every=0)
    return T.train(config).ema_path


def test_demo_writes_grid_orbit_and_metrics(tmp_path, tiny_model_path, capsys):
    summary = demo.run(tmp_path, seed=3, views=2, steps=2, orbit_views=3, model_path=tiny_model_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("model", "copy_source", "render_rgb"):
        assert set(metrics[key]) == {"psnr", "ssim"} and all(math.isfinite(v) for v in metrics[key].values())
    assert metrics["scene_seed"] >= 1_000_000 and summary["views"] == 2 and metrics["orbit_views"] == 3
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[1] >= 3 * 8 * 4          # rows: input, generated, ground truth (x4 zoom)
    gif = Image.open(tmp_path / "orbit.gif")
    assert gif.n_frames == 3                           # the source + 2 autoregressive views
    printed = capsys.readouterr().out
    assert "copy_source" in printed and "render_rgb" in printed


def test_evaluate_on_the_shared_eval_set(tiny_model_path):
    model = load_genvs(tiny_model_path)
    evalset = procedural_eval_set(2, 8, views=2, samples_per_pixel=1)
    result = demo.evaluate(model, evalset, steps=2)
    assert result["views"].shape == (4, 8, 8, 3)
    assert result["difference"]["psnr"] == pytest.approx(result["model"]["psnr"] - result["copy_source"]["psnr"],
                                                         abs=1e-3)
    with pytest.raises(ValueError, match="px"):
        demo.evaluate(model, procedural_eval_set(1, 16, views=2, samples_per_pixel=1), steps=1)


def test_colour_use_tells_a_colour_blind_encoder(tiny_model_path):
    """Weights proportional to the ImageNet std on every path the raw image enters (the stem and the last
    up-block's skip) make the encoder see only brightness: cycling the colour channels leaves the volume."""
    from nvs_core.genvs.encoder import IMAGENET_STD

    evalset = procedural_eval_set(2, 8, views=2, samples_per_pixel=1)
    model = load_genvs(tiny_model_path)
    seeing = demo.colour_use(model, evalset)
    assert seeing["volume_change"] > 1e-3 and seeing["source_chroma"] > 0.01
    assert 0 <= seeing["render_chroma"] <= 1
    std = torch.tensor(IMAGENET_STD)
    with torch.no_grad():
        stem = model.input_unet.encoder.conv1.weight
        stem.copy_(stem[:, :1] * std[None, :, None, None])
        last = model.input_unet.decoder.up_block3.conv.weight
        last[:, -3:] = last[:, -3:-2] * std[None, :, None, None]
    blind = demo.colour_use(model, evalset)
    assert blind["volume_change"] < 1e-5 and blind["plane_chroma_r2"] < 0.5
    # a volume that is a per-pixel linear map of the (normalised) RGB: every plane predicts the chroma
    with torch.no_grad():
        last.zero_()
        model.input_unet.decoder.up_block3.conv.bias.zero_()
        last[:, -3:, 1, 1] = torch.randn(last.shape[0], 3, generator=torch.Generator().manual_seed(0))
    linear = demo.colour_use(model, evalset)
    assert linear["plane_chroma_r2"] > 0.99 and linear["volume_change"] > 0.1


def test_cli_dispatch(tmp_path, tiny_model_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run", lambda out, seed: calls.append((out, seed)))
    assert cli.main(["demo", "--method", "genvs", "--out", str(tmp_path), "--seed", "5"]) == 0
    assert calls == [(str(tmp_path), 5)]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--method", "nerf", "--out", str(tmp_path)])


def test_export_halves_large_tensors(tmp_path, tiny_model_path):
    target = demo.export_demo_model(tiny_model_path, tmp_path / "demo.safetensors", min_half=64)
    tensors, config = load_with_config(target)
    original, original_config = load_with_config(tiny_model_path)
    assert {t.dtype for k, t in tensors.items() if original[k].numel() > 64} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if original[k].numel() <= 64} <= {torch.float32}
    assert config["meta"]["reproduce"] == original_config["meta"]["reproduce"]
    assert "export_demo_model(" in config["meta"]["export"] and config["meta"]["scene_scale"] == 1.0
    model = load_genvs(target)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="expected a GeNVS network file"):
        vivid_like = tmp_path / "v.safetensors"
        from nvs_core.checkpoints import save_with_config
        save_with_config(vivid_like, {"w": torch.zeros(2)}, {"method": "vivid", "constructor": {}})
        demo.export_demo_model(vivid_like, tmp_path / "x.safetensors")


def test_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo GeNVS model not found"):
        demo.load_demo_model(tmp_path / "absent.safetensors")


def test_committed_demo_model():
    path = demo.DEMO_MODEL_PATH
    assert path.is_file() and path.stat().st_size <= 20 * 2 ** 20
    _, config = load_with_config(path)
    meta = config["meta"]
    assert config["method"] == "genvs" and config["constructor"] == T.DEMO_NETWORK
    assert meta["reproduce"].startswith("python -m nvs_core genvs-train ") and "--preset demo-recipe" in meta["reproduce"]
    assert meta["step"] == meta["training"]["total_steps"] == T.DEMO_RECIPE["total_steps"]
    model = demo.load_demo_model()
    assert model.config.diffusion_size == 32 and all(torch.isfinite(p).all() for p in model.parameters())
