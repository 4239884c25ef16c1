"""ViewNeTI patching cost through the diffusers SD backend: step time, precompute time, extra peak memory.

Run from the repository root: ``python -m bench.viewneti_speed [--quick]``.

For a tiny random SD UNet and (without ``--quick``) a full-size random SD 2.1 UNet + CLIP text tower
(shipped diffusers configs, random init, 64x64 latents, one camera), all measured in this run:
- ``step_ratio``: one patched CFG sampling step (batch [uncond, cond], ViewNeTI contexts from the cache)
  over one unpatched step, the median over back-to-back pairs (target <= 1.10); step times are medians;
- ``precompute_ratio``: ``prepare()`` of a 30-step schedule (16 x 30 text-encoder passes) over one
  unpatched step;
- ``extra_peak_mb``: peak memory of [precompute 30 steps + one patched step] minus that of one plain
  step, each measured from the same loaded state (target <= 256 MB at full size). CPU: peak RSS
  (VmHWM, reset through /proc/self/clear_refs) in a fresh process whose glibc returns freed blocks
  >= 128 KB to the system (``MALLOC_MMAP_THRESHOLD_``), i.e. live memory rather than what the allocator
  keeps for reuse; CUDA: max_memory_allocated.
- ``train_ratio``: one ViewNeTI training step (``nvs_core.viewneti.training``, learnable mode 2, one image per
  step: augmentation, VAE posterior sample, 16 text-encoder passes with injected vectors and their backward, the
  UNet forward and backward through the patched cross-attention, AdamW) over one plain UNet forward+backward
  (the same latents, gradient to a plain context only), medians of steady-state steps (the full size adds a
  random SD 2.1 VAE for 512x512 pixels; the published step is 3 x 3 such images).
Ends with one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench.peak_memory import peak_reset as _peak_reset, peak_since as _peak_since

STEPS = 30
FULL_LATENT = 64


def _randomize(module, seed):
    from nvs_core.sd.tiny import randomize_

    randomize_(module, torch.Generator().manual_seed(seed), bias_std=0.02)
    return module.train(False).requires_grad_(False)


def build(size, device):
    """(backend, provider factory, latents, cond, uncond, schedule timesteps) for "tiny" or "full"."""
    from nvs_core.sd.diffusers_backend import CONFIG_DIR, DiffusersSDBackend
    from nvs_core.sd.tiny import OBJECT, VIEW, prompt_ids, tiny_backend
    from nvs_core.viewneti.injection import ViewNetiContexts
    from nvs_core.viewneti.mapper import ViewNetiMapper

    if size == "tiny":
        backend, width, latent = tiny_backend(seed=0), 32, 8
        ids, view_id, object_id = prompt_ids(), VIEW, OBJECT
    else:
        import transformers
        from diffusers import UNet2DConditionModel

        folder = CONFIG_DIR / "sd21"
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
            text = json.loads((folder / "text_encoder" / "config.json").read_text())
            clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                **{k: v for k, v in text.items() if k not in ("architectures", "model_type")}))
        unet, clip = _randomize(unet.to_empty(device="cpu"), 0), _randomize(clip.to_empty(device="cpu"), 1)
        clip.embeddings.position_ids.copy_(torch.arange(77)[None])
        backend, width, latent = DiffusersSDBackend(unet, clip, prediction_type="v_prediction"), 1024, FULL_LATENT
        view_id, object_id = 1000, 2000  # any ids unique in the prompt: the mappers replace their embeddings
        ids = torch.full((1, 77), 0, dtype=torch.long)  # SD 2.x pads with id 0
        ids[0, :9] = torch.tensor([49406, view_id, 269, 320, 1125, 539, 320, object_id, 49407])
    backend.to(device)
    view = _randomize(ViewNetiMapper([0.03, 2.0] + [0.5] * 12, word_dim=width, bypass_alpha=5.0), 2).to(device)
    obj = _randomize(ViewNetiMapper([0.03, 2.0], word_dim=width, bypass_alpha=5.0), 3).to(device)
    camera = torch.rand(1, 12, generator=torch.Generator().manual_seed(4)) * 2 - 1
    make_provider = lambda: ViewNetiContexts(backend, ids, view, view_id, camera, obj, object_id)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, latent, latent, generator=g).to(device)
    with torch.no_grad():
        cond = backend.text_encoder(input_ids=ids.to(device)).last_hidden_state
        uncond = torch.randn(cond.shape, generator=g).to(device)
    timesteps = torch.linspace(999, 0, STEPS + 1).round()[:-1]  # diffusers' 30-step leading schedule
    return backend, make_provider, latents, cond, uncond, timesteps


def _step(backend, latents, cond, uncond, patches=None):
    with torch.no_grad():
        backend.predict_noise(latents, 500, cond, uncond, 7.5, patches)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(size, part, repeats, device):
    """One measurement in this process: "memory_plain", "memory_patched", "timing" or "all"."""
    from nvs_core.sd import UNetPatches

    backend, make_provider, latents, cond, uncond, timesteps = build(size, device)
    result = {}
    if part in ("memory_plain", "all"):
        base = _peak_reset()
        _step(backend, latents, cond, uncond)
        result["peak_plain"] = _peak_since(base)
    provider = make_provider()
    patches = UNetPatches(contexts=provider)
    if part in ("memory_patched", "all"):
        base = _peak_reset()
        start = time.perf_counter()
        with torch.no_grad():
            provider.prepare(timesteps)
        result["precompute_s"] = time.perf_counter() - start
        _step(backend, latents, cond, uncond, patches)
        result["peak_patched"] = _peak_since(base)
        result["cache_mb"] = provider.cache_bytes / 2 ** 20
    if part in ("timing", "all"):
        _step(backend, latents, cond, uncond, patches)  # warm-up; fills the cache for the timed timestep
        plain, patched = [], []
        for _ in range(repeats):  # back-to-back pairs, so load changes hit both alike
            for times, extra in ((plain, None), (patched, patches)):
                start = time.perf_counter()
                _step(backend, latents, cond, uncond, extra)
                times.append(time.perf_counter() - start)
        ratios = sorted(b / a for a, b in zip(plain, patched))
        result.update(plain_s=sorted(plain)[len(plain) // 2], patched_s=sorted(patched)[len(patched) // 2],
                      step_ratio=ratios[len(ratios) // 2], step_ratio_of_fastest=min(patched) / min(plain))
    return result


class _WordTokenizer:
    """Stand-in tokenizer for random CLIP weights: [BOS, word ids..., EOS] padded with 0 ("view"/"object" fixed)."""

    def __init__(self, length, bos, eos, vocab):
        self.model_max_length, self.bos, self.eos, self.vocab = length, bos, eos, vocab

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt"):
        import zlib
        from types import SimpleNamespace

        fixed = {"view": 1000, "object": 2000}
        rows = []
        for prompt in prompts:
            words = prompt.lower().replace(".", " . ").split()
            ids = [self.bos] + [fixed.get(w, 3000 + zlib.crc32(w.encode()) % 1000) for w in words] + [self.eos]
            rows.append(ids + [0] * (self.model_max_length - len(ids)))
        return SimpleNamespace(input_ids=torch.tensor(rows))


def _training_backend(size, device):
    """(backend with tokenizer and VAE, latent size, pixel size)."""
    from nvs_core.sd.tiny import TINY_VAE, tiny_backend_with_tokenizer

    if size == "tiny":
        backend = tiny_backend_with_tokenizer(seed=0, prediction_type="v_prediction")
        latent = 8
        pixels = latent * 2 ** (len(TINY_VAE["block_out_channels"]) - 1)
    else:
        from diffusers import AutoencoderKL
        from nvs_core.sd.diffusers_backend import CONFIG_DIR

        backend = build("full", "cpu")[0]
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(json.loads((CONFIG_DIR / "sd21" / "vae" / "config.json").read_text()))
        backend.vae = _randomize(vae.to_empty(device="cpu"), 6)
        backend.latent_scaling_factor = float(vae.config.scaling_factor)
        backend.tokenizer = _WordTokenizer(77, 49406, 49407, 49408)
        latent, pixels = FULL_LATENT, FULL_LATENT * 8
    return backend.to(device), latent, pixels


def measure_training(size, repeats, device):
    """Median seconds of one training step and of one plain UNet forward+backward, same process."""
    import math

    from nvs_core import cameras
    from nvs_core.progress import silent_progress
    from nvs_core.viewneti import training

    backend, latent, pixels = _training_backend(size, device)
    cams = cameras.orbit(3, 0.3, 0.0, 2 * math.pi, 2.5, math.radians(40), pixels, pixels)
    images = torch.rand(3, pixels, pixels, 3, generator=torch.Generator().manual_seed(7))
    scene = training.scene_from_images(images, cams)
    stamps = []
    config = training.ViewNetiTrainConfig(learnable_mode=2, steps=repeats + 1, batch_size=1, gradient_accumulation=1,
                                          augmentation="published-7", checkpoint_every=0)
    training.train_viewneti(backend, [scene], config, progress=silent_progress,
                            callback=lambda info: stamps.append(time.perf_counter()))
    steps = sorted(b - a for a, b in zip(stamps[:-1], stamps[1:]))  # the first step is warm-up
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 4, latent, latent, generator=g).to(device)
    width = backend.text_encoder.get_input_embeddings().weight.shape[1]
    plain = []
    for _ in range(repeats + 1):
        context = torch.randn(1, 77, width, generator=g).to(device).requires_grad_(True)
        start = time.perf_counter()
        backend.unet(x, torch.tensor([500.0]), context).square().mean().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        plain.append(time.perf_counter() - start)
    plain = sorted(plain[1:])
    return {"train_step_s": steps[len(steps) // 2], "unet_fwd_bwd_s": plain[len(plain) // 2],
            "train_ratio": steps[len(steps) // 2] / plain[len(plain) // 2]}


def _child(size, part, repeats, threads):
    """Run ``measure`` in a fresh interpreter. Memory parts run with a fixed glibc mmap threshold, so that
    freed tensors leave the process and RSS follows live tensors (like CUDA's max_memory_allocated)
    instead of allocator retention."""
    function = "measure_training(%r, %d, %r)" % (size, repeats, _device()) if part == "training" else \
        "measure(%r, %r, %d, %r)" % (size, part, repeats, _device())
    code = ("import json, sys, torch; torch.set_num_threads(%d); from bench.viewneti_speed import measure, "
            "measure_training; print('RESULT ' + json.dumps(%s))" % (threads, function))
    env = dict(os.environ)
    if part.startswith("memory"):
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def summarize(size, raw):
    mb = 2 ** 20
    row = {"size": size, "plain_step_s": raw["plain_s"], "patched_step_s": raw["patched_s"],
           "step_ratio": raw["step_ratio"], "step_ratio_of_fastest": raw["step_ratio_of_fastest"],
           "precompute_s": raw["precompute_s"],
           "precompute_ratio": raw["precompute_s"] / raw["plain_s"], "cache_mb": raw["cache_mb"],
           "extra_peak_mb": (raw["peak_patched"] - raw["peak_plain"]) / mb,
           "train_step_s": raw["train_step_s"], "unet_fwd_bwd_s": raw["unet_fwd_bwd_s"],
           "train_ratio": raw["train_ratio"]}
    print(f"[{size}] step plain {row['plain_step_s']:.4f} s, patched {row['patched_step_s']:.4f} s -> ratio "
          f"{row['step_ratio']:.3f} (target <= 1.10); precompute {STEPS} steps {row['precompute_s']:.2f} s = "
          f"{row['precompute_ratio']:.1f} steps; cache {row['cache_mb']:.1f} MB, extra peak "
          f"{row['extra_peak_mb']:.1f} MB; training step {row['train_step_s']:.3f} s = {row['train_ratio']:.1f} x "
          f"plain UNet forward+backward ({row['unet_fwd_bwd_s']:.3f} s)", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--repeats", type=int, default=2, help="back-to-back timing pairs at full size")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps at full size")
    args = parser.parse_args()
    rows = []
    # tiny: small kernels, so one thread (thread hand-offs dominate on a busy machine)
    sizes = [("tiny", 100, 20, 1)]
    if not args.quick:
        sizes.append(("full", args.repeats, args.train_repeats, min(2, os.cpu_count() or 1) if _device() == "cpu" else 1))
    for size, repeats, train_repeats, threads in sizes:
        raw = {}
        for part in ("memory_plain", "memory_patched", "timing"):
            raw.update(_child(size, part, repeats, threads))
        raw.update(_child(size, "training", train_repeats, threads))
        rows.append(summarize(size if size == "tiny" else "full (SD 2.1 UNet + CLIP-H, 64x64 latents)", raw))
    result = {"bench": "viewneti_speed", "device": _device(), "steps": STEPS, "quick": args.quick,
              "targets": {"step_ratio": 1.10, "extra_peak_mb": 256}, "results": rows}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
