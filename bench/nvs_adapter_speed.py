"""NVS-Adapter cost through the diffusers SD backend: step time, peak memory and images per minute.

Run from the repository root: ``python -m bench.nvs_adapter_speed [--quick] [--threads N]``.

For a tiny random SD UNet + tiny adapter (16x16 latents) and (without ``--quick``) a full-size random SD 2.1
base UNet + the full-size adapter (shipped diffusers config, random init, 32x32 latents = the published 256 px),
Q = 4 target views, all measured in this run:
- ``step_ratio``: one adapter UNet evaluation (the published batch of one object: reference row + Q query rows,
  the after-self-attention patch in all 16 blocks) over one plain UNet evaluation of the same 1 + Q rows, the
  median over back-to-back pairs (target <= 1.35); step times are medians;
- ``memory_ratio``: peak memory of [UNet + adapter loaded, one adapter evaluation] over [UNet loaded, one plain
  evaluation] + the adapter's weights in the model dtype (target <= 1.15), each measured from the state before
  the UNet was built, in its own process. CPU: peak RSS (VmHWM) in a fresh process whose glibc returns freed
  blocks >= 128 KB to the system (``MALLOC_MMAP_THRESHOLD_``), i.e. live memory rather than what the allocator
  keeps for reuse; CUDA: max_memory_allocated;
- ``images_per_minute``: Q / (published steps x one in-model-CFG step (2 objects: 2 + 2Q rows)) per minute, UNet
  work only (no VAE, no CLIP).
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

QUERIES = 4
PUBLISHED_STEPS = 50


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(device):
    return torch.float16 if device == "cuda" else torch.float32


def _random(module, seed, device, dtype):
    from nvs_core.sd.tiny import randomize_

    module = module.to_empty(device="cpu")
    randomize_(module, torch.Generator().manual_seed(seed), bias_std=0.02)
    return module.to(device=device, dtype=dtype).train(False).requires_grad_(False)


def build_backend(size, device):
    """(diffusers backend, adapter config, latent side, text width) without the adapter."""
    from nvs_core.nvsadapter.config import SD21_BASE, TINY_SD
    from nvs_core.sd.diffusers_backend import CONFIG_DIR, DiffusersSDBackend

    dtype = _dtype(device)
    if size == "tiny":
        from nvs_core.sd.tiny import tiny_unet

        with torch.device("meta"):
            unet = tiny_unet(0)
        return DiffusersSDBackend(_random(unet, 0, device, dtype)), TINY_SD, TINY_SD.latent_resolution, 32
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((CONFIG_DIR / "sd21-base" / "unet" / "config.json")
                                                           .read_text()))
    return DiffusersSDBackend(_random(unet, 0, device, dtype)), SD21_BASE, SD21_BASE.latent_resolution, 1024


def build_adapter(config, device):
    from nvs_core.nvsadapter.model import NVSAdapter

    with torch.device("meta"):
        adapter = NVSAdapter(config)
    return _random(adapter, 1, device, _dtype(device))


def _inputs(config, side, width, device, objects=1):
    g = torch.Generator().manual_seed(2)
    dtype = _dtype(device)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(query_latents=rand(objects, QUERIES, 4, side, side), timesteps=torch.full((objects,), 500),
                text_context=rand(objects, 77, width), image_context=rand(objects, 1, config.image_context_dim),
                rays_context=rand(objects, 1 + QUERIES, config.posemb_dim, side, side),
                reference_latents=rand(objects, 1, 4, side, side))


def _plain(backend, inputs):
    from nvs_core.nvsadapter.network import build_batch

    batch = build_batch(**inputs)
    with torch.no_grad():
        backend.unet(batch.latents, batch.timesteps, batch.text)
    _sync()


def _adapter(backend, adapter, inputs, uncond=None):
    from nvs_core.nvsadapter.network import adapter_eps, build_batch

    batch = build_batch(**inputs, uncond=uncond, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapter_eps(backend, adapter, batch)
    _sync()


def measure(size, part, repeats, device):
    """One measurement in this process: "memory_plain", "memory_patched" or "timing"."""
    result = {}
    base = _peak_reset()
    backend, config, side, width = build_backend(size, device)
    inputs = _inputs(config, side, width, device)
    if part == "memory_plain":
        _plain(backend, inputs)
        result["peak_plain"] = _peak_since(base)
        return result
    adapter = build_adapter(config, device)
    result["adapter_bytes"] = sum(p.numel() * p.element_size() for p in adapter.parameters())
    if part == "memory_patched":
        _adapter(backend, adapter, inputs)
        result["peak_patched"] = _peak_since(base)
        return result
    _plain(backend, inputs)  # warm-up
    _adapter(backend, adapter, inputs)
    plain, patched = [], []
    for _ in range(repeats):  # back-to-back pairs, so load changes hit both alike
        for times, run in ((plain, lambda: _plain(backend, inputs)),
                           (patched, lambda: _adapter(backend, adapter, inputs))):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    ratios = sorted(b / a for a, b in zip(plain, patched))
    cfg_inputs = _inputs(config, side, width, device, objects=2)
    uncond = torch.tensor([True, False])
    cfg_times = []
    for _ in range(max(1, repeats // 2)):
        start = time.perf_counter()
        _adapter(backend, adapter, cfg_inputs, uncond)
        cfg_times.append(time.perf_counter() - start)
    result.update(plain_s=sorted(plain)[len(plain) // 2], patched_s=sorted(patched)[len(patched) // 2],
                  step_ratio=ratios[len(ratios) // 2], step_ratio_of_fastest=min(patched) / min(plain),
                  cfg_step_s=sorted(cfg_times)[len(cfg_times) // 2])
    return result


def _child(size, part, repeats, threads):
    """Run ``measure`` in a fresh interpreter (memory parts with a fixed glibc mmap threshold, so that freed
    tensors leave the process and RSS follows live tensors)."""
    code = ("import json, torch; torch.set_num_threads(%d); from bench.nvs_adapter_speed import measure; "
            "print('RESULT ' + json.dumps(measure(%r, %r, %d, %r)))" % (threads, size, part, repeats, _device()))
    env = dict(os.environ)
    if part.startswith("memory"):
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def summarize(size, raw):
    mb = 2 ** 20
    budget = raw["peak_plain"] + raw["adapter_bytes"]
    row = {"size": size, "queries": QUERIES, "plain_step_s": raw["plain_s"], "adapter_step_s": raw["patched_s"],
           "step_ratio": raw["step_ratio"], "step_ratio_of_fastest": raw["step_ratio_of_fastest"],
           "cfg_step_s": raw["cfg_step_s"], "images_per_minute": 60.0 * QUERIES / (PUBLISHED_STEPS * raw["cfg_step_s"]),
           "peak_plain_mb": raw["peak_plain"] / mb, "peak_patched_mb": raw["peak_patched"] / mb,
           "adapter_mb": raw["adapter_bytes"] / mb, "memory_ratio": raw["peak_patched"] / budget}
    print(f"[{size}] 1+{QUERIES} rows: plain {row['plain_step_s']:.4f} s, adapter {row['adapter_step_s']:.4f} s -> "
          f"ratio {row['step_ratio']:.3f} (target <= 1.35); peak plain {row['peak_plain_mb']:.0f} MB, patched "
          f"{row['peak_patched_mb']:.0f} MB, adapter weights {row['adapter_mb']:.0f} MB -> patched / (plain + "
          f"adapter) {row['memory_ratio']:.3f} (target <= 1.15); CFG step ({2 + 2 * QUERIES} rows) "
          f"{row['cfg_step_s']:.3f} s -> {row['images_per_minute']:.2f} images/min at {PUBLISHED_STEPS} steps",
          flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--repeats", type=int, default=4, help="back-to-back timing pairs at full size")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the full-size run")
    args = parser.parse_args()
    sizes = [("tiny", 40, 1)]
    if not args.quick:
        sizes.append(("full", args.repeats, args.threads if _device() == "cpu" else 1))
    rows = []
    for size, repeats, threads in sizes:
        raw = {}
        for part in ("memory_plain", "memory_patched", "timing"):
            raw.update(_child(size, part, repeats, threads))
        label = size if size == "tiny" else "full (SD 2.1 base UNet + adapter, 32x32 latents)"
        rows.append(summarize(label, raw))
    result = {"bench": "nvs_adapter_speed", "device": _device(), "dtype": str(_dtype(_device())).split(".")[-1],
              "queries": QUERIES, "quick": args.quick, "targets": {"step_ratio": 1.35, "memory_ratio": 1.15},
              "results": rows}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
