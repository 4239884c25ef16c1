"""Mapper constructor arguments from a checkpoint's ``cfg`` (the pyrallis-encoded upstream run config).

Upstream rebuilds its mappers by decoding ``cfg`` into its ``RunConfig``, whose post-init *derives*
the Fourier sigmas from the experiment keys; we do the same derivation on the plain dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from .mapper import NUM_UNET_LAYERS

SUPPORTED_ARCH = 15  # "the final model used in the paper"; older keys use other networks
CAMERA_REPRESENTATIONS = ("dtu-12d", "phi", "theta-phi")

# Upstream ModelConfig.__post_init__ tables: experiment key -> sigma.
_SIGMA_DTU12_BY_KEY = {1: 1.0, 2: 0.5, 3: 0.25, 4: 0.75, 5: 0.1}
_SIGMA_T_BY_KEY = {0: 0.03, 1: 0.06, 2: 0.2, 3: 0.5}
_SIGMA_L_BY_KEY = {0: 2.0, 1: 4.0}
_DEFAULT_BYPASS_ALPHA = 0.2  # upstream's ModelConfig default when a config lacks the field


@dataclass
class ViewNetiLoadOptions:
    """Choices where the published code and the obvious intent differ.

    view_alpha_from_object: upstream's ``CheckpointHandler.load_mapper`` gives the *view* mapper the
        object mapper's ``output_bypass_alpha_object`` (a bug; both are 5 in every shipped config).
        True (default) reproduces it, so loaded mappers behave as the published inference did;
        False uses ``output_bypass_alpha_view``.
    fourier_matrix: "pickled" (default) takes W from the checkpoint's pickled encoder and falls back to
        the seed-0 formula when the file has none; "seed0" always regenerates it, as upstream does for
        arch 15. The two are identical in every file written by the published code.
    """

    view_alpha_from_object: bool = True
    fourier_matrix: str = "pickled"

    def __post_init__(self):
        if self.fourier_matrix not in ("pickled", "seed0"):
            raise ValueError(f"fourier_matrix must be 'pickled' or 'seed0', got {self.fourier_matrix!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {"view_alpha_from_object": self.view_alpha_from_object, "fourier_matrix": self.fourier_matrix}


class ConfigError(ValueError):
    """A checkpoint config lacks a field or asks for a variant we do not build."""


def _model_section(cfg: Mapping) -> Mapping:
    model = cfg.get("model") if isinstance(cfg, Mapping) else None
    if not isinstance(model, Mapping):
        raise ConfigError("checkpoint cfg has no 'model' section")
    return model


def _require(model: Mapping, name: str) -> Any:
    if name not in model:
        raise ConfigError(f"checkpoint cfg lacks model.{name}")
    return model[name]


def effective_pe_sigmas(cfg: Mapping) -> Dict[str, float]:
    """The sigmas upstream actually uses after ``ModelConfig.__post_init__``.

    sigma_theta, sigma_phi and sigma_r all copy the stored sigma_phi; sigma_dtu12, sigma_t and sigma_l
    come from ``pe_sigma_exp_key``, ``pe_t_exp_key`` and ``pe_l_exp_key`` (stored sigma_dtu12 when the
    key is 0).
    """
    model = _model_section(cfg)
    stored = model.get("pe_sigmas")
    if not isinstance(stored, Mapping) or "sigma_t" not in stored or "sigma_l" not in stored:
        raise ConfigError("checkpoint cfg model.pe_sigmas must hold at least sigma_t and sigma_l")
    phi = float(stored.get("sigma_phi", 1.0))
    sigmas = {"sigma_t": float(stored["sigma_t"]), "sigma_l": float(stored["sigma_l"]), "sigma_theta": phi,
              "sigma_phi": phi, "sigma_r": phi, "sigma_dtu12": float(stored.get("sigma_dtu12", 2.0))}
    dtu_key, t_key, l_key = (int(model.get(k, 0) or 0) for k in ("pe_sigma_exp_key", "pe_t_exp_key", "pe_l_exp_key"))
    sigmas["sigma_dtu12"] = _SIGMA_DTU12_BY_KEY.get(dtu_key, sigmas["sigma_dtu12"])
    if t_key not in _SIGMA_T_BY_KEY or l_key not in _SIGMA_L_BY_KEY:
        raise ConfigError(f"unknown pe_t_exp_key {t_key} or pe_l_exp_key {l_key} (upstream knows "
                          f"{sorted(_SIGMA_T_BY_KEY)} and {sorted(_SIGMA_L_BY_KEY)})")
    sigmas["sigma_t"], sigmas["sigma_l"] = _SIGMA_T_BY_KEY[t_key], _SIGMA_L_BY_KEY[l_key]
    return sigmas


def fourier_sigmas(cfg: Mapping, camera_representation: Optional[str]) -> List[float]:
    """[sigma_t, sigma_l] + the view's sigmas, in the order of the mapper's input vector."""
    s = effective_pe_sigmas(cfg)
    view = {None: [], "dtu-12d": [s["sigma_dtu12"]] * 12, "phi": [s["sigma_phi"]],
            "theta-phi": [s["sigma_theta"], s["sigma_phi"]]}
    if camera_representation not in view:
        raise ConfigError(f"unknown camera representation {camera_representation!r}; expected one of "
                          f"{CAMERA_REPRESENTATIONS}")
    return [s["sigma_t"], s["sigma_l"]] + view[camera_representation]


def configured_camera_representation(cfg: Mapping) -> str:
    """"dtu-12d" or "spherical" (the latter resolves to "phi"/"theta-phi" from the training tokens)."""
    data = cfg.get("data") if isinstance(cfg, Mapping) else None
    representation = (data or {}).get("camera_representation", "spherical")
    if representation not in ("dtu-12d", "spherical"):
        raise ConfigError(f"unknown data.camera_representation {representation!r}")
    return representation


def viewneti_mapper_kwargs(cfg: Mapping, kind: str, camera_representation: Optional[str] = None,
                           options: Optional[ViewNetiLoadOptions] = None) -> Dict[str, Any]:
    """Constructor kwargs of :class:`ViewNetiMapper` for a "view" or "object" mapper of this run.

    For a view mapper, ``camera_representation`` defaults to the config's; a spherical run must say
    "phi" or "theta-phi" (it depends on the training tokens).
    """
    options = options or ViewNetiLoadOptions()
    model = _model_section(cfg)
    if kind not in ("view", "object"):
        raise ValueError(f"mapper kind must be 'view' or 'object', got {kind!r}")
    arch = int(_require(model, "arch_view_net"))
    if arch != SUPPORTED_ARCH:
        raise ConfigError(f"arch_view_net {arch} is not supported: only {SUPPORTED_ARCH} (the paper's model)")
    if model.get("original_ti"):
        raise ConfigError("original_ti runs (plain textual inversion) are not supported")
    if model.get("arch_view_disable_tl"):
        raise ConfigError("arch_view_disable_tl is not supported for arch 15 (upstream refuses it too)")

    if kind == "view":
        if camera_representation is None:
            camera_representation = configured_camera_representation(cfg)
        if camera_representation == "spherical":
            raise ConfigError("a spherical view mapper needs 'phi' or 'theta-phi': give the training view tokens")
        hidden_dim = 64  # fixed for arch 15 views upstream, whatever arch_mlp_hidden_dims says
    else:
        camera_representation = None
        hidden_dim = int(_require(model, "arch_mlp_hidden_dims"))

    alpha_kind = "object" if (kind == "object" or options.view_alpha_from_object) else "view"
    return {
        "sigmas": fourier_sigmas(cfg, camera_representation),
        "word_dim": int(_require(model, "word_embedding_dim")),
        "hidden_dim": hidden_dim,
        "fourier_dim": 64,
        "fourier_seed": 0,
        "output_bypass": bool(model.get(f"output_bypass_{kind}", True)),
        "target_norm": model.get(f"target_norm_{kind}"),
        "bypass_alpha": float(model.get(f"output_bypass_alpha_{alpha_kind}", _DEFAULT_BYPASS_ALPHA)),
        "bypass_unconstrained": bool(model.get(f"bypass_unconstrained_{kind}", False)),
        "use_nested_dropout": bool(model.get("use_nested_dropout", False)),
        "nested_dropout_prob": float(model.get("nested_dropout_prob", 0.5)),
        "num_unet_layers": NUM_UNET_LAYERS,
        "camera_representation": camera_representation,
    }


def neti_mapper_kwargs(cfg: Mapping, word_dim: int, num_w: int) -> Dict[str, Any]:
    """Constructor kwargs of :class:`NetiMapper` from a NeTI run config (shapes come from the weights)."""
    model = _model_section(cfg)
    if not model.get("use_positional_encoding", True):
        raise ConfigError("NeTI mappers without positional encoding (BasicEncoder) are not supported")
    stored = model.get("pe_sigmas") or {"sigma_t": 0.03, "sigma_l": 2.0}
    return {
        "word_dim": int(word_dim),
        "num_unet_layers": NUM_UNET_LAYERS,
        "num_time_anchors": int(model.get("num_pe_time_anchors", 10)),
        "sigma_t": float(stored["sigma_t"]),
        "sigma_l": float(stored["sigma_l"]),
        "num_w": int(num_w),
        "hidden_dim": 128,
        "output_bypass": bool(model.get("output_bypass", True)),
        "target_norm": model.get("target_norm"),
        "use_nested_dropout": bool(model.get("use_nested_dropout", True)),
        "nested_dropout_prob": float(model.get("nested_dropout_prob", 0.5)),
        "bypass_alpha": 0.2,  # fixed in NeTI's text encoder
    }
