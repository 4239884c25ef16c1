"""NVS Textual Inversion Train node with the tiny diffusers backend in place of ComfyUI's objects
(``make_backend`` replaced): files it writes, returned prompt strings, masks, inference mode, bad inputs."""
import importlib

import pytest
import torch

from tests.conftest import load_pack
from tests.paths import SHARED

pytest.importorskip("diffusers")
pytest.importorskip("kornia")

pack = load_pack()
ti = importlib.import_module(f"{pack.__name__}.nvs_core.textual_inversion")
tiny = importlib.import_module(f"{pack.__name__}.nvs_core.sd.tiny")
Train = pack.NODE_CLASS_MAPPINGS["NVSTextualInversionTrain"]


@pytest.fixture(scope="module")
def backend():
    return tiny.tiny_backend_with_tokenizer(0)


@pytest.fixture
def node(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("NVS_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("NVS_EMBEDDINGS_DIR", str(tmp_path / "embeddings"))
    made = []

    def make_backend(model, clip, vae):
        assert (model, clip, vae) == ("MODEL", "CLIP", "VAE")
        made.append(backend)  # training never changes the backend's weights (tested in test_textual_inversion)
        return made[-1]

    monkeypatch.setattr(Train, "make_backend", staticmethod(make_backend))
    instance = Train()
    instance.made = made
    return instance


def _photo():
    from PIL import Image
    import numpy as np

    folder = SHARED / "samples" / "realfusion" / "cat_statue"
    image = Image.open(folder / "image.png").convert("RGB").resize((64, 64))
    mask = Image.open(folder / "mask.png").convert("L").resize((64, 64))
    return (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None],
            torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None])


def run(node, **kwargs):
    image, _ = _photo()
    args = dict(image=image, model="MODEL", clip="CLIP", vae="VAE", initializer_word="cat", steps=2,
                learning_rate=0.0005, seed=0, embedding_name="cat_statue_test", gradient_accumulation=1,
                resolution=64)
    with torch.inference_mode():  # as ComfyUI runs every node
        out = node.train(**(args | kwargs))
    return out


def test_node_trains_and_saves_a_comfy_embedding(node, tmp_path):
    out = run(node)
    embedding, prompt, summary = out["result"]
    assert embedding == "embedding:cat_statue_test"
    assert prompt == "A high-resolution DSLR image of a embedding:cat_statue_test"
    assert out["ui"]["text"] == [summary] and "2/2 steps" in summary
    path = tmp_path / "embeddings" / "cat_statue_test.safetensors"
    token, vector = ti.read_embedding(path, expected_width=32)
    assert token == "_cat_statue_test_" and not vector.requires_grad
    run_dir = tmp_path / "output" / "nvs_textual_inversion" / "cat_statue_test"
    bin_token, bin_vector = ti.read_embedding(run_dir / "learned_embeds.bin")
    assert bin_token == token and torch.equal(bin_vector, vector)
    # the same seed gives the same vector; another seed another one
    run(node, embedding_name="again")
    assert torch.equal(ti.read_embedding(tmp_path / "embeddings" / "again.safetensors")[1], vector)
    run(node, embedding_name="other", seed=1)
    assert not torch.equal(ti.read_embedding(tmp_path / "embeddings" / "other.safetensors")[1], vector)


def test_white_background_takes_either_mask_polarity(node, tmp_path):
    image, mask = _photo()
    a = run(node, mask=mask, background="white", embedding_name="white_a", placeholder_token="<cat>")
    b = run(node, mask=1 - mask, background="white", embedding_name="white_b", placeholder_token="<cat>")
    va = ti.read_embedding(tmp_path / "embeddings" / "white_a.safetensors")
    vb = ti.read_embedding(tmp_path / "embeddings" / "white_b.safetensors")
    assert va[0] == "<cat>"
    torch.testing.assert_close(va[1], vb[1], rtol=0, atol=1e-5)  # 1 - (1 - m) differs from m by rounding only
    assert "embedding:white_a" == a["result"][0] and b["result"][0] == "embedding:white_b"


@pytest.mark.parametrize("kwargs, message", [
    (dict(embedding_name="../escape"), "embedding_name"),
    (dict(embedding_name=""), "embedding_name"),
    (dict(initializer_word="two words"), "single word"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(background="white"), "needs a mask"),
    (dict(image=torch.zeros(1, 64, 64, 2)), "channels"),
    (dict(mask=torch.zeros(1, 32, 32), background="white"), "64x64"),
])
def test_bad_inputs(node, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(node, **kwargs)
