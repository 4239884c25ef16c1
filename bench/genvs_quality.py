"""GeNVS vs VIVID vs copy-source on held-out procedural objects (``python -m bench.genvs_quality``).

Trains the demo-size GeNVS (``nvs_core.genvs.training``, the demo recipe) and the demo-size VIVID
(``nvs_core.vivid.training`` TrainConfig defaults) for the same wall-clock budget on the same procedural
scenes (``vivid.data.TRAIN_SEEDS``: random objects rendered on the fly), then evaluates both on the same
held-out objects (``vivid.data.procedural_eval_set``: 50 objects x 8 targets at azimuth offsets +-15..90
degrees, source and targets at one elevation) against the copy-source baseline. The GeNVS NeRF's own RGB
render (first three feature channels) is reported as well, and whether GeNVS's encoder carries the
sources' colours (``genvs.demo.colour_use``: volume change when the colour channels are cycled; render
vs source chroma; how well one depth plane's features predict the pixel's chroma).

``--eval-only`` scores the two committed demo models instead (no training). ``--quick`` shrinks the
budget and the evaluation set. The last line printed is one JSON object.

Budget: each method's steady-state seconds per step are measured on a short run (the median step
time after two warm-up steps), then it is trained for budget / (seconds per step) steps (GeNVS's
cosine schedule spans exactly those steps); the steps and seconds actually spent are reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nvs_core.genvs import demo as gdemo  # noqa: E402
from nvs_core.genvs import training as gtrain  # noqa: E402
from nvs_core.progress import silent_progress  # noqa: E402
from nvs_core.vivid import demo_model as vdemo  # noqa: E402
from nvs_core.vivid import training as vtrain  # noqa: E402
from nvs_core.vivid.data import procedural_eval_set  # noqa: E402

IMSIZE = 32
GENVS_STEPS = gdemo.DEMO_STEPS      # Euler steps, the demo's sampler mode (gdemo.SAMPLER_NAME)
VIVID_STEPS = 32                    # the published Heun step count


def _seconds_per_step(train_fn, steps: int = 8, warmup: int = 2) -> float:
    """Steady-state seconds per optimizer step: the median gap between the step callbacks of a short
    run after ``warmup`` steps (set-up such as building nets or VIVID's label fit is not a step)."""
    stamps = []
    train_fn(steps, lambda info: stamps.append(time.perf_counter()))
    gaps = sorted(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))
    return gaps[len(gaps) // 2]


def train_genvs(budget: float, seed: int = 0, work: Optional[Path] = None) -> Dict[str, object]:
    def config(steps: int) -> gtrain.TrainConfig:
        values = copy.deepcopy(gtrain.DEMO_RECIPE)
        # the recipe's source-reconstruction warm-up keeps its share of the steps
        share = values.get("source_reconstruction_steps", 0) / values["total_steps"]
        values.update(total_steps=steps, restart_steps=max(steps, 1), seed=seed, checkpoint_every=0,
                      warmup_steps=min(values["warmup_steps"], max(steps // 10, 1)),
                      source_reconstruction_steps=round(steps * share))
        return gtrain.TrainConfig(**values, out_dir=str(work) if work else None)

    # timed on full-objective steps (the warm-up's are cheaper), so the budget is not overrun
    per_step = _seconds_per_step(lambda n, tick: gtrain.train(
        gtrain.TrainConfig(**{**copy.deepcopy(gtrain.DEMO_RECIPE), "total_steps": n,
                              "source_reconstruction_steps": 0}), progress=silent_progress, callback=tick))
    steps = max(1, int(budget / per_step))
    result = gtrain.train(config(steps), progress=silent_progress)
    return {"model": result.ema, "steps": result.step, "seconds": round(result.seconds, 1),
            "batch": config(steps).batch_size}


def train_vivid(budget: float, seed: int = 0) -> Dict[str, object]:
    per_step = _seconds_per_step(lambda n, tick: vtrain.train(vtrain.TrainConfig(total_steps=n, seed=seed),
                                                              progress=silent_progress, callback=tick))
    steps = max(1, int(budget / per_step))
    config = vtrain.TrainConfig(total_steps=steps, seed=seed, checkpoint_every=0)
    result = vtrain.train(config, progress=silent_progress)
    return {"model": result.ema, "steps": result.step, "seconds": round(result.seconds, 1),
            "batch": config.batch_size, "translation_scale": config.translation_scale}


def _metrics(values: Dict[str, float]) -> Dict[str, float]:
    return {"psnr": round(float(values["psnr"]), 3), "ssim": round(float(values["ssim"]), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.genvs_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budget and evaluation set (a smoke test)")
    parser.add_argument("--eval-only", action="store_true", help="score the committed demo models, no training")
    parser.add_argument("--budget", type=float, default=None,
                        help="training seconds per method (default 1800, --quick 40)")
    parser.add_argument("--objects", type=int, default=None, help="held-out objects (default 50, --quick 3)")
    parser.add_argument("--views", type=int, default=8, help="targets per object (azimuth offsets +-15..90)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    objects = args.objects or (3 if args.quick else 50)
    budget = args.budget if args.budget is not None else (40.0 if args.quick else 1800.0)
    started = time.perf_counter()

    train_info: Dict[str, Dict[str, object]] = {}
    if args.eval_only:
        vivid_net, scale = vdemo.load_demo_model()
        genvs_model = gdemo.load_demo_model()
        mode = "eval-only (committed demo models)"
    else:
        with tempfile.TemporaryDirectory() as work:
            g = train_genvs(budget, args.seed, Path(work) / "genvs")
        v = train_vivid(budget, args.seed)
        genvs_model, vivid_net, scale = g.pop("model"), v.pop("model"), v["translation_scale"]
        train_info = {"genvs": g, "vivid": v}
        mode = f"trained {budget:g} s each"
    evalset = procedural_eval_set(objects, IMSIZE, views=args.views, translation_scale=scale)
    t0 = time.perf_counter()
    g_res = gdemo.evaluate(genvs_model, evalset, steps=GENVS_STEPS, progress=silent_progress)
    g_time = time.perf_counter() - t0
    colours = gdemo.colour_use(genvs_model, evalset)
    t0 = time.perf_counter()
    v_res = vdemo.evaluate(vivid_net, evalset, num_steps=VIVID_STEPS, progress=silent_progress)
    v_time = time.perf_counter() - t0

    rows = {"copy_source": _metrics(g_res["copy_source"]), "vivid": _metrics(v_res["model"]),
            "genvs": _metrics(g_res["model"]), "genvs_render_rgb": _metrics(g_res["render_rgb"])}
    print(f"GeNVS quality bench: {mode}; {objects} held-out objects x {args.views} views at {IMSIZE} px "
          f"(GeNVS {GENVS_STEPS} steps, {gdemo.SAMPLER_NAME}; VIVID {VIVID_STEPS} Heun steps)")
    print(f"{'method':18s}{'PSNR (dB)':>11s}{'SSIM':>9s}")
    for name, m in rows.items():
        print(f"{name:18s}{m['psnr']:>11.3f}{m['ssim']:>9.4f}")
    print(f"GeNVS colour use: volume change {colours['volume_change']:.4f} when the source's colour channels are "
          f"cycled; render chroma {colours['render_chroma']:.4f} vs source {colours['source_chroma']:.4f}; "
          f"chroma from one depth plane's features R^2 {colours['plane_chroma_r2']:.3f}")
    gain = round(rows["genvs"]["psnr"] - rows["copy_source"]["psnr"], 3)
    line = {"bench": "genvs_quality", "mode": "eval-only" if args.eval_only else ("quick" if args.quick else "full"),
            "budget_seconds": None if args.eval_only else budget, "objects": objects, "views": args.views,
            "size": IMSIZE, **rows,
            "genvs_minus_copy_psnr": gain,
            "vivid_minus_copy_psnr": round(rows["vivid"]["psnr"] - rows["copy_source"]["psnr"], 3),
            "target_genvs_plus_2db": gain >= 2.0, "genvs_colour_use": colours, "train": train_info,
            "eval_seconds": {"genvs": round(g_time, 1), "vivid": round(v_time, 1)},
            "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
