"""The NVS-Adapter's trainable modules and the per-block computation that runs after self-attention.

``NVSAdapter`` holds only the adapter (the frozen SD UNet stays in the user's SD model): per wrapped block a
learnable-query composer (``support_emb``, ``support_query_attn``, ``query_out_attn``), the cross-view
attention to the reference view (``cross_view_attn_module``) and the attention to the CLIP image embedding
(``image_attn_module``); and the four ray projections ``pe_blocks``. Its ``state_dict()`` keys are the
published ``ThreeDiMAdapter`` keys (``unet.input_blocks.1.1.transformer_blocks.0.support_emb``,
``pe_blocks.0.weight``, ...), so checkpoints map 1:1.

``AdapterBlock.after_self_attention`` is steps 2-4 of the published ``ThreeDiMBasicTransformerBlock._forward``
(released modes: ``learnable_emb`` composer, ``support_sattn_mq`` view attention, ``query_only`` image
attention), run on the hidden states right after the frozen ``x = attn1(norm1(x)) + x``. Rows are
``[reference of object 0..B-1, then queries b0q0, b0q1, ..., b1q0, ...]``. Upstream quirks kept:
- posemb is added to the q/k/v inputs of the composer and of the cross-view attention only;
- the composer gives 0 to the reference rows; the learnable tokens are shared by all objects;
- the reference rows attend to themselves, each query view only to its own object's reference;
- the image attention returns the reference rows themselves, so after the residual they are doubled
  (x_ref <- 2 x_ref) in every block.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterLayer, NVSAdapterConfig


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, C) -> (..., heads, L, C / heads) (a view)."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, d) -> (..., L, heads * d)."""
    return t.transpose(-3, -2).flatten(-2)


class AdapterAttention(nn.Module):
    """The published sgm ``CrossAttention``: q/k/v without bias, ``to_out.0`` Linear with bias, SDPA."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA of projected (B, L, C) q and (B, S, C) k/v, heads merged back, before ``to_out``."""
        h = self.heads
        return _merge(F.scaled_dot_product_attention(_heads(q, h), _heads(k, h), _heads(v, h)))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.attend(self.to_q(x), self.to_k(context), self.to_v(context)))

    def single_token(self, context: torch.Tensor) -> torch.Tensor:
        """``forward(x, context)`` for a context of one token, (R, 1, D) -> (R, 1, C), the same for every token
        of x: the softmax over one key is exactly 1, so the attention output is the value itself (q and k
        never matter)."""
        if context.shape[-2] != 1:
            raise ValueError(f"single_token: expected a context of one token, got {tuple(context.shape)}")
        return self.to_out(self.to_v(context))


class AdapterBlock(nn.Module):
    """The adapter modules of one wrapped transformer block (names as in the published checkpoint)."""

    def __init__(self, dim: int, heads: int, tokens: int, image_context_dim: int):
        super().__init__()
        self.support_emb = nn.Parameter(torch.randn(1, tokens, dim))
        self.cross_view_attn_module = AdapterAttention(dim, heads, dim)
        self.image_attn_module = AdapterAttention(dim, heads, image_context_dim)
        self.support_query_attn = AdapterAttention(dim, heads, dim)
        self.query_out_attn = AdapterAttention(dim, heads, dim)

    def _composed_update(self, y: torch.Tensor, objects: int, queries: int) -> torch.Tensor:
        """The composer's update of the query rows only, (B Q, N, C)."""
        tokens = y.shape[1]
        query = y[objects:].reshape(objects, queries * tokens, y.shape[-1])      # (B, Q*N, C), a view
        module = self.support_query_attn
        # the learnable tokens are shared by all objects: project them once
        learnable_q = module.to_q(self.support_emb).expand(objects, -1, -1)
        composed = module.to_out(module.attend(learnable_q, module.to_k(query), module.to_v(query)))  # (B, N_l, C)
        return self.query_out_attn(query, composed).reshape(objects * queries, tokens, -1)

    def compose_queries(self, y: torch.Tensor, objects: int, queries: int) -> torch.Tensor:
        """Step 2 (without the residual): 0 for the reference rows, the composed update for the queries."""
        out = self._composed_update(y, objects, queries)
        return torch.cat([y.new_zeros((objects,) + tuple(y.shape[1:])), out], dim=0)

    def cross_view(self, y: torch.Tensor, objects: int, queries: int) -> torch.Tensor:
        """Step 3 (without the residual): reference self-attention, queries attend to their own reference.

        The reference keys/values are projected once per object and shared by its reference row and its Q
        query rows (one attention of (1 + Q) N query tokens over the object's N reference tokens)."""
        module = self.cross_view_attn_module
        tokens, width = y.shape[1:]
        support = y[:objects]
        q = module.to_q(y)
        k, v = module.to_k(support), module.to_v(support)                         # (B, N, C)
        support_out = module.attend(q[:objects], k, v)
        query_out = module.attend(q[objects:].reshape(objects, queries * tokens, width), k, v)
        out = torch.cat([support_out, query_out.reshape(objects * queries, tokens, width)], dim=0)
        return module.to_out(out)

    def image_attention(self, x: torch.Tensor, image_context: torch.Tensor, objects: int) -> torch.Tensor:
        """Step 4 (without the residual): the reference rows are returned unchanged (upstream quirk); each
        query row gets the attention output of its one image token at every token."""
        update = self.image_attn_module.single_token(image_context[objects:])    # (B Q, 1, C)
        return torch.cat([x[:objects], update.expand(-1, x.shape[1], -1)], dim=0)

    def after_self_attention(self, x: torch.Tensor, posemb: torch.Tensor, image_context: torch.Tensor,
                             objects: int, queries: int) -> torch.Tensor:
        """Steps 2-4 on hidden ``x`` (V, N, C) with posemb tokens (V, N, C) and image rows (V, 1, D_img)."""
        x = torch.cat([x[:objects], x[objects:] + self._composed_update(x + posemb, objects, queries)], dim=0)
        x = self.cross_view(x + posemb, objects, queries) + x
        image = self.image_attn_module.single_token(image_context[objects:])
        return torch.cat([x[:objects] + x[:objects], x[objects:] + image], dim=0)


class _Wrapped(nn.Module):
    """Keeps the published key path ``<block>.transformer_blocks.0.<module>``."""

    def __init__(self, block: AdapterBlock):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([block])


class NVSAdapter(nn.Module):
    """All adapter tensors of one NVS-Adapter model (344 tensors / 217,126,080 parameters at full size)."""

    def __init__(self, config: NVSAdapterConfig = NVSAdapterConfig()):
        super().__init__()
        self.config = config
        self.unet = nn.Module()
        blocks: List[AdapterBlock] = []
        for layer in config.layers():
            block = AdapterBlock(layer.channels, layer.heads, layer.tokens, config.image_context_dim)
            self._place(layer, block)
            blocks.append(block)
        self.__dict__["_blocks"] = blocks  # call order; not registered twice
        self.pe_blocks = nn.ModuleList([
            nn.Conv2d(config.posemb_dim, width, kernel_size=2 ** level, stride=2 ** level)
            for level, width in enumerate(config.widths)])

    def _place(self, layer: AdapterLayer, block: AdapterBlock) -> None:
        parts = layer.name.split(".")  # e.g. input_blocks.1.1 / middle_block.1
        parent = self.unet
        if not hasattr(parent, parts[0]):
            parent.add_module(parts[0], nn.ModuleDict())
        parent = getattr(parent, parts[0])
        for part in parts[1:-1]:
            if part not in parent:
                parent[part] = nn.ModuleDict()
            parent = parent[part]
        parent[parts[-1]] = _Wrapped(block)

    def zero_init_outputs(self) -> "NVSAdapter":
        """The published training start: zero ``to_out`` of the cross-view, image and query-out attentions
        (``attn_out_zero_init``); the composer's ``support_query_attn`` keeps its random init."""
        with torch.no_grad():
            for block in self._blocks:
                for module in (block.cross_view_attn_module, block.image_attn_module, block.query_out_attn):
                    module.to_out[0].weight.zero_()
                    module.to_out[0].bias.zero_()
        return self

    @property
    def layers(self) -> List[AdapterLayer]:
        return self.config.layers()

    def block(self, index: int) -> AdapterBlock:
        return self._blocks[index]

    @property
    def num_layers(self) -> int:
        return len(self._blocks)

    def posemb(self, rays: torch.Tensor, level: int) -> torch.Tensor:
        """pe_blocks[level] of the ray embedding rows (V, posemb_dim, h, w) -> (V, width, h/2^l, w/2^l)."""
        conv = self.pe_blocks[level]
        return conv(rays.to(dtype=conv.weight.dtype, device=conv.weight.device))
