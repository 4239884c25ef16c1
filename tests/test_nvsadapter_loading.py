"""NVS-Adapter checkpoint loading: adapter tensors only, EMA by default, safe loading, converter, clear errors."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from nvs_core.__main__ import main as cli
from nvs_core.checkpoints import CheckpointError, load_torch_weights, numpy_scalar_safe_globals
from nvs_core.nvsadapter.config import TINY_SD
from nvs_core.nvsadapter.loading import PREFIX, ema_key, extract_adapter, infer_config, load_nvs_adapter
from nvs_core.nvsadapter.model import NVSAdapter
from nvs_core.sd import tiny


def _adapter(seed=0) -> NVSAdapter:
    return tiny.randomize_(NVSAdapter(TINY_SD), torch.Generator().manual_seed(seed), 0.2)


def _lightning_checkpoint(path, adapter: NVSAdapter, ema: NVSAdapter = None, numpy_lr: bool = False):
    """A Lightning-style engine checkpoint: interleaved frozen/adapter tensors, EMA buffers, decoys."""
    state = {}
    for key, value in adapter.state_dict().items():
        state[PREFIX + key] = value.clone()
        if key.endswith("support_emb"):  # a frozen neighbour under the same prefix
            state[PREFIX + key.replace("support_emb", "attn2.to_k.weight")] = torch.randn(value.shape[-1], 32)
    state["first_stage_model.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3)
    state["conditioner.conditioners.3.embedders.0.model.visual.proj"] = torch.randn(8, 8)
    state["denoiser.sigmas"] = torch.rand(1000)
    if ema is not None:
        for key, value in ema.state_dict().items():
            state[ema_key(PREFIX + key)] = value.clone()
        state["model_ema.decay"] = torch.tensor(0.9995)
        state["model_ema.num_updates"] = torch.tensor(200000, dtype=torch.int32)
    lr = np.float64(5e-5) if numpy_lr else 5e-5
    torch.save({"epoch": 3, "global_step": 200000, "pytorch-lightning_version": "2.0.1", "state_dict": state,
                "optimizer_states": [{"param_groups": [{"lr": lr, "params": [0, 1]}], "state": {}}],
                "lr_schedulers": [{"_last_lr": [lr]}]}, path)


def _equal(a: NVSAdapter, b: NVSAdapter) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_ema_by_default_raw_on_request(tmp_path):
    raw, ema = _adapter(0), _adapter(1)
    path = tmp_path / "base_query_4.ckpt"
    _lightning_checkpoint(path, raw, ema)
    loaded = load_nvs_adapter(path, num_head_channels=16)
    assert loaded.config == TINY_SD
    assert _equal(loaded, ema)
    assert _equal(load_nvs_adapter(path, use_ema=False, num_head_channels=16), raw)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_numpy_scalar_optimizer_states_load_weights_only(tmp_path):
    path = tmp_path / "full.ckpt"
    _lightning_checkpoint(path, _adapter(0), _adapter(1), numpy_lr=True)
    with pytest.raises(CheckpointError, match="refuses global numpy"):
        load_torch_weights(path)
    obj = load_torch_weights(path, numpy_scalar_safe_globals())
    assert isinstance(obj["optimizer_states"][0]["param_groups"][0]["lr"], np.float64)
    assert _equal(load_nvs_adapter(path, num_head_channels=16), _adapter(1))


def test_missing_ema_and_wrong_files_give_clear_errors(tmp_path):
    path = tmp_path / "no_ema.ckpt"
    _lightning_checkpoint(path, _adapter(0))
    with pytest.raises(CheckpointError, match="use_ema: no EMA copy"):
        load_nvs_adapter(path)
    assert _equal(load_nvs_adapter(path, use_ema=False, num_head_channels=16), _adapter(0))

    sd_file = tmp_path / "v2-1_512.ckpt"
    torch.save({"state_dict": {PREFIX + "input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}}, sd_file)
    with pytest.raises(CheckpointError, match="Stable Diffusion checkpoint without NVS-Adapter tensors"):
        load_nvs_adapter(sd_file)
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: found unknown"):
        load_nvs_adapter(junk)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "cb": torch.nn.Identity()}, evil)
    with pytest.raises(CheckpointError, match="refuses global"):
        load_nvs_adapter(evil)


def test_shape_mismatch_names_the_key(tmp_path):
    path = tmp_path / "bad.ckpt"
    adapter = _adapter(0)
    _lightning_checkpoint(path, adapter)
    state = torch.load(path, weights_only=True)
    key = PREFIX + "pe_blocks.1.weight"
    state["state_dict"][key] = torch.zeros(32, 144, 3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="pe_blocks.1"):
        load_nvs_adapter(path, use_ema=False, num_head_channels=16)
    with pytest.raises(CheckpointError, match="shape mismatch for 'pe_blocks.1.weight'"):
        load_nvs_adapter(path, use_ema=False, config=TINY_SD)


def test_converter_keeps_only_the_adapter(tmp_path, capsys):
    path = tmp_path / "base_query_4.ckpt"
    _lightning_checkpoint(path, _adapter(0), _adapter(1))
    out = tmp_path / "nvs_adapter.safetensors"
    assert cli(["convert", str(path), "--method", "nvsadapter", "--out", str(out)]) == 0
    assert f"{len(_adapter(0).state_dict())} tensors" in capsys.readouterr().out
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["method"] == "nvsadapter" and config["meta"]["weights"] == "ema"
    from safetensors.torch import load_file

    assert set(load_file(out)) == set(_adapter(0).state_dict())  # nothing but the adapter
    loaded = load_nvs_adapter(out)
    assert _equal(loaded, _adapter(1))
    # heads are not in the weights: 64-channel heads (SD 2.x) where the widths allow, else their gcd
    assert loaded.config == replace(TINY_SD, num_head_channels=32)
    config["method"] = "vivid"
    out.with_suffix(".json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="converted for method 'vivid'"):
        load_nvs_adapter(out)


def test_extract_and_infer_on_a_plain_state_dict():
    adapter = _adapter(0)
    engine = {PREFIX + k: v for k, v in adapter.state_dict().items()}
    got = extract_adapter(engine, use_ema=False)
    assert set(got) == set(adapter.state_dict())
    assert infer_config(got, num_head_channels=16, context_dim=32) == TINY_SD
    with pytest.raises(CheckpointError, match="no NVS-Adapter tensors"):
        extract_adapter({"foo": torch.zeros(1)})
