"""GeNVS speed and memory (random weights): sampler, renderer and autoregressive-orbit overheads.

Run from the repository root: ``python -m bench.genvs_speed [--quick]``.

Network: the published ``genvs.pt`` layout (``full_config()``: resnet34 encoder, 1024-channel volumes of
16 features x 64 depth planes at 128 px, 64 + 64 samples per ray on a 64-px render, the 115M-parameter
``image_v1`` denoiser at 128 px). ``--quick`` uses a reduced network of the same layout (64-px sources,
32-px render, 256-channel volumes, a small denoiser) and fewer frames, so it finishes in minutes on a
CPU. Speed and memory do not depend on the weights' values.

(a) ``sampler_overhead_ratio``: the time of a full sampling (``sampler.sample``: Karras sigmas, Euler
    with churn, noise drawn every step) on an already computed render, divided by the time of the
    denoiser calls it makes, timed inside that same sampling (the denoiser wrapped in a timer), so the
    load of a shared machine affects numerator and denominator alike. ``sampler_overhead_ratio_raw_loop``
    divides by a separate loop of the same number of raw denoiser calls (same shapes and sigmas; runs
    interleaved). Target <= 1.03.
(b) ``render_overhead_ratio``: one feature render (``GeNVS.render``, chunked rays, coarse + importance
    samples) divided by its field evaluations alone (``NeRFField.raw``: grid_sample of every source
    volume + the MLP + the view mean), timed inside that render. ``render_overhead_ratio_raw_loop``
    divides by a separate loop of ``NeRFField.raw`` on as many random points in the same chunks (random
    points sample the volumes less coherently than rays, so that loop is slower). Aim <= 2.
(c) ``ar_cost_growth``: time per generated view late in an autoregressive orbit (the last 4 frames) /
    early (frames 6-9, the first ones whose conditioning set is full: sources + 4 random + the latest).
    The encoder volume cache makes this flat; re-encoding every conditioning view (the published
    script) would not grow either, but costs up to 6 encodes per view. Target <= 1.10.
(d) ``ar_overhead_ratio``: time per generated view in the steady state of an orbit at 25 steps (frames 6
    on) / the sampler alone on an already computed render at 25 steps (the rest is one render from 6
    views and one encode). Target <= 1.10.
(e) Peak memory, each in a fresh subprocess (Linux VmHWM reset through /proc/self/clear_refs after
    building): a 64x64 render from 6 source volumes (``memory_render_6views``: what the render adds on
    top of the model and the volumes, which are listed separately), and one sampling step (one denoiser
    call at 128 px, or the quick network's size) at batch 1 and 4. On CUDA, ``max_memory_allocated``.

Times are the process's CPU time when running on the CPU with one thread (the default), so other jobs on a
shared machine do not enter the ratios; wall time otherwise. Prints the measurements and ends with one
JSON line.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from nvs_core.cameras import orbit as orbit_cameras
from nvs_core.genvs import build_genvs, full_config, tiny_config
from nvs_core.genvs.cameras import GeNVSCameras, circle_path, to_genvs
from nvs_core.genvs.nerf import DEFAULT_RENDER_MEMORY_MB, SourceViews, rays_per_chunk
from nvs_core.genvs.orbit import autoregressive_orbit
from nvs_core.genvs.sampler import BatchNoise, karras_sigmas, sample
from bench.vivid_speed import _reset_peak, _rss_kib
from nvs_core.progress import silent_progress

AR_STEPS = 25
# The clock: on the CPU the process's CPU time (one thread), so the load of other jobs on a shared machine
# does not enter the ratios; on CUDA wall time around synchronised calls. Set in main().
CLOCK = time.perf_counter
RADIUS = 1.3                        # SRN-like cameras: the scene fills the cube [-1, 1]^3
FOV = math.radians(52.0)


def config(quick: bool):
    if not quick:
        return full_config()
    return tiny_config(image_size=64, render_size=32, decoder_channels=256, color_feat_dim=16, mapping_out=128,
                       channels=(64, 128, 128), self_attn=(False, False, True))


def build(quick: bool, device="cpu"):
    torch.manual_seed(0)
    return build_genvs(config(quick), device=device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    sync(device)
    start = CLOCK()
    fn()
    sync(device)
    return CLOCK() - start


class Timed:
    """A callable whose calls are timed (synchronised on CUDA)."""

    def __init__(self, fn, device="cpu"):
        self.fn, self.device = fn, device
        self.seconds, self.calls = 0.0, 0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = CLOCK()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        self.seconds += CLOCK() - start
        self.calls += 1
        return out


def sources(model, views: int, seed: int = 0):
    """``views`` random source images on an orbit, encoded: (SourceViews, GeNVSCameras, images)."""
    device = next(model.parameters()).device
    cfg = model.config
    g = to_genvs(orbit_cameras(views, 0.3, 0.0, 2 * math.pi * (1 - 1 / max(views, 1)), RADIUS, FOV, 64, 64),
                 cfg.render_size)
    images = torch.rand(views, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        vols = model.encode(images.to(device))
    return SourceViews(vols[None], g.poses[None].to(device), g.camera_k), g, images


def target(model, azimuth: float = 0.5) -> GeNVSCameras:
    return to_genvs(orbit_cameras(1, 0.4, azimuth, 1.0, RADIUS, FOV, 64, 64), model.config.render_size)


def render(model, src, tgt, size=None, seed=0):
    device = src.volumes.device
    with torch.inference_mode():
        return model.render(src, tgt.poses[None].to(device), tgt.intrinsics, size=size,
                            generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ (a) sampler
def sampler_overhead(model, steps: int, repeats: int, batch: int = 1):
    device = next(model.parameters()).device
    src, _, _ = sources(model, 1)
    f, _, _ = render(model, src, target(model))
    cond = model.condition(f[0]).expand(batch, -1, -1, -1).contiguous()
    d = model.config.denoiser
    sigmas = karras_sigmas(steps, d.sigma_min, d.sigma_max).to(device)
    gamma = 0.4                     # stochastic mode: churn 0.4 per step (below the sqrt 2 - 1 cap)
    x = torch.randn(batch, 3, *cond.shape[-2:], device=device)

    def full(denoiser):
        with torch.inference_mode():
            sample(denoiser, cond, steps, True, d.sigma_min, d.sigma_max, BatchNoise(0), progress=silent_progress)

    def raw():
        with torch.inference_mode():
            for i in range(steps):
                s = (sigmas[i] * (gamma + 1)).expand(batch)
                model.ddpm_pipeline(x, s, unet_cond=cond)

    with torch.inference_mode():
        model.ddpm_pipeline(x, sigmas[:1].expand(batch), unet_cond=cond)      # warm-up
    full_times, raw_times, inside = [], [], []
    for _ in range(repeats):
        raw_times.append(timed(raw, device))
        wrapped = Timed(model.ddpm_pipeline, device)
        full_times.append(timed(lambda: full(wrapped), device))
        assert wrapped.calls == steps, wrapped.calls
        inside.append(wrapped.seconds)
    return {"steps": steps, "batch": batch, "full_s": [round(t, 3) for t in full_times],
            "raw_s": [round(t, 3) for t in raw_times], "in_denoiser_s": [round(t, 3) for t in inside],
            "ratio_raw_loop": sum(full_times) / sum(raw_times), "ratio": sum(full_times) / sum(inside)}


# ------------------------------------------------------------------------------------------ (b) render
def render_overhead(model, views: int, repeats: int):
    device = next(model.parameters()).device
    src, _, _ = sources(model, views)
    tgt = target(model)
    field = model.nerf
    n = model.config.nerf
    S = model.config.render_size
    rays = S * S
    chunk = rays_per_chunk(field, views, DEFAULT_RENDER_MEMORY_MB, n.num_steps, n.upsample_steps)
    g = torch.Generator().manual_seed(2)
    pts = [(torch.rand(1, min(chunk, rays - a), n.num_steps, 3, generator=g) * 2 - 1).to(device)
           for a in range(0, rays, chunk)]
    pts_fine = [(torch.rand(p.shape[0], p.shape[1], n.upsample_steps, 3, generator=g) * 2 - 1).to(device)
                for p in pts]

    def raw():
        with torch.inference_mode():
            for a, b in zip(pts, pts_fine):
                field.raw(a, src)
                field.raw(b, src)

    render(model, src, tgt)                                             # warm-up
    render_times, raw_times, inside = [], [], []
    for _ in range(repeats):
        raw_times.append(timed(raw, device))
        wrapped = Timed(field.raw, device)
        field.raw = wrapped                                             # instance attribute: render_rays calls it
        try:
            render_times.append(timed(lambda: render(model, src, tgt), device))
        finally:
            del field.raw
        assert wrapped.calls == 2 * len(pts), (wrapped.calls, len(pts))
        inside.append(wrapped.seconds)
    return {"views": views, "render_size": S, "samples_per_ray": n.num_steps + n.upsample_steps,
            "rays_per_chunk": chunk, "chunks": len(pts), "render_s": [round(t, 3) for t in render_times],
            "field_raw_s": [round(t, 3) for t in raw_times], "field_in_render_s": [round(t, 3) for t in inside],
            "ratio_raw_loop": sum(render_times) / sum(raw_times), "ratio": sum(render_times) / sum(inside)}


# ------------------------------------------------------------------------------------------ (c, d) orbit
def orbit_times(model, frames: int, steps: int):
    """Seconds per generated view of an autoregressive orbit on the published circle (1 source)."""
    _, g, images = sources(model, 1)
    path = circle_path(g.poses[0], frames + 1)[1:]
    path = GeNVSCameras(path, g.intrinsics, g.camera_k, g.render_size)
    stamps = [CLOCK()]
    device = next(model.parameters()).device

    def tick(q, info):
        sync(device)
        stamps.append(CLOCK())

    with torch.inference_mode():
        out = autoregressive_orbit(model, images, g, path, steps=steps, seed=0, progress=silent_progress,
                                   callback=tick)
    per_view = [b - a for a, b in zip(stamps, stamps[1:])]
    return per_view, out["stats"]


def sampler_alone(model, steps: int, repeats: int) -> float:
    device = next(model.parameters()).device
    src, _, _ = sources(model, 1)
    f, _, _ = render(model, src, target(model))
    cond = model.condition(f[0])
    d = model.config.denoiser

    def run():
        with torch.inference_mode():
            sample(model.ddpm_pipeline, cond, steps, True, d.sigma_min, d.sigma_max, BatchNoise(0),
                   progress=silent_progress)

    return min(timed(run, device) for _ in range(repeats))


# ------------------------------------------------------------------------------------------ (e) memory
def child_memory(kind: str, quick: bool) -> dict:
    """In a fresh process: what one render (6 views, 64x64) or one sampling step (batch 1 or 4) adds."""
    model = build(quick)
    cfg = model.config
    if kind == "render":
        src, _, _ = sources(model, 6)
        tgt = target(model)
        extra = {"volumes_mib": round(src.volumes.numel() * src.volumes.element_size() / 2 ** 20, 1), "size": 64,
                 "views": 6, "render_memory_mb_budget": DEFAULT_RENDER_MEMORY_MB}
        run = lambda: render(model, src, tgt, size=64)                          # noqa: E731
    else:
        batch = int(kind[len("step"):])
        S = cfg.diffusion_size
        x = torch.randn(batch, 3, S, S)
        cond = torch.rand(batch, cfg.nerf.color_feat_dim, S, S)
        sigma = torch.full((batch,), 1.0)
        extra = {"batch": batch, "size": S}

        def run():
            with torch.inference_mode():
                model.ddpm_pipeline(x, sigma, unet_cond=cond)
    build_peak = _rss_kib()["VmHWM"]
    reset = _reset_peak()
    before = _rss_kib()["VmRSS"]
    seconds = timed(run)
    peak = _rss_kib()["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, **extra, "resident_mib": round(before / 1024, 1),
            "build_peak_mib": round(build_peak / 1024, 1),
            "peak_mib": round(peak / 1024, 1), "delta_mib": round((peak - before) / 1024, 1), "peak_reset": reset,
            "seconds": round(seconds, 2)}


def memory_in_subprocess(kind: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.genvs_speed", "--child-memory", kind,
           "--threads", str(torch.get_num_threads())] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_memory(quick: bool) -> dict:
    model = build(quick, "cuda")
    out = {}
    src, _, _ = sources(model, 6)
    tgt = target(model)
    render(model, src, tgt, size=64)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    render(model, src, tgt, size=64)
    out["render_6views_delta_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2 ** 20, 1)
    S = model.config.diffusion_size
    for batch in (1, 4):
        x = torch.randn(batch, 3, S, S, device="cuda")
        cond = torch.rand(batch, model.config.nerf.color_feat_dim, S, S, device="cuda")
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model.ddpm_pipeline(x, torch.ones(batch, device="cuda"), unet_cond=cond)
        out[f"step_batch{batch}_delta_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2 ** 20, 1)
    return out


# ------------------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced network and fewer frames (same fields)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared CPU)")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.threads == 1 and not torch.cuda.is_available() else time.perf_counter
    if args.child_memory is not None:
        print(json.dumps(child_memory(args.child_memory, args.quick)))
        return
    quick = args.quick
    started = time.perf_counter()

    # (e) memory first, in fresh subprocesses, while this process is still small
    memory = {kind: memory_in_subprocess(kind, quick) for kind in ("render", "step1", "step4")}
    m = memory["render"]
    print(f"(e) 64x64 render from 6 views: volumes {m['volumes_mib']:.0f} MiB, render adds {m['delta_mib']:.0f} MiB "
          f"(model + volumes resident {m['resident_mib']:.0f} MiB, peak {m['peak_mib']:.0f} MiB, "
          f"{m['seconds']:.1f} s)")
    for kind in ("step1", "step4"):
        m = memory[kind]
        print(f"(e) one sampling step at batch {m['batch']} ({m['size']} px): adds {m['delta_mib']:.0f} MiB "
              f"(resident {m['resident_mib']:.0f} MiB, {m['seconds']:.2f} s)")

    model = build(quick)
    sampler_steps = 8 if quick else 4
    repeats = 3 if quick else 2
    a = sampler_overhead(model, sampler_steps, repeats)
    print(f"(a) sampler: {a['steps']} steps, full {sum(a['full_s']) / repeats:.2f} s, of which "
          f"{sum(a['in_denoiser_s']) / repeats:.2f} s in the denoiser -> ratio {a['ratio']:.4f} (target <= 1.03); "
          f"separate raw loop {sum(a['raw_s']) / repeats:.2f} s -> {a['ratio_raw_loop']:.4f}")
    b = render_overhead(model, 2, repeats)
    print(f"(b) render {b['render_size']}px from {b['views']} views ({b['samples_per_ray']} samples/ray, "
          f"{b['chunks']} chunks): {sum(b['render_s']) / repeats:.2f} s, of which "
          f"{sum(b['field_in_render_s']) / repeats:.2f} s in the field -> ratio {b['ratio']:.3f} (aim <= 2); "
          f"separate field loop {sum(b['field_raw_s']) / repeats:.2f} s -> {b['ratio_raw_loop']:.3f}")

    frames = 20 if quick else 13
    growth_steps = 2
    per_view, stats = orbit_times(model, frames, growth_steps)
    early, late = per_view[5:9], per_view[-4:]
    growth = (sum(late) / len(late)) / (sum(early) / len(early))
    print(f"(c) orbit of {frames} frames at {growth_steps} steps: early (frames 6-9) "
          f"{sum(early) / len(early):.2f} s/view, late (last 4) {sum(late) / len(late):.2f} s/view -> growth "
          f"{growth:.3f} (target <= 1.10); encoder calls {stats.encoded} views")

    ar_frames = 8 if quick else 7
    ar_per_view, _ = orbit_times(model, ar_frames, AR_STEPS)
    steady = ar_per_view[5:]                     # frames 6 on: full conditioning set (sources + 4 + latest)
    alone = sampler_alone(model, AR_STEPS, 2 if quick else 1)
    ar_ratio = (sum(steady) / len(steady)) / alone
    print(f"(d) orbit at {AR_STEPS} steps: {sum(steady) / len(steady):.2f} s per view (frames 6-{ar_frames}) vs "
          f"sampler alone {alone:.2f} s -> ratio {ar_ratio:.3f} (target <= 1.10)")

    cuda = cuda_memory(quick) if torch.cuda.is_available() else None
    result = {
        "bench": "genvs_speed", "quick": quick, "threads": torch.get_num_threads(),
        "clock": "process CPU time" if CLOCK is time.process_time else "wall time",
        "network": "reduced (quick)" if quick else "full (genvs.pt layout)",
        "sampler_overhead_ratio": round(a["ratio"], 4),
        "sampler_overhead_ratio_raw_loop": round(a["ratio_raw_loop"], 4), "sampler_target_met": a["ratio"] <= 1.03,
        "render_overhead_ratio": round(b["ratio"], 3), "render_overhead_ratio_raw_loop": round(b["ratio_raw_loop"], 3),
        "ar_cost_growth": round(growth, 3), "ar_growth_target_met": growth <= 1.10,
        "ar_overhead_ratio": round(ar_ratio, 3), "ar_overhead_target_met": ar_ratio <= 1.10,
        "memory_render_6views_mib": memory["render"]["delta_mib"], "memory_volumes_6views_mib":
            memory["render"]["volumes_mib"], "memory_step_batch1_mib": memory["step1"]["delta_mib"],
        "memory_step_batch4_mib": memory["step4"]["delta_mib"],
        "sampler": a, "render": b, "orbit_seconds_per_view": [round(t, 3) for t in per_view],
        "orbit_25_steps_seconds_per_view": [round(t, 3) for t in ar_per_view], "sampler_alone_25_steps_s":
            round(alone, 3), "memory": memory, "cuda": cuda, "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
