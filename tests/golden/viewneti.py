"""Golden parity handlers for ViewNeTI and the NeTI mapper (``$NVS_GOLDEN_DIR/viewneti``; see its README).

Everything runs through the users' entry points: mappers are built from the checkpoint cfg, cameras go
through the token strings and the calibration folder, checkpoints through the safe loaders.
"""
from __future__ import annotations

import functools
import json
import pickletools
import zipfile
from pathlib import Path
from typing import Dict, Optional

import torch

from nvs_core.checkpoints import CheckpointError, load_safetensors, load_torch_weights
from nvs_core.viewneti import camera_tokens as ct
from nvs_core.viewneti.config import ViewNetiLoadOptions, neti_mapper_kwargs, viewneti_mapper_kwargs
from nvs_core.viewneti.loading import (build_mapper, load_learned_embeds, load_viewneti, read_mapper_file,
                                       split_view_and_object_tokens)
from nvs_core.viewneti.mapper import NetiMapper, seeded_fourier_matrix

CAL18 = "cal18_synthetic"


# ------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


def _cfg(method_dir: Path) -> dict:
    return json.loads((method_dir / "checkpoint_cfg.json").read_text())


def _case(method_dir: Path, name: str) -> dict:
    return next(c for c in json.loads((method_dir / "cases.json").read_text())["cases"] if c["name"] == name)


def _tolerance(case: dict, output: str):
    tol = case.get("tolerance_overrides", {}).get(output)
    return (tol["atol"], tol["rtol"]) if tol else (case["atol"], case["rtol"])


def _bit_equal(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != 0.0), same dtype and shape."""
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return False
    if got.is_floating_point():
        bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16}[got.dtype]
        return torch.equal(got.contiguous().view(bits), expected.contiguous().view(bits))
    return torch.equal(got, expected)


def _assert_close(case: dict, output: str, got: torch.Tensor, expected: torch.Tensor,
                  tol: Optional[tuple] = None) -> None:
    atol, rtol = tol if tol is not None else _tolerance(case, output)
    got = got.detach()
    assert got.shape == expected.shape, f"{case['name']} {output}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{case['name']} {output}: dtype {got.dtype} != {expected.dtype}"
    if atol == 0 and rtol == 0:
        assert _bit_equal(got, expected), f"{case['name']} {output}: not bit-exact"
        return
    diff = (got.double() - expected.double()).abs()
    excess = diff - (atol + rtol * expected.double().abs())
    assert excess.max() <= 0, f"{case['name']} {output}: max |diff| {diff.max():.3g} exceeds atol {atol} rtol {rtol}"


def _state_dict(tensors: Dict[str, torch.Tensor], prefix: str = "state_dict.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _viewneti_mapper(case: dict, method_dir: Path, kind: str):
    """Build the mapper from the checkpoint cfg, check its kwargs against the case, load the case weights."""
    kwargs = viewneti_mapper_kwargs(_cfg(method_dir), kind)
    expected = case["constructor_kwargs"]
    sigmas = expected["pe_sigmas"]
    view_sigmas = [sigmas["sigma_dtu12"]] * 12 if kind == "view" else []
    assert kwargs["sigmas"] == [sigmas["sigma_t"], sigmas["sigma_l"]] + view_sigmas
    assert kwargs["target_norm"] == expected["norm_scale"] == case["scalars"]["target_norm"]
    assert kwargs["bypass_alpha"] == expected["output_bypass_alpha"] == case["scalars"]["alpha"]
    assert kwargs["word_dim"] == expected["output_dim"] and kwargs["hidden_dim"] == expected["arch_mlp_hidden_dims"]
    assert kwargs["output_bypass"] is expected["output_bypass"] and kwargs["use_nested_dropout"] is False
    assert kwargs["fourier_dim"] == expected["fourier_dim"] and kwargs["fourier_seed"] == expected["fourier_seed"]
    return build_mapper(kind, kwargs, _state_dict(_tensors(method_dir / case["file"])), source=case["file"])


def _check_viewneti_forward(case: dict, mapper, t: Dict[str, torch.Tensor], view_params) -> None:
    with torch.no_grad():
        x = mapper.normalized_inputs(t["input.t"], t["input.l"], view_params)
        features = mapper.encoder(x)
        hidden = mapper.net(features)
        raw = mapper.output_layer(hidden)
        out = mapper(t["input.t"], t["input.l"], view_params)
    got = {"output.x_normalized": x, "output.fourier_features": features, "output.hidden": hidden,
           "output.raw_2048": raw, "output.word": out.word, "output.bypass": out.bypass}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])
    assert torch.equal(mapper.split_output(raw).word, out.word), "forward and the stepwise path agree"
    assert out.bypass_alpha == case["scalars"]["alpha"]


# --------------------------------------------------------------------------------- a: view mapper

def view_mapper_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    mapper = _viewneti_mapper(case, method_dir, "view")
    assert _bit_equal(mapper.encoder.w, t["input.fourier_W"]), "seed-0 Fourier matrix"

    # Tokens: made from the raw float32 matrices, parsed back to what the mapper sees.
    tokens = case["scalars"]["view_tokens"]
    for token, raw, key in zip(tokens, t["input.cam_raw"], t["input.cam_idx"].tolist()):
        assert ct.format_dtu_view_token(raw, key) == token
    parsed = [ct.parse_dtu_view_token(token, int_key=True) for token in tokens]
    assert [p.key for p in parsed] == t["input.cam_idx"].tolist()
    assert _bit_equal(torch.stack([p.values for p in parsed]), t["input.cam_parsed"])

    # The novel camera's file gives the same matrix; the range comes from the calibration folder.
    novel = ct.read_dtu_projection(method_dir / "novel_cam100.txt").reshape(12)
    for raw, key in zip(t["input.cam_raw"], t["input.cam_idx"].tolist()):
        if key == 100:
            assert _bit_equal(raw, novel)
    camera_range = ct.DTUCameraRange.from_calibration_folder(method_dir / CAL18)
    assert _bit_equal(camera_range.mins, t["input.cam_mins"]) and _bit_equal(camera_range.maxs, t["input.cam_maxs"])

    view_params = camera_range.normalize_tokens(tokens)
    assert view_params.min() < -1 or view_params.max() > 1, "novel camera leaves [-1, 1] (no clamping)"
    _check_viewneti_forward(case, mapper, t, view_params)


# ------------------------------------------------------------------------------- b: object mapper

def object_mapper_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    mapper = _viewneti_mapper(case, method_dir, "object")
    assert _bit_equal(mapper.encoder.w, t["input.fourier_W"]), "seed-0 Fourier matrix"
    _check_viewneti_forward(case, mapper, t, None)


# ------------------------------------------------------------------------------------ c: NeTI

def neti_mapper_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    ck = case["constructor_kwargs"]
    cfg = {"model": {"target_norm": ck["norm_scale"], "pe_sigmas": ck["pe_sigmas"],
                     "output_bypass": ck["output_bypass"], "use_nested_dropout": ck["use_nested_dropout"],
                     "nested_dropout_prob": ck["nested_dropout_prob"], "num_pe_time_anchors": ck["num_pe_time_anchors"],
                     "use_positional_encoding": True}}  # a NeTI run config with the case's values
    kwargs = neti_mapper_kwargs(cfg, ck["output_dim"], ck["num_w"])
    assert kwargs["hidden_dim"] == ck["hidden"]
    assert kwargs["bypass_alpha"] == case["scalars"]["bypass_alpha_in_text_encoder"]
    mapper = NetiMapper(**kwargs, encoder_w=t["input.encoder_W"]).train(False)
    sd = _state_dict(t)
    # The input layer starts at the anchor encodings, and is registered twice.
    _assert_close(case, "anchors", mapper.input_layer.weight, sd["input_layer.weight"], (1e-6, 1e-5))
    assert torch.equal(sd["input_layer.weight"], sd["net.0.weight"])
    assert torch.equal(sd["input_layer.bias"], sd["net.0.bias"])
    manifest = json.loads((method_dir / "manifests" / "neti_mapper.json").read_text())
    layout = [(k, list(v.shape)) for k, v in mapper.state_dict().items()]
    assert layout == [(k, shape) for k, shape, _ in manifest["state_dict"]]
    mapper = build_mapper("neti", kwargs, sd, t["input.encoder_W"], source=case["file"])
    with torch.no_grad():
        encoding = mapper.encoder(t["input.t"], t["input.l"])
        hidden = mapper.hidden(t["input.t"], t["input.l"])
        raw = mapper.output_layer(hidden)
        out = mapper(t["input.t"], t["input.l"])
        truncated = mapper(t["input.t"], t["input.l"], truncation_idx=32)
    got = {"output.encoding_2048": encoding, "output.hidden": hidden, "output.raw_1536": raw,
           "output.out_1536": mapper.output_vector(hidden), "output.word": out.word, "output.bypass": out.bypass,
           "output.out_1536_trunc32": torch.cat([truncated.word, truncated.bypass], dim=1)}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])
    assert torch.equal(torch.cat([out.word, out.bypass], 1), got["output.out_1536"])
    assert (out.word.norm(dim=1) < kwargs["target_norm"]).all(), "NeTI normalises word and bypass together"


# ----------------------------------------------------------------------------- d: text encoder

def text_encoder_case(case: dict, method_dir: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from nvs_core.viewneti.text import PlaceholderVectors, encode_text_with_mapper_outputs

    t = _tensors(method_dir / case["file"])
    model = CLIPTextModel(CLIPTextConfig(**case["config"]["CLIPTextConfig"])).train(False)
    weights = _state_dict(t, "state_dict.text_model.")
    position_ids = weights.pop("embeddings.position_ids")  # a saved buffer in transformers 4.27 only
    own = dict(model.named_buffers())
    if "embeddings.position_ids" in model.state_dict():
        weights["embeddings.position_ids"] = position_ids
    else:
        assert torch.equal(own["embeddings.position_ids"], position_ids)
    model.load_state_dict(weights, strict=True)

    def encode(alpha_view: float):
        with torch.no_grad():
            return encode_text_with_mapper_outputs(
                model, t["input.input_ids"],
                view_vectors=PlaceholderVectors(t["input.view_token_ids"], t["input.word_view"], t["input.bypass_view"],
                                                alpha_view),
                object_vectors=PlaceholderVectors(t["input.object_token_id"], t["input.word_object"],
                                                  t["input.bypass_object"], float(t["input.alpha_object"])))

    enc = encode(float(t["input.alpha_view"]))
    got = {"output.h_pre_ln": enc.hidden, "output.h_bypass_pre_ln": enc.hidden_bypass, "output.A": enc.keys,
           "output.B": enc.values}
    variant = encode(float(t["input.alpha_view_variant"]))
    got["output.B_alpha_view2"] = variant.values
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])
    assert torch.equal(variant.keys, enc.keys), "alpha changes only the values context"


# ------------------------------------------------------------------------ e: checkpoint format

def _storage_locations(path: Path) -> set:
    """Devices named in a torch zip file's storage ids (read with pickletools: nothing is built)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str) and arg.startswith(("cuda", "cpu"))}


def checkpoint_load_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    cfg = _cfg(method_dir)
    manifests = method_dir / "manifests"
    for kind in ("view", "object"):
        path = method_dir / case["files"][kind]
        structure = case["structure"][kind]
        assert _storage_locations(path) == {"cuda:0"}, "the fixture exercises CUDA-tagged storages"
        # torch's own weights-only load refuses the pickled encoder class; ours reads it as data.
        try:
            load_torch_weights(path)
        except CheckpointError as e:
            assert e.global_name == "models.positional_encoding.FourierPositionalEncodingNDims", str(e)
        else:
            raise AssertionError(f"{path.name}: weights-only torch.load should refuse the pickled encoder")
        mfile = read_mapper_file(path)
        assert mfile.kind == kind and mfile.cfg == cfg
        assert [repr(e.stored_key) for e in mfile.entries] == structure["mappers_keys"]
        entry = mfile.entries[0]
        assert entry.placeholder_token == structure["placeholder_object_token"]
        assert entry.encoder_class == "FourierPositionalEncodingNDims"
        manifest = json.loads((manifests / f"viewneti_mapper_{kind}_arch15.json").read_text())
        assert list(entry.state_dict) == [k for k, _, _ in manifest["state_dict"]], "original key order"
        for key, value in entry.state_dict.items():
            _assert_close(case, f"expected.{kind}.state_dict.{key}", value, t[f"expected.{kind}.state_dict.{key}"])
        _assert_close(case, f"expected.{kind}.encoder_w", entry.encoder_w, t[f"expected.{kind}.encoder_w"])
        seed0 = seeded_fourier_matrix(entry.encoder_sigmas)
        _assert_close(case, f"expected.{kind}.W_seed0", seed0, t[f"expected.{kind}.W_seed0"])

    # The same files drive cases a and b through the full loader, both Fourier-matrix choices.
    a, b = _case(method_dir, "a_view_mapper_forward"), _case(method_dir, "b_object_mapper_forward")
    ta, tb = _tensors(method_dir / a["file"]), _tensors(method_dir / b["file"])
    for options in (ViewNetiLoadOptions(), ViewNetiLoadOptions(fourier_matrix="seed0")):
        model = load_viewneti(method_dir / case["files"]["view"], method_dir / case["files"]["object"],
                              method_dir / "checkpoints/learned_embeds-steps-10.bin", method_dir / CAL18, options)
        assert list(model.objects) == [cfg["data"]["placeholder_object_token"]], "object mappers keyed by token"
        assert model.view.bypass_alpha == cfg["model"]["output_bypass_alpha_object"]
        with torch.no_grad():
            view_out = model.view(ta["input.t"], ta["input.l"], model.view_inputs(a["scalars"]["view_tokens"]))
            object_out = model.objects["<object>"](tb["input.t"], tb["input.l"])
        for output, got in (("output.word", view_out.word), ("output.bypass", view_out.bypass)):
            _assert_close(a, output, got, ta[output])
        for output, got in (("output.word", object_out.word), ("output.bypass", object_out.bypass)):
            _assert_close(b, output, got, tb[output])


# ------------------------------------------------------------------------ f: tokens and embeds

def tokens_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    scalars = case["scalars"]
    tokens = [ct.format_dtu_view_token(P, key) for P, key in zip(t["input.P_all"], scalars["keys"])]
    assert tokens == scalars["tokens"]
    parsed = [ct.parse_dtu_view_token(token) for token in tokens]
    assert [str(p.key) for p in parsed] == scalars["parsed_cam_keys"]
    _assert_close(case, "output.parsed", torch.stack([p.values for p in parsed]), t["output.parsed"])

    calibration = ct.DTUCalibration.from_folder(method_dir / CAL18)
    assert calibration.keys == list(range(64))
    _assert_close(case, "input.cal18_P", calibration.projections, t["input.cal18_P"])
    camera_range = calibration.camera_range()
    _assert_close(case, "output.cam_mins", camera_range.mins, t["output.cam_mins"])
    _assert_close(case, "output.cam_maxs", camera_range.maxs, t["output.cam_maxs"])
    _assert_close(case, "output.cal18_normalized", camera_range.normalize_tokens(calibration.tokens()),
                  t["output.cal18_normalized"])

    embeds = load_learned_embeds(method_dir / scalars["learned_embeds_file"])
    assert list(embeds) == scalars["learned_embeds_keys_in_order"]
    assert [v.storage_offset() for v in embeds.values()] == scalars["learned_embeds_storage_offsets"]
    for token, value in embeds.items():
        _assert_close(case, f"expected.learned_embeds.{token}", value, t[f"expected.learned_embeds.{token}"])
    views, objects = split_view_and_object_tokens(list(embeds))
    assert [ct.parse_dtu_view_token(v, int_key=True).key for v in views] == [22, 25, 28] and objects == ["<object>"]
    assert embeds["<object>"].norm().item() == scalars["target_norm_object"]
    assert all(embeds[v].norm().item() == scalars["target_norm_view"] for v in views)


HANDLERS = {
    "name:a_view_mapper_forward": view_mapper_case,
    "name:b_object_mapper_forward": object_mapper_case,
    "name:c_neti_mapper_forward": neti_mapper_case,
    "name:d_text_encoder_bypass": text_encoder_case,
    "name:e_checkpoint_load": checkpoint_load_case,
    "name:f_tokens_and_learned_embeds": tokens_case,
}
