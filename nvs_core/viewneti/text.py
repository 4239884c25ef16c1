"""CLIP text encoding with mapper outputs injected, as ViewNeTI's text encoder does it.

For one (t, l) the mappers give each placeholder a word vector and a bypass vector. The encoding:
1. the token embedding at each placeholder position is *replaced* by its word vector (before the
   position embeddings are added);
2. all encoder layers run with only the causal mask, giving h (before the final LayerNorm);
3. at each placeholder position i (object first, then view): h_bp[i] = h[i] + alpha * b/|b| * |h[i]|;
4. keys context A = LN_final(h), values context B = LN_final(h_bp).

Works with any transformers ``CLIPTextModel`` (4.x with ``.text_model`` or 5.x flattened): we hook the
model's own token embedding and final LayerNorm instead of re-implementing its forward, so attention
implementation and mask handling stay the library's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .mapper import MapperOutput


@dataclass
class PlaceholderVectors:
    """What to inject for one placeholder token in every prompt row."""

    token_ids: Union[int, Sequence[int], torch.Tensor]  # its id, or one id per row (view tokens may differ)
    word: torch.Tensor                                  # (B, D) or (D,)
    bypass: Optional[torch.Tensor] = None               # (B, D) or (D,); None: no bypass
    alpha: float = 0.2
    bypass_unconstrained: bool = False                  # ViewNeTI's ablation: replace h[i] instead of adding

    @classmethod
    def from_mapper_output(cls, token_ids, output: MapperOutput) -> "PlaceholderVectors":
        return cls(token_ids, output.word, output.bypass, output.bypass_alpha, output.bypass_unconstrained)


@dataclass
class TextEncoding:
    keys: torch.Tensor           # A = LN_final(h): the context the UNet's to_k sees
    values: torch.Tensor         # B = LN_final(h_bp): the context its to_v sees
    hidden: torch.Tensor         # h, before the final LayerNorm
    hidden_bypass: torch.Tensor  # h_bp


def _text_transformer(text_encoder: nn.Module) -> nn.Module:
    inner = getattr(text_encoder, "text_model", text_encoder)
    embeddings = getattr(inner, "embeddings", None)
    if not isinstance(getattr(embeddings, "token_embedding", None), nn.Embedding) \
            or not isinstance(getattr(inner, "final_layer_norm", None), nn.LayerNorm):
        raise TypeError(f"expected a transformers CLIPTextModel, got {type(text_encoder).__name__}")
    return inner


def _positions(input_ids: torch.Tensor, token_ids, name: str) -> torch.Tensor:
    """Position of the placeholder in each row; exactly one per row."""
    ids = torch.as_tensor(token_ids, device=input_ids.device).reshape(-1)
    if ids.numel() not in (1, input_ids.shape[0]):
        raise ValueError(f"{name}: {ids.numel()} token ids for {input_ids.shape[0]} prompt rows")
    hits = input_ids == ids.expand(input_ids.shape[0])[:, None]
    counts = hits.sum(1)
    if not torch.all(counts == 1):
        row = int((counts != 1).nonzero()[0])
        raise ValueError(f"{name}: prompt row {row} contains its placeholder token {counts[row].item()} times, "
                         "expected exactly once")
    return hits.int().argmax(1)


def _per_row(vectors: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.shape[0] not in (1, rows):
        raise ValueError(f"{name}: {vectors.shape[0]} vectors for {rows} prompt rows")
    return vectors.expand(rows, -1)


def encode_text_with_mapper_outputs(text_encoder: nn.Module, input_ids: torch.Tensor,
                                    view_vectors: Optional[PlaceholderVectors] = None,
                                    object_vectors: Optional[PlaceholderVectors] = None) -> TextEncoding:
    """Encode ``input_ids`` (B, 77) with the placeholders' word vectors and bypasses (see module doc).

    Vectors are cast to the text encoder's dtype, as upstream does for its fp16 encoder.
    """
    transformer = _text_transformer(text_encoder)
    input_ids = input_ids.reshape(-1, input_ids.shape[-1])
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    injections = []  # (name, positions, vectors): object first, the order of the bypass updates
    for name, vectors in (("object", object_vectors), ("view", view_vectors)):
        if vectors is not None:
            injections.append((name, _positions(input_ids, vectors.token_ids, name), vectors))

    def replace_words(module, inputs, embeds):
        embeds = embeds.clone()
        for name, positions, vectors in injections:
            embeds[rows, positions] = _per_row(vectors.word, len(rows), name).to(embeds)
        return embeds

    captured = {}

    def capture_hidden(module, inputs):
        captured["hidden"] = inputs[0]

    hooks = [transformer.embeddings.token_embedding.register_forward_hook(replace_words),
             transformer.final_layer_norm.register_forward_pre_hook(capture_hidden)]
    try:
        text_encoder(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = captured["hidden"]

    hidden_bypass = hidden.clone()
    for name, positions, vectors in injections:
        if vectors.bypass is None:
            continue
        bypass = _per_row(vectors.bypass, len(rows), name).to(hidden)
        direction = bypass / bypass.norm(dim=1, keepdim=True)
        if vectors.bypass_unconstrained:  # length: the mean token norm of the (partly bypassed) sequence
            new_state = direction * hidden_bypass.norm(dim=-1).mean(-1).detach().unsqueeze(1)
        else:
            existing = hidden_bypass[rows, positions]
            new_state = existing + vectors.alpha * (direction * existing.norm(dim=1, keepdim=True))
        hidden_bypass[rows, positions] = new_state.to(hidden.dtype)

    final_norm = transformer.final_layer_norm
    return TextEncoding(final_norm(hidden), final_norm(hidden_bypass), hidden, hidden_bypass)
