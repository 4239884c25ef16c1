"""CLIP text encoding with injected word vectors and the bypass, on a tiny random CLIPTextModel."""
import pytest
import torch

from nvs_core.viewneti.mapper import MapperOutput
from nvs_core.viewneti.text import PlaceholderVectors, encode_text_with_mapper_outputs

transformers = pytest.importorskip("transformers")
VIEW, OBJECT = 62, 65


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=66, hidden_size=32, intermediate_size=64, projection_dim=32,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                         hidden_act="gelu", pad_token_id=0, bos_token_id=60, eos_token_id=61)
    return transformers.CLIPTextModel(config).train(False)


def _prompts():
    ids = torch.zeros(2, 16, dtype=torch.long)
    ids[:, :9] = torch.tensor([60, VIEW, 5, 7, 9, 11, 7, OBJECT, 61])
    return ids


def test_without_placeholders_it_is_the_plain_encoder(clip):
    ids = _prompts()
    with torch.no_grad():
        enc = encode_text_with_mapper_outputs(clip, ids)
        plain = clip(input_ids=ids).last_hidden_state
    assert torch.allclose(enc.keys, plain, atol=1e-6) and torch.equal(enc.keys, enc.values)


def test_word_vectors_replace_token_embeddings(clip):
    ids = _prompts()
    word = torch.randn(32)
    with torch.no_grad():
        enc = encode_text_with_mapper_outputs(clip, ids, object_vectors=PlaceholderVectors(OBJECT, word))
        table = clip.get_input_embeddings().weight
        saved = table[OBJECT].clone()
        table[OBJECT] = word  # the same thing done the stock way: overwrite the embedding row
        try:
            stock = clip(input_ids=ids).last_hidden_state
        finally:
            table[OBJECT] = saved
    assert torch.allclose(enc.keys, stock, atol=1e-6)


def test_bypass_changes_only_placeholder_rows_of_the_values(clip):
    ids = _prompts()
    torch.manual_seed(1)
    view = PlaceholderVectors([VIEW, VIEW], torch.randn(2, 32), torch.randn(2, 32), alpha=5.0)
    obj = PlaceholderVectors(OBJECT, torch.randn(32), torch.randn(32), alpha=5.0)
    with torch.no_grad():
        enc = encode_text_with_mapper_outputs(clip, ids, view_vectors=view, object_vectors=obj)
    changed = (enc.hidden_bypass != enc.hidden).any(-1)
    assert changed[:, 1].all() and changed[:, 7].all() and changed.sum() == 4
    h, b = enc.hidden[0, 7], obj.bypass
    assert torch.allclose(enc.hidden_bypass[0, 7], h + 5.0 * b / b.norm() * h.norm(), atol=1e-5)
    unconstrained = PlaceholderVectors(OBJECT, obj.word, obj.bypass, bypass_unconstrained=True)
    with torch.no_grad():
        alone = encode_text_with_mapper_outputs(clip, ids, object_vectors=unconstrained)
    assert torch.allclose(alone.hidden_bypass[0, 7].norm(), alone.hidden[0].norm(dim=-1).mean(), atol=1e-5)


def test_gradients_reach_the_mapper_outputs(clip):
    word = torch.randn(1, 32, requires_grad=True)
    bypass = torch.randn(1, 32, requires_grad=True)
    vectors = PlaceholderVectors.from_mapper_output(OBJECT, MapperOutput(word, bypass, 5.0))
    enc = encode_text_with_mapper_outputs(clip, _prompts(), object_vectors=vectors)
    (enc.keys.sum() + enc.values.sum()).backward()
    assert word.grad is not None and bypass.grad is not None and bypass.grad.abs().sum() > 0


def test_placeholder_must_occur_once_per_row(clip):
    ids = _prompts()
    ids[1, 3] = OBJECT
    with pytest.raises(ValueError, match="prompt row 1 contains its placeholder token 2 times"):
        encode_text_with_mapper_outputs(clip, ids, object_vectors=PlaceholderVectors(OBJECT, torch.randn(32)))
    with pytest.raises(ValueError, match="3 token ids for 2 prompt rows"):
        encode_text_with_mapper_outputs(clip, _prompts(), view_vectors=PlaceholderVectors([VIEW] * 3, torch.randn(32)))
    with pytest.raises(TypeError, match="CLIPTextModel"):
        encode_text_with_mapper_outputs(torch.nn.Linear(2, 2), _prompts())
