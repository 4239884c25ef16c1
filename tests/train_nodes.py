"""What the VIVID and GeNVS Train node tests share: the output folders, running a node as ComfyUI
does, the bad inputs both reject and the resume checks."""
import pytest
import torch

# Bad inputs every train node rejects with these messages (each test adds its own extras).
COMMON_BAD_INPUTS = [
    (dict(output_name="../evil"), "output_name: '../evil' is not a plain file name"),
    (dict(output_name=""), "output_name"),
    (dict(data_source="multiview"), "multiview: data_source 'multiview' needs an NVS_MULTIVIEW"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(learning_rate=0.0), "learning_rate must be a finite number > 0"),
    (dict(network="huge"), "network must be one of"),
    (dict(data_source="video"), "data_source must be one of"),
]


def use_train_dirs(tmp_path, monkeypatch):
    """Models and outputs under ``tmp_path``."""
    monkeypatch.setenv("NVS_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("NVS_OUTPUT_DIR", str(tmp_path / "output"))
    return tmp_path


def run_train_node(node_class, defaults, **kwargs):
    """Run ``node_class().train`` under inference mode (as ComfyUI runs every node); returns its result."""
    args = dict(defaults, **kwargs)
    with torch.inference_mode():
        out = node_class().train(**args)
    assert out["ui"]["text"] == [out["result"][1]]
    return out["result"]


def check_resume_rules(train, learning_rate):
    """After a 2-step run: 3 steps resume it, a new learning rate needs resume off."""
    _, resumed = train(steps=3)
    assert "step 3/3 (1 this run" in resumed
    with pytest.raises(ValueError, match="resume: .*different recipe"):
        train(steps=4, learning_rate=learning_rate)
    _, fresh = train(steps=1, learning_rate=learning_rate, resume=False)
    assert "step 1/1 (1 this run" in fresh
