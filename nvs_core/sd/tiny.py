"""Tiny random SD components built from configs (tests, benches, CPU demos; nothing is downloaded).

The UNet keeps the SD 2.x block layout (16 cross-attention layers) at width 32-64; the CLIP text model has
2 layers of width 32; the VAE 2 levels. ``ldm_checkpoint`` writes diffusers weights in the original LDM
single-file layout (the inverse of diffusers' ``convert_ldm_unet_checkpoint``), e.g. to test loaders.
"""
import re

import torch

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=(2, 2, 4, 4),
                 cross_attention_dim=32, norm_num_groups=32, use_linear_projection=True)
TINY_CLIP = dict(vocab_size=64, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu", pad_token_id=0,
                 bos_token_id=60, eos_token_id=61)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                latent_channels=4, norm_num_groups=32, sample_size=16)
BOS, EOS, VIEW, OBJECT = 60, 61, 62, 63


def randomize_(module: torch.nn.Module, generator: torch.Generator, bias_std: float) -> torch.nn.Module:
    """Random weights in place: matrices N(0, 1/fan_in), vectors 1 (weights) or 0 (biases) + N(0, bias_std)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            else:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + bias_std * torch.randn(p.shape, generator=generator))
    return module


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).train(False).requires_grad_(False)


def tiny_clip(seed=0):
    import transformers

    torch.manual_seed(seed)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP)).train(False).requires_grad_(False)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE).train(False).requires_grad_(False)


def tiny_backend(seed=0, prediction_type="epsilon"):
    from .diffusers_backend import DiffusersSDBackend

    return DiffusersSDBackend(tiny_unet(seed), tiny_clip(seed), None, tiny_vae(seed), prediction_type=prediction_type)


def prompt_ids(rows=1, length=16):
    """[BOS, VIEW, 5, 7, 9, 11, 7, OBJECT, EOS, pad...] like "<view>. a photo of a <object>"."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    ids[:, :9] = torch.tensor([BOS, VIEW, 5, 7, 9, 11, 7, OBJECT, EOS])
    return ids


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(prefix, rest):
    sub, tail = rest.split(".", 1)
    return f"{prefix}.{_RESNET[sub]}.{tail}"


def ldm_unet_key(key: str, attention_up_blocks) -> str:
    """The original LDM name of a diffusers UNet key (SD 1.x/2.x layout, 2 layers per down block)."""
    for new, old in _FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{3 * (block + 1)}.0.op.{rest.split('.', 1)[1]}"
        index = 3 * block + j + 1
        return f"input_blocks.{index}.1.{rest}" if kind == "attentions" else _resnet(f"input_blocks.{index}.0", rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.1.{rest}" if kind == "attentions" else _resnet(f"middle_block.{2 * j}", rest)
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
    block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "upsamplers":
        return f"output_blocks.{3 * block + 2}.{2 if block in attention_up_blocks else 1}.conv.{rest.split('.', 1)[1]}"
    index = 3 * block + j
    return f"output_blocks.{index}.1.{rest}" if kind == "attentions" else _resnet(f"output_blocks.{index}.0", rest)


def ldm_checkpoint(unet, clip=None):
    """A single-file checkpoint dict in the LDM layout: UNet (and an SD 1.x-style CLIP)."""
    state = unet.state_dict()
    attention_up_blocks = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {"model.diffusion_model." + ldm_unet_key(k, attention_up_blocks): v.contiguous() for k, v in state.items()}
    if clip is not None:
        out.update({"cond_stage_model.transformer.text_model." + k: v.contiguous()
                    for k, v in clip.state_dict().items()})
    return out


class TinyTokenizer:
    """A word-level stand-in for ``CLIPTokenizer`` over the tiny CLIP's 64 ids (tests and CPU demos).

    Lower-cased words and punctuation marks are tokens; "view" -> ``VIEW`` and "object" -> ``OBJECT``
    (the super-category words ViewNeTI's placeholders stand on), every other token a stable hash in
    1..59; rows are [BOS, tokens..., EOS] padded with 0 to ``model_max_length``.
    """

    model_max_length = TINY_CLIP["max_position_embeddings"]
    FIXED = {"view": VIEW, "object": OBJECT}

    def token_id(self, token: str) -> int:
        import zlib

        return self.FIXED.get(token, zlib.crc32(token.encode()) % 59 + 1)

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt"):
        from types import SimpleNamespace

        length = max_length or self.model_max_length
        rows = []
        for prompt in ([prompts] if isinstance(prompts, str) else prompts):
            words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", prompt.lower())
            ids = [BOS] + [self.token_id(w) for w in words][:length - 2] + [EOS]
            rows.append(ids + [0] * (length - len(ids)))
        return SimpleNamespace(input_ids=torch.tensor(rows, dtype=torch.long))

    def __len__(self) -> int:
        return TINY_CLIP["vocab_size"]


def tiny_backend_with_tokenizer(seed=0, prediction_type="epsilon"):
    """``tiny_backend`` with :class:`TinyTokenizer`, so that prompts can be given as text."""
    backend = tiny_backend(seed, prediction_type)
    backend.tokenizer = TinyTokenizer()
    return backend


def unet_config_from_ldm(model_channels: int, channel_mult, num_res_blocks: int, attention_resolutions,
                         num_head_channels: int, context_dim: int, sample_size: int = 8,
                         use_linear_in_transformer: bool = True) -> dict:
    """diffusers ``UNet2DConditionModel`` kwargs for an LDM ``UNetModel`` (any level count; heads from
    ``num_head_channels``; a level has attention when 2**level is in ``attention_resolutions``)."""
    widths = [model_channels * m for m in channel_mult]
    attention = [2 ** level in attention_resolutions for level in range(len(widths))]
    return dict(sample_size=sample_size, in_channels=4, out_channels=4,
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
                block_out_channels=tuple(widths), layers_per_block=num_res_blocks,
                attention_head_dim=tuple(w // num_head_channels for w in widths), cross_attention_dim=context_dim,
                norm_num_groups=32, use_linear_projection=use_linear_in_transformer)


def unet_from_ldm_state_dict(config: dict, state: dict):
    """A diffusers UNet with the weights of an LDM state dict (keys without ``model.diffusion_model.``),
    converted by diffusers' own ``convert_ldm_unet_checkpoint``; every key must be used."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in state.items()}, unet.config)
    missing, unexpected = unet.load_state_dict(converted, strict=False)
    if missing or unexpected or len(converted) != len(state):
        raise ValueError(f"LDM UNet weights do not fit the config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, {len(state)} given, {len(converted)} converted")
    return unet.train(False).requires_grad_(False)


TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
                        num_attention_heads=4, image_size=224, patch_size=56, hidden_act="gelu")


def tiny_clip_vision(seed=0, **overrides):
    """A tiny ``CLIPVisionModelWithProjection`` (the CLIP ViT-H image-embedding role, width 32)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**{**TINY_CLIP_VISION, **overrides})
    return transformers.CLIPVisionModelWithProjection(config).train(False).requires_grad_(False)
