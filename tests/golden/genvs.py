"""Golden parity handlers for GeNVS (``$NVS_GOLDEN_DIR/genvs``; see its README.md and cases.json)."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, Optional

import torch

from nvs_core.checkpoints import load_safetensors
from nvs_core.genvs import cameras as genvs_cameras
from nvs_core.genvs import sampler as genvs_sampler
from nvs_core.genvs.config import tiny_config
from nvs_core.genvs.encoder import DeepLabV3PlusDecoder, preprocess
from nvs_core.genvs.loading import genvs_from_state_dict, load_genvs, load_genvs_checkpoint
from nvs_core.genvs.nerf import (NeRFField, RenderDraws, SourceViews, get_rays, near_far_from_bound, render_rays,
                                 render_views, upsample_condition)
from nvs_core.genvs import orbit as genvs_orbit
from nvs_core.progress import silent_progress


# ------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_safetensors(path)[0]


def _prefixed(t: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def _tolerance(case: dict, output: str):
    for pattern, tol in case.get("per_output_tolerance", {}).items():
        if pattern == output or (pattern.endswith("*") and output.startswith(pattern[:-1])):
            return tol["atol"], tol["rtol"]
    return case["atol"], case["rtol"]


def _assert_close(case: dict, output: str, got: torch.Tensor, expected: torch.Tensor,
                  tol: Optional[tuple] = None) -> None:
    atol, rtol = tol if tol is not None else _tolerance(case, output)
    got = got.detach().cpu()
    assert got.shape == expected.shape, f"{case['name']} {output}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{case['name']} {output}: dtype {got.dtype} != {expected.dtype}"
    if atol == 0 and rtol == 0:
        assert torch.equal(got, expected), f"{case['name']} {output}: not bit-exact"
        return
    diff = (got.double() - expected.double()).abs()
    excess = diff - (atol + rtol * expected.double().abs())
    assert excess.max() <= 0, f"{case['name']} {output}: max |diff| {diff.max():.3g} exceeds atol {atol} rtol {rtol}"


# --------------------------------------------------------------------------- a1: decoder

def decoder_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    kw = case["constructor_kwargs"]
    assert kw["output_stride"] == 16
    dec = DeepLabV3PlusDecoder(kw["encoder_channels"], kw["out_channels"], kw["atrous_rates"])
    dec.load_state_dict(_prefixed(t, "state_dict."), strict=True)
    dec.train(False)
    steps: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        y = dec(*[t[f"input.features.{i}"] for i in range(6)], intermediates=steps)
    got = {"output.y": y, **{f"output.intermediate.{k}": v for k, v in steps.items()}}
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


# --------------------------------------------------------------------------- a2: input_unet

@functools.lru_cache(maxsize=None)
def _case_e_model(method_dir: Path):
    """The case e network, built by the users' loader from the expected (de-duplicated) state dict."""
    t = _tensors(method_dir / "case_e_checkpoint_expected.safetensors")
    return genvs_from_state_dict(_prefixed(t, "expected.state_dict."), source="case_e_checkpoint_expected")


def input_unet_case(case: dict, method_dir: Path) -> None:
    t = _tensors(method_dir / case["file"])
    assert case["weights"]["prefix"] == "expected.state_dict.input_unet."
    model = _case_e_model(method_dir)
    assert model.config.decoder.channels == case["constructor_kwargs"]["decoder_channels"]
    assert list(model.config.decoder.atrous_rates) == case["constructor_kwargs"]["decoder_atrous_rates"]
    images = t["input.images"]
    B, V = images.shape[:2]
    targets01 = 0.5 * (images + 1)
    with torch.no_grad():
        unet_input = preprocess(targets01.reshape(B * V, *images.shape[2:]))
        features = model.input_unet.encoder(unet_input)
        volume = model.encode(targets01)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    got = {"output.targets01": targets01, "output.img_tp": ((targets01 - mean) / std).reshape(B * V, 3, 64, 64),
           "output.unet_input": unet_input, "output.volume": volume}
    got.update({f"output.encoder_features.{i}": f for i, f in enumerate(features)})
    for output in case["outputs"]:
        _assert_close(case, output, got[output], t[output])


HANDLERS = {
    "name:a2_input_unet": input_unet_case,
    "name:a1_dlv3_decoder": decoder_case,
}
