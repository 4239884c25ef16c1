"""VIVID novel-view quality on held-out procedural objects: trained model vs the copy-source baseline.

Run from the repository root: ``python -m bench.vivid_quality [--quick] [--eval-only [--model PATH]]``.

Trains the 32-px demo-size network with the demo model's recipe (``training.demo_recipe``: one
run on procedural pairs matched to the evaluation's orbit, training seeds only, camera labels
standardised with statistics fitted to those pairs) for a fixed budget, then evaluates it on
held-out objects (evaluation seeds) x 8 target views at azimuth offsets of +-15..90 degrees from the source, with the faithful
EDM Heun sampler. The baseline outputs the source view for every target; both are scored in the
same run (whole-image PSNR and SSIM).
``--eval-only`` skips training and scores the committed demo model (or ``--model``). ``--quick``
is a reduced run with the same fields. Also reports how much the net uses its source and its
camera label (``demo_model.conditioning_use``). Ends with one JSON line.
"""
import argparse
import json
import tempfile
import time

import torch

from nvs_core.progress import silent_progress
from nvs_core.vivid import training as vt
from nvs_core.vivid.data import procedural_eval_set
from nvs_core.vivid.demo_model import conditioning_use, evaluate, format_comparison, load_demo_model

# The full budget is the committed demo model's recipe (same config, seed and steps, one thread),
# so a full run retrains that model and --eval-only scores the committed file on the same set.
FULL = dict(steps=vt.DEMO_RECIPE["total_steps"], objects=50, sampler_steps=32)
QUICK = dict(steps=150, objects=10, sampler_steps=16)
VIEWS = 8


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced training and evaluation, same fields")
    parser.add_argument("--eval-only", action="store_true", help="evaluate a trained model without training")
    parser.add_argument("--model", default=None, help="model for --eval-only (default: the committed demo model)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default: {FULL['steps']}, quick: {QUICK['steps']})")
    parser.add_argument("--objects", type=int, default=None, help="held-out objects (default: 50, quick: 10)")
    parser.add_argument("--sampler-steps", type=int, default=None, help="EDM Heun steps (default: 32, quick: 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared machine usable)")
    parser.add_argument("--out", default=None,
                        help="keep the training run here (checkpoints every 250 steps; an interrupted run resumes "
                             "exactly); default: a temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = dict(QUICK if args.quick else FULL)
    for key in ("steps", "objects", "sampler_steps"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)

    train_seconds, steps, resumed_at = 0.0, 0, 0
    if args.eval_only:
        net, translation_scale = load_demo_model(args.model)
        source = args.model or "committed demo model"
    else:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="vivid_quality_") as work:
            kept = args.out is not None
            config = vt.demo_recipe(args.out if kept else work, budget["steps"], checkpoint_every=250 if kept else 0)
            resumed_at = vt.saved_step(config.out_dir) if kept else 0
            result = vt.train(config, progress=silent_progress)
            steps = result.step - resumed_at
        train_seconds = time.perf_counter() - start
        net, translation_scale = result.ema, config.translation_scale
        source = f"trained for {budget['steps']} steps" + (f", {steps} of them here (resumed at step {resumed_at})"
                                                           if resumed_at else " here")

    evalset = procedural_eval_set(budget["objects"], net.img_resolution, views=VIEWS,
                                  translation_scale=translation_scale)
    start = time.perf_counter()
    scores = evaluate(net, evalset, num_steps=budget["sampler_steps"], progress=silent_progress)
    eval_seconds = time.perf_counter() - start
    used = conditioning_use(net, evalset.pairs)

    print(f"VIVID quality ({source}): {budget['objects']} held-out objects x {VIEWS} views, "
          f"{budget['sampler_steps']} sampler steps, {net.img_resolution} px")
    print(format_comparison(scores))
    print("denoising MSE with the right inputs / another object's source / another target's label (same source):")
    for sigma, row in used.items():
        print(f"  {sigma:10s} {row['right']:.4f} / {row['other_source']:.4f} / {row['other_label']:.4f}")
    result = {
        "bench": "vivid_quality", "quick": args.quick, "eval_only": args.eval_only,
        "train_steps": steps, "resumed_at_step": resumed_at if not args.eval_only else 0,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "objects": budget["objects"], "views": VIEWS, "sampler_steps": budget["sampler_steps"],
        "model_psnr": scores["model"]["psnr"], "model_ssim": scores["model"]["ssim"],
        "copy_source_psnr": scores["copy_source"]["psnr"], "copy_source_ssim": scores["copy_source"]["ssim"],
        "psnr_gain_db": scores["difference"]["psnr"], "ssim_gain": scores["difference"]["ssim"],
        "conditioning_use": used, "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
