"""Single-image textual inversion (RealFusion's first stage) through the SD backend with tiny models:
augmentations, captions, the [0,1]/[-1,1] switch, training (only the vector changes, scaled lr, NaN
skipping, interrupt), embedding files (the 15 published learned_embeds.bin, ComfyUI safetensors), autoinit."""
import json

import pytest
import torch

from nvs_core import textual_inversion as ti
from nvs_core.checkpoints import CheckpointError
from nvs_core.progress import Interrupted, Progress
from nvs_core.sd.tiny import TinyTokenizer, tiny_backend_with_tokenizer

from paths import GOLDEN_DIR, SHARED

SAMPLES = SHARED / "samples" / "realfusion"


def _photo(size=40):
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    inside = ((x ** 2 + y ** 2) < 0.4).float()
    image = torch.stack([0.2 + 0.6 * inside, 0.3 + 0.2 * x.clamp(0, 1), 0.5 - 0.3 * inside], -1)
    return image, inside


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(0)
    return tiny_backend_with_tokenizer(0)


def _config(**overrides):
    base = dict(placeholder_token="_thing_", initializer_token="cat", steps=3, resolution=32, seed=3,
                gradient_accumulation=2, save_every=2)
    return ti.TextualInversionConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------- embedding files

def test_published_learned_embeds_load_weights_only():
    cases = json.loads((GOLDEN_DIR / "realfusion" / "cases.json").read_text())["learned_embeds_samples"]["files"]
    assert len(cases) == 15
    for case in cases:
        path = SHARED.parent / case["file"]
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert list(raw) == [case["token"]]
        token, vector = ti.read_embedding(path, expected_width=768)
        assert token == case["token"] and vector.shape == (768,) and vector.dtype == torch.float32
        assert float(vector.norm()) == pytest.approx(case["l2_norm"], rel=1e-6)


def test_wrong_width_is_refused():
    path = SAMPLES / "banana_1" / "learned_embeds.bin"
    with pytest.raises(CheckpointError, match="width 768.*expects 1024"):
        ti.read_embedding(path, expected_width=1024)


def test_comfy_embedding_round_trip(tmp_path):
    from safetensors.torch import load_file

    vector = torch.randn(32)
    path = ti.save_comfy_embedding(tmp_path / "thing.safetensors", "_thing_", vector, {"steps": 3})
    tensors = load_file(str(path))
    # what core ComfyUI's load_embed takes for SD 1.x: the only tensor, one vector per prompt slot
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (1, 32)
    token, back = ti.read_embedding(path, expected_width=32)
    assert token == "_thing_" and torch.equal(back, vector)
    bin_path = ti.save_learned_embeds_bin(tmp_path / "learned_embeds.bin", "_thing_", vector)
    raw = torch.load(bin_path, weights_only=True)
    assert list(raw) == ["_thing_"] and torch.equal(raw["_thing_"], vector)


# ------------------------------------------------------------------------------- data

def test_augmentation_shapes_ranges_and_seed():
    image, _ = _photo(50)
    chw = image.permute(2, 0, 1)
    augment = ti.SingleImageAugment(32)
    a = augment(chw, torch.Generator().manual_seed(1))
    b = augment(chw, torch.Generator().manual_seed(1))
    c = augment(chw, torch.Generator().manual_seed(2))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    published = ti.training_pixels(chw, _config(), torch.Generator().manual_seed(1), augment)
    fixed = ti.training_pixels(chw, _config(pixel_range="fixed"), torch.Generator().manual_seed(1), augment)
    torch.testing.assert_close(fixed, published * 2 - 1)  # the quirk is exactly the missing rescale
    plain = ti.training_pixels(chw, _config(augmentations=False), torch.Generator().manual_seed(1))
    assert plain.shape == (3, 32, 32) and plain.min() < -0.5  # non-augmented path is in [-1, 1]


def test_rotation_fills_white():
    black = torch.zeros(3, 64, 64)
    augment = ti.SingleImageAugment(64)
    for seed in range(20):  # some draw rotates without cropping the corners away entirely: none stays black
        out = augment(black, torch.Generator().manual_seed(seed))
        assert out.max() <= 1
    gen = torch.Generator().manual_seed(0)
    boxes = [ti.resized_crop_box(80, 80, gen) for _ in range(200)]
    for top, left, h, w in boxes:
        assert 0 <= top and 0 <= left and top + h <= 80 and left + w <= 80
    areas = torch.tensor([h * w / 6400 for _, _, h, w in boxes])
    assert areas.min() > 0.8 * 0.85 and areas.max() <= 1.0


def test_white_background_and_bad_masks():
    image, mask = _photo()
    out = ti.prepare_image(image, mask, "white")
    assert torch.allclose(out[:, 0, 0], torch.ones(3)) and out.shape == (3, 40, 40)
    assert torch.equal(ti.prepare_image(image), image.permute(2, 0, 1))
    with pytest.raises(ValueError, match="needs a mask"):
        ti.prepare_image(image, None, "white")
    with pytest.raises(ValueError, match="covers nothing"):
        ti.prepare_image(image, torch.zeros(40, 40), "white")
    with pytest.raises(ValueError, match="whole image"):
        ti.prepare_image(image, torch.ones(40, 40), "white")


def test_captions_mark_the_placeholder_slot(backend):
    assert len(ti.IMAGENET_TEMPLATES_SMALL) == 27 and all(t.endswith("{}") for t in ti.IMAGENET_TEMPLATES_SMALL)
    word_id, end_id = ti.single_token_id(backend, "cat")
    templates = ["a photo of the {}", "a cat photo of the {}"]  # the second repeats the word (as "small" would)
    ids, marks = ti.caption_batch(backend, templates, "cat", word_id, end_id)
    assert marks[0] == word_id and marks[1] != word_id
    for row, mark in zip(ids, marks):
        assert int((row == mark).sum()) == 1
        assert int(row[(row == end_id).nonzero()[0] - 1]) == int(mark)


# ------------------------------------------------------------------------------- training

def test_training_updates_only_the_vector(backend, tmp_path):
    image, _ = _photo()
    table = backend.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = [p.detach().clone() for p in backend.unet_model.parameters()][:3]
    seen = []
    cfg = _config()
    result = ti.train_textual_inversion(backend, image, cfg, callback=seen.append, out_dir=tmp_path)
    assert result.step == 3 and [s["step"] for s in seen] == [1, 2, 3]
    assert result.effective_learning_rate == pytest.approx(5e-4 * 2) and seen[0]["lr"] == pytest.approx(1e-3)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    word_id, _ = ti.single_token_id(backend, "cat")
    assert result.initializer_id == word_id
    moved = (result.vector - table[word_id]).abs().max()
    assert 0 < moved < 3 * 1e-3 * 1.01  # Adam moves each coordinate by at most ~lr per step
    assert torch.equal(backend.text_encoder.get_input_embeddings().weight, table)
    assert all(torch.equal(a, b) for a, b in zip(unet_before, backend.unet_model.parameters()))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "learned_embeds-steps-2.bin", "learned_embeds.bin"]
    token, vector = ti.read_embedding(tmp_path / "learned_embeds.bin")
    assert token == "_thing_" and torch.equal(vector, result.vector)
    # same seed, same result
    again = ti.train_textual_inversion(backend, image, cfg)
    torch.testing.assert_close(again.vector, result.vector)


def test_gradient_flows_to_the_vector(backend):
    word_id, end_id = ti.single_token_id(backend, "cat")
    ids, marks = ti.caption_batch(backend, ["a photo of a {}"], "cat", word_id, end_id)
    vector = torch.nn.Parameter(backend.text_encoder.get_input_embeddings().weight[word_id].clone())
    context = ti.encode_with_vector(backend, ids, marks, vector)
    latents = torch.randn(1, 4, 16, 16)
    out = backend.unet(latents, torch.tensor([500.0]), context)
    out.square().mean().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    base = backend.encode_text(ids).keys
    torch.testing.assert_close(context.detach(), base)  # the initial vector reproduces the word itself


def test_nan_steps_are_skipped_and_counted(backend):
    class NaNBackend:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def unet(self, *args, **kwargs):
            return self.inner.unet(*args, **kwargs) * float("nan")

    image, _ = _photo()
    result = ti.train_textual_inversion(NaNBackend(backend), image, _config(steps=2))
    word_id, _ = ti.single_token_id(backend, "cat")
    assert result.skipped_steps == 2
    assert torch.equal(result.vector, backend.text_encoder.get_input_embeddings().weight[word_id].detach())


def test_interrupt_keeps_the_vector_so_far(backend, tmp_path):
    image, _ = _photo()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Interrupted):
        ti.train_textual_inversion(backend, image, _config(steps=10, save_every=0),
                                   progress=lambda total, desc="": Progress(total, desc, should_stop=stop),
                                   out_dir=tmp_path)
    token, _ = ti.read_embedding(tmp_path / "learned_embeds-interrupted.bin")
    assert token == "_thing_"


def test_bad_settings():
    with pytest.raises(ValueError, match="pixel_range"):
        _config(pixel_range="other")
    with pytest.raises(ValueError, match="single word"):
        _config(initializer_token="two words")
    with pytest.raises(ValueError, match="learning_rate"):
        _config(learning_rate=0.0)


def test_initializer_must_be_one_token(backend):
    class Splitting(TinyTokenizer):
        def __call__(self, prompts, **kwargs):
            prompts = [p.replace("teapot", "tea pot") for p in ([prompts] if isinstance(prompts, str) else prompts)]
            return super().__call__(prompts, **kwargs)

    original = backend.tokenizer
    backend.tokenizer = Splitting()
    try:
        with pytest.raises(ValueError, match="single token"):
            ti.single_token_id(backend, "teapot")
    finally:
        backend.tokenizer = original


def test_autoinit_picks_the_closest_candidate():
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=60, eos_token_id=61,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=16)
    model = transformers.CLIPModel(config).train(False)
    image, _ = _photo()
    tokenizer = TinyTokenizer()
    candidates = ["cat", "teapot", "banana", "bird"]
    chosen = ti.choose_initializer(image.permute(2, 0, 1), model, tokenizer, candidates)
    assert chosen in candidates
    # the choice is the argmax of the similarity the model itself gives
    with torch.no_grad():
        ids = tokenizer([f"a photo of a {c}" for c in candidates]).input_ids
        text = ti._features(model.get_text_features(input_ids=ids), "text")
    assert text.shape == (4, 16)
    with pytest.raises(ValueError, match="at least one"):
        ti.choose_initializer(image.permute(2, 0, 1), model, tokenizer, [])
