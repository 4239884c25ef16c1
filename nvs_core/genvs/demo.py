"""The committed demo GeNVS model, held-out evaluation, and ``python -m nvs_core demo --method genvs``.

``models/demo/genvs_procedural.safetensors`` (+ ``.json``) is a 32-px GeNVS-architecture network
trained by :mod:`nvs_core.genvs.training` on procedural scenes (seeds in ``vivid.data.TRAIN_SEEDS``,
the same data source as the VIVID demo); its JSON meta holds the command that reproduces it.
Evaluation uses the held-out scenes of ``vivid.data.procedural_eval_set`` (``EVAL_SEEDS``), each target
sampled from the single source view, and compares with the copy-source baseline (every target
"predicted" as the unchanged source) and with the NeRF's own RGB render (the first three feature
channels, upsampled like the denoiser's condition).

Cameras are converted with :func:`~nvs_core.genvs.cameras.to_genvs` relative to the source view
(``normalize_first_view``, as in training).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..cameras import Cameras
from ..progress import ProgressFactory, resolve, shared, silent_progress
from ..vivid.data import EvalSet, eval_azimuth_offsets, from_model_space
from ..vivid.demo_model import format_comparison, image_metrics
from .cameras import to_genvs
from .loading import load_genvs
from .model import GeNVS
from .orbit import autoregressive_orbit
from .pipeline import fit_images, generate_views, render_targets, source_views

PathLike = Union[str, Path]

DEMO_MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "demo" / "genvs_procedural.safetensors"
DEMO_STEPS = 50
# The published sampling scripts' mode (Euler with churn, gamma 0.4): on the demo model it scores
# about 0.5 dB PSNR above deterministic Euler, whose ODE path sharpens the weak denoiser's artefacts.
DEMO_STOCHASTIC = True
SAMPLER_NAME = "Euler with churn (the published stochastic mode)"
ELEVATION_DEG = 20.0
RADIUS = 2.6
FOV_DEG = 45.0


def load_demo_model(path: Optional[PathLike] = None, device=None) -> GeNVS:
    path = Path(path) if path is not None else DEMO_MODEL_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo GeNVS model not found; expected the committed "
                                "models/demo/genvs_procedural.safetensors (+ .json) or a file from genvs-train")
    return load_genvs(path, device=device)


def export_demo_model(network_file: PathLike, target: Optional[PathLike] = None, min_half: int = 4096) -> Path:
    """Write the demo model from a training run's ``network-ema.safetensors``: tensors with more than
    ``min_half`` elements as float16 (the committed file stays under 20 MB), the rest (norm buffers, the
    Fourier buffer, biases) as float32; the loader returns float32 either way. The JSON meta keeps the
    run's own (``reproduce``: the training command) and records this step in ``export``."""
    from ..checkpoints import load_with_config, save_with_config

    network_file = Path(network_file)
    target = Path(target) if target is not None else DEMO_MODEL_PATH
    tensors, config = load_with_config(network_file)
    if config.get("method") != "genvs":
        raise ValueError(f"{network_file}: expected a GeNVS network file, got method {config.get('method')!r}")
    out = {k: (v.to(torch.float16) if v.is_floating_point() and v.numel() > min_half else v.to(torch.float32))
           for k, v in tensors.items()}
    meta = dict(config.get("meta", {}))
    meta.setdefault("scene_scale", 1.0)
    meta["export"] = (f"python -c \"from nvs_core.genvs.demo import export_demo_model; "
                      f"export_demo_model('{network_file}')\"  (tensors over {min_half} elements as float16)")
    save_with_config(target, out, {**config, "meta": meta})
    return target


def relative_cameras(source: Cameras, targets: Cameras, render_size: int):
    """(source, targets) as GeNVS cameras, normalised so the source is identity at (0, 0, |t|)."""
    both = to_genvs(Cameras.cat([source, targets]), render_size, normalize=True)
    return both[0], both[list(range(1, len(both)))]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Model-space images (N, 3, S, S) in [-1, 1] -> (N, 3, S, S) in [0, 1]."""
    return ((x.to(torch.float32) + 1) / 2).clamp(0, 1)


def _to_image(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> IMAGE [N, S, S, 3]."""
    return x.permute(0, 2, 3, 1).contiguous()


def _render_rgb(features: torch.Tensor) -> torch.Tensor:
    """The render's first three channels (the RGB trained ones), nearest x2 like the condition."""
    return GeNVS.condition(features)[:, :3].clamp(0, 1)


@torch.no_grad()
def sample_evalset(model: GeNVS, evalset: EvalSet, steps: int = DEMO_STEPS, stochastic: bool = DEMO_STOCHASTIC,
                   seed: int = 0, cfg: float = 1.0, progress: Optional[ProgressFactory] = None) -> Dict[str, torch.Tensor]:
    """Generated views and NeRF RGB renders, IMAGE [B, S, S, 3], for every pair of ``evalset``."""
    per = len(evalset.targets) // len(evalset.sources)
    size = model.config.diffusion_size
    views, renders = [], []
    with resolve(progress, len(evalset.sources) * steps, "GeNVS evaluation") as bar:
        for k in range(len(evalset.sources)):
            src_img = _unit(evalset.pairs.src[k * per:k * per + 1])
            source, targets = relative_cameras(evalset.sources[[k]], evalset.targets[list(range(k * per, (k + 1) * per))],
                                               model.config.render_size)
            out = generate_views(model, src_img, source, targets, steps=steps, stochastic=stochastic, seed=seed + k,
                                 cfg=cfg, progress=shared(bar))
            images = out["images"]
            if images.shape[-1] != evalset.pairs.dst.shape[-1]:
                raise ValueError(f"the model samples {size}-px views but the evaluation set is "
                                 f"{evalset.pairs.dst.shape[-1]} px")
            views.append(_to_image(images.cpu()))
            renders.append(_to_image(_render_rgb(out["features"]).cpu()))
    return {"views": torch.cat(views), "renders": torch.cat(renders)}


def evaluate(model: GeNVS, evalset: EvalSet, steps: int = DEMO_STEPS, stochastic: bool = DEMO_STOCHASTIC, seed: int = 0,
             cfg: float = 1.0, progress: Optional[ProgressFactory] = None) -> Dict[str, object]:
    """Model vs copy-source (and the NeRF RGB render) PSNR/SSIM; also returns the generated ``views``.
    Object k's targets are sampled with seed ``seed + k`` (:data:`DEMO_STOCHASTIC` Euler by default)."""
    out = sample_evalset(model, evalset, steps, stochastic, seed, cfg, progress)
    truth = from_model_space(evalset.pairs.dst)
    source = from_model_space(evalset.pairs.src)
    result = {"model": image_metrics(out["views"], truth), "copy_source": image_metrics(source, truth),
              "render_rgb": image_metrics(out["renders"], truth)}
    result["difference"] = {k: round(result["model"][k] - result["copy_source"][k], 4) for k in ("psnr", "ssim")}
    result["views"] = out["views"]
    return result


@torch.no_grad()
def colour_use(model: GeNVS, evalset: EvalSet, count: int = 16) -> Dict[str, float]:
    """Whether the encoder carries the sources' colours: the relative change of the feature volume when
    the first ``count`` source images' channels are cycled (RGB -> GBR, which keeps brightness patterns
    and moves every colour); 0 means a colour-blind encoder, whose render and samples can only guess the
    colours. Also the mean chroma (mean absolute deviation from the pixel's grey) of the source-view
    render's RGB channels on opaque pixels, next to the same figure for the source images there.
    ``plane_chroma_r2``: how well a linear map from one depth plane's features (what a 3D point reads) predicts
    the pixel's chroma (RGB minus its grey), fitted on the first half of the sources and scored (R^2) on the
    rest, averaged over the planes; near 0 when the colours are absent where the field looks for them."""
    per = len(evalset.targets) // len(evalset.sources)
    count = min(count, len(evalset.sources))
    images = torch.cat([_unit(evalset.pairs.src[k * per:k * per + 1]) for k in range(count)])
    size = model.config.image_size
    fitted = fit_images(images, size)   # a per-channel resize, so cycling after it is the same as before
    plain, moved = model.encode(torch.cat([fitted, fitted[:, [1, 2, 0]]])).chunk(2)
    change = float((moved - plain).norm() / plain.norm().clamp_min(1e-12))

    def chroma(x: torch.Tensor) -> torch.Tensor:   # (..., 3)
        return (x - x.mean(-1, keepdim=True)).abs().mean(-1)

    # volume rows are the image's flipped (the encoder's input is); planes are (features, depth)-major
    pixels = torch.flip(fitted, [-2]).permute(0, 2, 3, 1).double()
    signed_chroma = (pixels - pixels.mean(-1, keepdim=True)).reshape(count, -1, 3)
    depth = model.config.resolution_z
    planes = plain.double().reshape(count, -1, depth, size * size)
    half = max(1, count // 2)
    scores = []
    for d in range(depth):
        feats = planes[:, :, d].transpose(1, 2)                                   # (count, pixels, features)
        x = torch.cat([feats, torch.ones_like(feats[..., :1])], -1)
        fit = torch.linalg.lstsq(x[:half].flatten(0, 1), signed_chroma[:half].flatten(0, 1)).solution
        truth = signed_chroma[half:].flatten(0, 1)
        residual = ((x[half:].flatten(0, 1) @ fit - truth) ** 2).sum()
        scores.append(float(1 - residual / ((truth - truth.mean(0)) ** 2).sum().clamp_min(1e-12)))

    rendered, truth = [], []
    with model.mode(False):
        for k in range(count):
            source, _ = relative_cameras(evalset.sources[[k]], evalset.sources[[k]], model.config.render_size)
            src = source_views(model, images[k:k + 1], source, plain[k:k + 1])
            jitter = torch.Generator().manual_seed(k)
            features, _, opacity = render_targets(model, src, source, source.intrinsics, jitter)
            rgb = _render_rgb(features)[0].permute(1, 2, 0)
            opaque = GeNVS.condition(opacity)[0, 0] > 0.5
            src_rgb = _to_image(fit_images(images[k:k + 1], rgb.shape[0]))[0]
            rendered.append(chroma(rgb[opaque]))
            truth.append(chroma(src_rgb[opaque]))
    rendered, truth = torch.cat(rendered), torch.cat(truth)
    return {"volume_change": round(change, 4), "plane_chroma_r2": round(sum(scores) / len(scores), 3),
            "render_chroma": round(float(rendered.mean()) if rendered.numel() else 0.0, 4),
            "source_chroma": round(float(truth.mean()) if truth.numel() else 0.0, 4)}


def format_table(result: Dict[str, Dict[str, float]]) -> str:
    table = format_comparison(result)
    if "render_rgb" in result:
        r = result["render_rgb"]
        table += f"\n{'render_rgb':12s}{r['psnr']:>11.3f}{r['ssim']:>9.4f}"
    return table


# ------------------------------------------------------------------------------------------------ demo

def run(out_dir: PathLike, seed: int = 3, views: int = 8, steps: int = DEMO_STEPS, orbit_views: int = 12,
        model_path: Optional[PathLike] = None, zoom: int = 4, threads: Optional[int] = 1,
        progress: Optional[ProgressFactory] = None) -> dict:
    """Novel views of held-out object ``seed`` with the demo GeNVS model; writes ``grid.png`` (input,
    generated, ground truth), ``orbit.gif`` (the autoregressive orbit | ground truth, ``orbit_views``
    poses round the object) and ``metrics.json``. Returns the summary written to ``metrics.json``."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), seed, views, steps, orbit_views, model_path, zoom, progress)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, seed: int, views: int, steps: int, orbit_views: int, model_path, zoom: int, progress) -> dict:
    from ..demo import _enlarge, held_out_seed
    from ..imageio import grid, save_gif, save_png
    from ..procedural import make_scene, render

    if views < 1 or orbit_views < 2:
        raise ValueError(f"views must be >= 1 and orbit_views >= 2, got {views} and {orbit_views}")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = load_demo_model(model_path)
    size = model.config.diffusion_size
    scene_seed = held_out_seed(seed)
    scene = make_scene(scene_seed)
    progress = progress or silent_progress

    offsets = eval_azimuth_offsets(views)
    azimuths = torch.tensor([0.0] + offsets, dtype=torch.float64)
    rig = Cameras.from_spherical(math.radians(ELEVATION_DEG), torch.deg2rad(azimuths), RADIUS,
                                 math.radians(FOV_DEG), size, size)
    rendered = render(scene, rig, background=(1.0, 1.0, 1.0), samples_per_pixel=4)
    images = rendered.rgb.permute(0, 3, 1, 2).contiguous()                       # (1 + views, 3, S, S)
    source, targets = relative_cameras(rig[[0]], rig[list(range(1, len(rig)))], model.config.render_size)
    gen = generate_views(model, images[:1], source, targets, steps=steps, stochastic=DEMO_STOCHASTIC, seed=seed,
                         progress=progress)
    generated = _to_image(gen["images"].cpu())
    truth = _to_image(images[1:])
    src_image = _to_image(images[:1])
    metrics = {"model": image_metrics(generated, truth), "copy_source": image_metrics(src_image.expand_as(truth), truth)}
    render_rgb = image_metrics(_to_image(_render_rgb(gen["features"]).cpu()), truth)

    # The autoregressive orbit: a full turn at the source's elevation, each view conditioned on the
    # source and earlier generated views (the published schedule).
    path = Cameras.from_spherical(math.radians(ELEVATION_DEG),
                                  torch.deg2rad(torch.arange(orbit_views, dtype=torch.float64) * 360.0 / orbit_views),
                                  RADIUS, math.radians(FOV_DEG), size, size)
    _, orbit_path = relative_cameras(path[[0]], path[list(range(1, orbit_views))], model.config.render_size)
    orbit = autoregressive_orbit(model, images[:1], source, orbit_path, steps=steps, stochastic=DEMO_STOCHASTIC, seed=seed,
                                 progress=progress)
    orbit_truth = render(scene, path, background=(1.0, 1.0, 1.0), samples_per_pixel=4).rgb
    orbit_frames = torch.cat([src_image, _to_image(orbit["images"])])
    gap = torch.ones(orbit_views, size, 1, 3)
    files = {
        "grid": save_png(grid([_enlarge(src_image, zoom), _enlarge(generated, zoom), _enlarge(truth, zoom)]),
                         out / "grid.png"),
        "orbit": save_gif(_enlarge(torch.cat([orbit_frames, gap, orbit_truth], dim=2), zoom), out / "orbit.gif",
                          fps=4),
    }
    summary = {
        **metrics, "render_rgb": render_rgb,
        "scene_seed": scene_seed, "views": views, "size": size, "steps": steps, "sampler": SAMPLER_NAME,
        "azimuth_offsets_deg": offsets, "elevation_deg": ELEVATION_DEG, "orbit_views": orbit_views,
        "model_file": str(model_path or "models/demo/genvs_procedural.safetensors"),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    files["metrics"] = out / "metrics.json"
    print(f"GeNVS demo: held-out procedural object {scene_seed}, {views} novel views at {size}x{size} "
          f"({steps} steps, {SAMPLER_NAME}) and a {orbit_views}-view autoregressive orbit in {summary['seconds']} s")
    print(format_table({**metrics, "render_rgb": render_rgb}))
    for name, p in files.items():
        print(f"  {name:9s} {p}")
    return summary
