"""The demo: the committed VIVID demo model on a held-out procedural object (few sampler steps here)."""
import json
import math

import pytest
from PIL import Image

from nvs_core import demo
from nvs_core.checkpoints import load_with_config
from nvs_core.vivid.data import EVAL_SEEDS, TRAIN_SEEDS
from nvs_core.vivid.demo_model import DEMO_MODEL_PATH, load_demo_model




def test_demo_writes_grid_orbit_and_metrics(tmp_path, capsys):
    summary = demo.run(tmp_path, seed=3, views=4, num_steps=3)
    for name in ("grid.png", "orbit.gif", "metrics.json", "cameras.png", "cameras.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for method in ("model", "copy_source"):
        assert set(metrics[method]) == {"psnr", "ssim"}
        assert all(math.isfinite(v) for v in metrics[method].values())
        assert metrics[method] == summary[method]
    assert metrics["scene_seed"] == EVAL_SEEDS[3] and metrics["scene_seed"] not in TRAIN_SEEDS
    assert metrics["views"] == 4 and metrics["num_steps"] == 3
    size = metrics["size"] * 4 + 2  # 4x enlarged views with 2-px gaps
    assert Image.open(tmp_path / "grid.png").size == (4 * size + 2, 3 * size + 2)
    with Image.open(tmp_path / "orbit.gif") as gif:
        assert gif.n_frames == 5  # the input plus 4 novel views
    out = capsys.readouterr().out
    assert "copy_source" in out and "model" in out


def test_demo_seeds_are_held_out():
    assert demo.held_out_seed(3) == EVAL_SEEDS[3]
    assert demo.held_out_seed(EVAL_SEEDS[7]) == EVAL_SEEDS[7]


def test_committed_demo_model_is_small_and_reproducible():
    assert DEMO_MODEL_PATH.stat().st_size <= 20 * 1024 * 1024
    _, config = load_with_config(DEMO_MODEL_PATH)
    assert config["method"] == "vivid" and config["constructor"]["img_resolution"] == 32
    assert "nvs_core.vivid.training" in config["meta"]["reproduce"]
    net, translation_scale = load_demo_model()
    assert not net.training and translation_scale == config["meta"]["training"]["translation_scale"]


def test_committed_demo_model_is_the_demo_recipe():
    """The file's meta records exactly training.demo_recipe: its command, settings and step count."""
    from nvs_core.vivid import training as vt

    config = load_with_config(DEMO_MODEL_PATH)[1]
    meta = config["meta"]
    assert meta["reproduce"] == vt.demo_command()
    recipe = vt.demo_recipe()
    trained = meta["training"]
    for key in vt.RECIPE_FIELDS + ("total_steps", "translation_scale"):
        assert trained[key] == recipe.to_dict()[key], key
    assert meta["step"] == recipe.total_steps and meta["init_from"] is None
    # The network is the demo network plus the label statistics fitted to the recipe's pairs.
    assert {k: v for k, v in config["constructor"].items() if k != "label_standardization"} == vt.DEMO_NETWORK
    assert config["constructor"]["label_standardization"] == trained["network"]["label_standardization"]


def test_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo VIVID model"):
        load_demo_model(tmp_path / "absent.safetensors")


def test_conditioning_use_tells_an_ignored_input_from_a_used_one():
    import torch

    from nvs_core.vivid import training as vt
    from nvs_core.vivid.data import procedural_eval_set
    from nvs_core.vivid.demo_model import conditioning_use

    tiny = dict(img_resolution=8, img_channels=3, label_dim=20, use_fp16=False, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], channels_per_head=8, extra_attn=None)
    pairs = procedural_eval_set(3, 8, views=4, samples_per_pixel=1).pairs
    net = vt.build_network(tiny, 0).train(False)
    # EDM2 blocks start with zero embedding and residual gains: a fresh net ignores both inputs.
    fresh = conditioning_use(net, pairs, sigmas=(1.0, 5.0), count=12)
    assert set(fresh) == {"sigma_1", "sigma_5"}
    assert all(row["right"] == row["other_source"] == row["other_label"] for row in fresh.values())
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
    used = conditioning_use(net, pairs, sigmas=(5.0,), count=12)["sigma_5"]
    assert used["other_source"] != used["right"] and used["other_label"] != used["right"]


def test_conditioning_use_swaps_labels_within_an_object():
    """Evaluation sets give every object the same target offsets, so the swapped label must come from
    another target of the same source, and the swapped source from another object."""
    import torch

    from nvs_core.vivid.data import procedural_eval_set
    from nvs_core.vivid.demo_model import conditioning_use

    pairs = procedural_eval_set(3, 8, views=4, samples_per_pixel=1).pairs
    calls = []

    def recorder(src, x, sigma, geometry):
        calls.append((src, geometry))
        return x

    conditioning_use(recorder, pairs, sigmas=(1.0,), count=12)
    (src, geo), (other_src, same_geo), (same_src, other_geo) = calls
    assert torch.equal(src, pairs.src) and torch.equal(geo, pairs.geometry)
    assert torch.equal(same_geo, geo) and torch.equal(other_src, pairs.src[torch.arange(12).roll(4)])
    assert torch.equal(same_src, src)
    assert torch.equal(other_geo, pairs.geometry[torch.tensor([2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9])])
