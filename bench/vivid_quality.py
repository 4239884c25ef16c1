"""VIVID novel-view quality on held-out procedural objects: trained model vs the copy-source baseline.

Run from the repository root: ``python -m bench.vivid_quality [--quick] [--eval-only [--model PATH]]``.

Trains the 32-px demo-size network for a fixed budget on procedural scenes (training seeds), then
evaluates it on held-out objects (evaluation seeds) x 8 target views at azimuth offsets of
+-15..90 degrees from the source, with the faithful EDM Heun sampler. The baseline outputs the
source view for every target; both are scored in the same run (whole-image PSNR and SSIM).
``--eval-only`` skips training and scores the committed demo model (or ``--model``). ``--quick``
is a reduced run with the same fields. Ends with one JSON line.
"""
import argparse
import json
import time

import torch

from nvs_core.progress import silent_progress
from nvs_core.vivid import training as vt
from nvs_core.vivid.data import procedural_eval_set
from nvs_core.vivid.demo_model import evaluate, format_comparison, load_demo_model

# The full budget is the committed demo model's recipe (same config, seed and steps, one thread),
# so a full run retrains that model and --eval-only scores the committed file on the same set.
FULL = dict(steps=3250, objects=50, sampler_steps=32)
QUICK = dict(steps=150, objects=10, sampler_steps=16)
VIEWS = 8


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced training and evaluation, same fields")
    parser.add_argument("--eval-only", action="store_true", help="evaluate a trained model without training")
    parser.add_argument("--model", default=None, help="model for --eval-only (default: the committed demo model)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 3250, quick: 150)")
    parser.add_argument("--objects", type=int, default=None, help="held-out objects (default: 50, quick: 10)")
    parser.add_argument("--sampler-steps", type=int, default=None, help="EDM Heun steps (default: 32, quick: 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared machine usable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = dict(QUICK if args.quick else FULL)
    for key in ("steps", "objects", "sampler_steps"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)

    train_seconds, steps = 0.0, 0
    if args.eval_only:
        net, translation_scale = load_demo_model(args.model)
        source = args.model or "committed demo model"
    else:
        config = vt.TrainConfig(total_steps=budget["steps"])  # the demo recipe: see TrainConfig defaults
        start = time.perf_counter()
        result = vt.train(config, progress=silent_progress)
        train_seconds, steps = time.perf_counter() - start, result.step
        net, translation_scale = result.ema, config.translation_scale
        source = f"trained here for {steps} steps"

    evalset = procedural_eval_set(budget["objects"], net.img_resolution, views=VIEWS,
                                  translation_scale=translation_scale)
    start = time.perf_counter()
    scores = evaluate(net, evalset, num_steps=budget["sampler_steps"], progress=silent_progress)
    eval_seconds = time.perf_counter() - start

    print(f"VIVID quality ({source}): {budget['objects']} held-out objects x {VIEWS} views, "
          f"{budget['sampler_steps']} sampler steps, {net.img_resolution} px")
    print(format_comparison(scores))
    result = {
        "bench": "vivid_quality", "quick": args.quick, "eval_only": args.eval_only,
        "train_steps": steps, "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "objects": budget["objects"], "views": VIEWS, "sampler_steps": budget["sampler_steps"],
        "model_psnr": scores["model"]["psnr"], "model_ssim": scores["model"]["ssim"],
        "copy_source_psnr": scores["copy_source"]["psnr"], "copy_source_ssim": scores["copy_source"]["ssim"],
        "psnr_gain_db": scores["difference"]["psnr"], "ssim_gain": scores["difference"]["ssim"],
        "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
