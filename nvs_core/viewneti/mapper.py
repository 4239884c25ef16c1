"""The mapper networks: ViewNeTI's arch-15 mapper (views and objects) and the original NeTI mapper.

Both map a diffusion timestep t and a UNet cross-attention layer index l (0..15, in call order), plus
for ViewNeTI's view mapper the normalised camera parameters, to one word-embedding vector and one
"bypass" vector per row. State-dict keys are those of the published checkpoints.

ViewNeTI (``jmhb0/view_neti``, arch_view_net 15):
- x = [t/1000*2-1, l/16*2-1, view params...], Fourier features [sin(Wx), cos(Wx)] with W (32, n)
  drawn from seed 0 and column i scaled by sigma_i;
- net = Linear(64,h) LayerNorm LeakyReLU Linear(h,h) LayerNorm LeakyReLU, output_layer = Linear(h, 2D);
- word = out[:, :D] renormalised to ``target_norm``; bypass = out[:, D:] raw (the text encoder scales it).

NeTI (``NeuralTextualInversion/NeTI``):
- x = [t, l] raw, v = [sin(Wx), cos(Wx)] with W (1024, 2) unseeded, then v/|v|;
- input_layer Linear(2048, 160) initialised to the encodings of the 160 (t, l) anchors, registered both
  as ``input_layer`` and as ``net.0`` (so its weights appear twice in the state dict);
- the whole 2D output is renormalised to ``target_norm`` before the split; bypass alpha 0.2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NUM_UNET_LAYERS = 16
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class MapperOutput:
    """What one mapper call yields for a batch of rows."""

    word: torch.Tensor                 # (N, D): replaces the placeholder's token embedding
    bypass: Optional[torch.Tensor]     # (N, D) or None: added to the text encoder's last hidden state
    bypass_alpha: float                # strength of the bypass in the text encoder
    bypass_unconstrained: bool = False  # the "unconstrained bypass" ablation of ViewNeTI


# ------------------------------------------------------------------------------------- encodings

def seeded_fourier_matrix(sigmas: Sequence[float], dim: int = 64, seed: int = 0) -> torch.Tensor:
    """ViewNeTI's Fourier matrix W (dim/2, len(sigmas)): standard normal from ``seed`` on the CPU
    generator, column i times sigma_i.

    Bit-identical to upstream's ``torch.manual_seed(seed); torch.randn(...)``, but drawn from a private
    generator so that building a mapper does not reseed the global RNG as upstream does.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    w = torch.randn((dim // 2, len(sigmas)), generator=generator)
    for i, sigma in enumerate(sigmas):
        w[:, i] *= sigma
    return w


class FourierFeatures(nn.Module):
    """gamma(x) = [sin(W x), cos(W x)], no 2*pi factor. W is a non-persistent buffer: the published
    state dicts do not contain it (it lives in the pickled encoder object)."""

    def __init__(self, sigmas: Sequence[float], dim: int = 64, seed: int = 0):
        super().__init__()
        self.sigmas = [float(s) for s in sigmas]
        self.dim = dim
        self.register_buffer("w", seeded_fourier_matrix(self.sigmas, dim, seed), persistent=False)

    def set_matrix(self, w: torch.Tensor) -> None:
        w = torch.as_tensor(w).detach()
        if tuple(w.shape) != tuple(self.w.shape):
            raise ValueError(f"Fourier matrix must have shape {tuple(self.w.shape)}, got {tuple(w.shape)}")
        self.w = w.to(device=self.w.device, dtype=self.w.dtype).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.w @ x.T  # (dim/2, N), the same product order as upstream
        return torch.cat([torch.sin(projected), torch.cos(projected)]).T


class NetiTimeLayerEncoding(nn.Module):
    """NeTI's encoding of raw (t, l): [sin(W x), cos(W x)] normalised to unit length, W (num_w, 2)."""

    def __init__(self, sigma_t: float = 0.03, sigma_l: float = 2.0, num_w: int = 1024,
                 w: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.sigma_t, self.sigma_l, self.num_w = float(sigma_t), float(sigma_l), int(num_w)
        if w is None:  # upstream draws W unseeded; a loaded checkpoint supplies it
            w = torch.randn((self.num_w, 2), generator=generator)
            w[:, 0] *= self.sigma_t
            w[:, 1] *= self.sigma_l
        w = torch.as_tensor(w).detach().float()
        if tuple(w.shape) != (self.num_w, 2):
            raise ValueError(f"NeTI encoder matrix must have shape ({self.num_w}, 2), got {tuple(w.shape)}")
        self.register_buffer("w", w.clone(), persistent=False)

    def forward(self, timestep: torch.Tensor, unet_layer: torch.Tensor) -> torch.Tensor:
        x = torch.stack([timestep, unet_layer], dim=1).T  # (2, N)
        v = torch.cat([torch.sin(self.w @ x), torch.cos(self.w @ x)])  # (2*num_w, N)
        return (v / v.norm(dim=0)).T

    def anchor_matrix(self, num_time_anchors: int = 10, num_layers: int = NUM_UNET_LAYERS) -> torch.Tensor:
        """Rows (t/100)*16 + l: encodings of t in 0, 100, ..., 900 and l in 0..15 (NeTI's input-layer init).

        Upstream encodes each anchor alone; its matrix-vector products round differently from one batched
        product, so we keep them per anchor (sin, cos and the norm batch without changing a bit).
        """
        step = NUM_TRAIN_TIMESTEPS // num_time_anchors
        anchors = [torch.tensor([t, l], dtype=torch.float32, device=self.w.device)
                   for t in range(0, NUM_TRAIN_TIMESTEPS, step) for l in range(num_layers)]
        projected = torch.stack([self.w @ x for x in anchors])
        v = torch.cat([torch.sin(projected), torch.cos(projected)], dim=1)
        return v / v.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------ shared bits

def _mlp_trunk(in_dim: int, hidden: int, leading: Sequence[nn.Module] = ()) -> nn.Sequential:
    """[leading layers], Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU (upstream's indices)."""
    return nn.Sequential(*leading, nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU())


def nested_dropout(hidden: torch.Tensor, training: bool, probability: float,
                   truncation_idx: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """NeTI's nested dropout. Training: with ``probability`` (one draw per batch) every row is zeroed
    from a random index on. Inference: zero everything from ``truncation_idx`` on, if given.

    Upstream draws the coin with Python's ``random``; we use torch's RNG (``generator``) instead.
    """
    if training:
        coin = torch.rand((), generator=generator).item()
        if coin < probability:
            cut = torch.randint(0, hidden.shape[1], (hidden.shape[0],), generator=generator).to(hidden.device)
            keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < cut[:, None]
            hidden = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        return hidden
    if truncation_idx is not None:
        hidden = hidden.clone()
        hidden[:, truncation_idx:] = 0
    return hidden


# -------------------------------------------------------------------------------- ViewNeTI (arch 15)

class ViewNetiMapper(nn.Module):
    """ViewNeTI's arch-15 mapper, for a view (``view_dims`` > 0 camera numbers) or an object (0).

    Call with the raw timestep and layer index (float tensors (N,)) and, for a view mapper, the
    camera parameters already normalised to [-1, 1] on the training range (see ``camera_tokens``).
    """

    def __init__(self, sigmas: Sequence[float], word_dim: int = 1024, hidden_dim: int = 64,
                 fourier_dim: int = 64, fourier_seed: int = 0, output_bypass: bool = True,
                 target_norm: Optional[float] = None, bypass_alpha: float = 0.2, bypass_unconstrained: bool = False,
                 use_nested_dropout: bool = False, nested_dropout_prob: float = 0.5,
                 num_unet_layers: int = NUM_UNET_LAYERS, camera_representation: Optional[str] = None):
        super().__init__()
        if len(sigmas) < 2:
            raise ValueError(f"need at least the sigmas of t and l, got {list(sigmas)}")
        if bypass_unconstrained and not output_bypass:
            raise ValueError("bypass_unconstrained needs output_bypass")
        self.word_dim = int(word_dim)
        self.view_dims = len(sigmas) - 2
        self.camera_representation = camera_representation
        self.output_bypass = bool(output_bypass)
        self.target_norm = None if target_norm is None else float(target_norm)
        self.bypass_alpha = float(bypass_alpha)
        self.bypass_unconstrained = bool(bypass_unconstrained)
        self.use_nested_dropout = bool(use_nested_dropout)
        self.nested_dropout_prob = float(nested_dropout_prob)
        self.num_unet_layers = int(num_unet_layers)
        self.encoder = FourierFeatures(sigmas, fourier_dim, fourier_seed)
        self.net = _mlp_trunk(fourier_dim, hidden_dim)
        out_dim = self.word_dim * (2 if self.output_bypass else 1)
        self.output_layer = nn.Sequential(nn.Linear(hidden_dim, out_dim))

    @property
    def is_view_mapper(self) -> bool:
        return self.view_dims > 0

    def normalized_inputs(self, timestep: torch.Tensor, unet_layer: torch.Tensor,
                          view_params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x = [t~, l~, view params] with t~ = t/1000*2-1 and l~ = l/16*2-1 (so l~ is in [-1, 0.875])."""
        dtype = self.encoder.w.dtype
        t = torch.as_tensor(timestep, device=self.encoder.w.device).to(dtype).reshape(-1)
        l = torch.as_tensor(unet_layer, device=self.encoder.w.device).to(dtype).reshape(-1)
        if t.shape != l.shape:
            t, l = torch.broadcast_tensors(t, l)
        x = torch.stack((t / NUM_TRAIN_TIMESTEPS * 2 - 1, l / self.num_unet_layers * 2 - 1), dim=1)
        if self.view_dims == 0:
            return x
        if view_params is None:
            raise ValueError(f"this view mapper needs {self.view_dims} normalised camera numbers per row")
        view_params = torch.as_tensor(view_params).to(device=x.device, dtype=dtype)
        if view_params.ndim == 1:
            view_params = view_params[None]
        if view_params.shape[-1] != self.view_dims:
            raise ValueError(f"view mapper expects {self.view_dims} camera numbers per row, "
                             f"got shape {tuple(view_params.shape)}")
        if view_params.shape[0] != x.shape[0]:
            if view_params.shape[0] != 1 and x.shape[0] != 1:
                raise ValueError(f"{x.shape[0]} (t, l) rows but {view_params.shape[0]} camera rows")
            n = max(view_params.shape[0], x.shape[0])
            x, view_params = x.expand(n, -1), view_params.expand(n, -1)
        return torch.cat((x, view_params), dim=1)

    def split_output(self, raw: torch.Tensor) -> MapperOutput:
        """Split the output layer's result into word and bypass; renormalise only the word half."""
        word, bypass = (raw[:, :self.word_dim], raw[:, self.word_dim:]) if self.output_bypass else (raw, None)
        if self.target_norm is not None:
            word = F.normalize(word, dim=-1) * self.target_norm
        return MapperOutput(word, bypass, self.bypass_alpha, self.bypass_unconstrained)

    def forward(self, timestep: torch.Tensor, unet_layer: torch.Tensor, view_params: Optional[torch.Tensor] = None,
                truncation_idx: Optional[int] = None, generator: Optional[torch.Generator] = None) -> MapperOutput:
        hidden = self.net(self.encoder(self.normalized_inputs(timestep, unet_layer, view_params)))
        if self.use_nested_dropout:
            hidden = nested_dropout(hidden, self.training, self.nested_dropout_prob, truncation_idx, generator)
        return self.split_output(self.output_layer(hidden))


# ---------------------------------------------------------------------------------- original NeTI

class NetiMapper(nn.Module):
    """The original NeTI mapper (``NeuralTextualInversion/NeTI``), for SD 1.x (word_dim 768) by default.

    ``encoder_w`` is the checkpoint's pickled encoder matrix (upstream draws it unseeded, so a loaded
    mapper must take it from the file); without it a fresh one is drawn from ``generator``.
    """

    def __init__(self, word_dim: int = 768, num_unet_layers: int = NUM_UNET_LAYERS, num_time_anchors: int = 10,
                 sigma_t: float = 0.03, sigma_l: float = 2.0, num_w: int = 1024, hidden_dim: int = 128,
                 output_bypass: bool = True, target_norm: Optional[float] = None, use_nested_dropout: bool = True,
                 nested_dropout_prob: float = 0.5, bypass_alpha: float = 0.2,
                 encoder_w: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.word_dim = int(word_dim)
        self.output_bypass = bool(output_bypass)
        self.target_norm = None if target_norm is None else float(target_norm)
        self.use_nested_dropout = bool(use_nested_dropout)
        self.nested_dropout_prob = float(nested_dropout_prob)
        self.bypass_alpha = float(bypass_alpha)
        self.encoder = NetiTimeLayerEncoding(sigma_t, sigma_l, num_w, encoder_w, generator)
        anchors = num_time_anchors * num_unet_layers
        # Registered as input_layer and again as net.0, as upstream does (same module, two key sets).
        self.input_layer = nn.Linear(2 * num_w, anchors)
        with torch.no_grad():
            self.input_layer.weight.copy_(self.encoder.anchor_matrix(num_time_anchors, num_unet_layers))
        self.net = _mlp_trunk(anchors, hidden_dim, leading=(self.input_layer,))
        self.output_layer = nn.Sequential(nn.Linear(hidden_dim, self.word_dim * (2 if self.output_bypass else 1)))

    def hidden(self, timestep: torch.Tensor, unet_layer: torch.Tensor) -> torch.Tensor:
        dtype = self.encoder.w.dtype
        t = torch.as_tensor(timestep, device=self.encoder.w.device).to(dtype).reshape(-1)
        l = torch.as_tensor(unet_layer, device=self.encoder.w.device).to(dtype).reshape(-1)
        return self.net(self.encoder(t, l))

    def output_vector(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer's result, renormalised as a whole (word and bypass together)."""
        out = self.output_layer(hidden)
        return F.normalize(out, dim=-1) * self.target_norm if self.target_norm is not None else out

    def forward(self, timestep: torch.Tensor, unet_layer: torch.Tensor, truncation_idx: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> MapperOutput:
        hidden = self.hidden(timestep, unet_layer)
        if self.use_nested_dropout:
            hidden = nested_dropout(hidden, self.training, self.nested_dropout_prob, truncation_idx, generator)
        out = self.output_vector(hidden)
        if not self.output_bypass:
            return MapperOutput(out, None, self.bypass_alpha)
        return MapperOutput(out[:, :self.word_dim], out[:, self.word_dim:], self.bypass_alpha)
