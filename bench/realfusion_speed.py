"""RealFusion speed: SDS step overhead, occupancy skipping, hash-grid throughput, training-step memory, mesh export.

Run from the repository root: ``python -m bench.realfusion_speed [--quick]``.

(a) ``sds_step_ratio``: one full SDS iteration (synthetic render in the training path, resize + VAE encode with
    gradient, the batched CFG UNet call [uncond, cond], the SDS gradient and one backward through encoder and
    render) divided by the same parts timed separately in the same run: render + encode forward and backward
    (a plain surrogate loss at the latents, no UNet) plus the UNet call alone. Interleaved repeats, medians.
    ``--quick``: tiny random SD components, a tiny field, 32 px render, 64 px SDS resolution; full: a random
    full-size SD 1.5 UNet + VAE (shipped configs), the published field, a 96 px render and 512 px SDS.
    Target <= 1.15.
(b) ``occupancy_sample_ratio``: samples evaluated with the occupancy grid / without it, over evaluation
    renders of 8 held-out views of a field fitted to a procedural object (the demo's recipe, fewer steps in
    ``--quick``). Aim <= 0.3.
(c) ``grid_points_per_s``: the full-size tiled grid (16 levels, 2^16 rows, finest 1537) forward + backward.
(d) ``train_step_peak_mb`` (full run only): peak memory added by one full-size training step at the published
    sizes (96 px synthetic view, SDS at 512 px through a random SD 1.5 UNet + VAE, 4096 input rays), in a fresh
    process (CPU: VmHWM after resetting it; CUDA: max_memory_allocated).
(e) ``mesh_seconds``: mesh export of the fitted field (density grid, marching cubes, cleanup, vertex colours) at
    256^3 (64^3 in ``--quick``).

Prints the parts and ends with one JSON line.
"""
import json
import statistics
import subprocess
import sys
import time

import torch

from bench.peak_memory import peak_reset, peak_since
from nvs_core.progress import Progress


def _quiet(total, desc=""):
    return Progress(total, desc)




def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ models

def sd_backend(full: bool, device):
    """(backend, context width): random full-size SD 1.5 UNet + VAE, or the tiny test components."""
    from nvs_core.sd.diffusers_backend import DiffusersSDBackend

    if not full:
        from nvs_core.sd.tiny import tiny_backend

        return tiny_backend().to(device), 32
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nvs_core.sd.diffusers_backend import CONFIG_DIR

    folder = CONFIG_DIR / "sd15"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = unet.to(device, dtype).train(False).requires_grad_(False)
    vae = vae.to(device, dtype).train(False).requires_grad_(False)
    return DiffusersSDBackend(unet, None, None, vae), 768


def make_field(full: bool, device):
    from nvs_core.realfusion import FieldConfig, RealFusionField

    torch.manual_seed(0)
    cfg = FieldConfig(grid_levels_mask=0) if full else FieldConfig(
        grid_levels=4, grid_resolution=64, log2_hashmap_size=12, hidden_dim=16, hidden_dim_bg=16, grid_levels_mask=0)
    field = RealFusionField(cfg).to(device)
    field.update_occupancy(jitter=False)  # the blob fills the centre
    return field.train(True)


# ------------------------------------------------------------------------------ (a) SDS step ratio

def sds_ratio(full: bool, device, repeats: int):
    from nvs_core.realfusion.cameras import RandomSource, sample_training_view
    from nvs_core.realfusion.renderer import render_rays
    from nvs_core.realfusion.sds import SDSConfig, SDSGuidance, TextConditioning

    backend, width = sd_backend(full, device)
    field = make_field(full, device)
    size, resolution = (96, 512) if full else (32, 64)
    text = TextConditioning(torch.randn(6, 77, width, device=device), torch.randn(1, 77, width, device=device))
    guidance = SDSGuidance(backend, text, SDSConfig(resolution=resolution), device)
    source = RandomSource(0, device=device)
    view = sample_training_view(source, size, size)
    o, d = view["rays_o"][0].to(device), view["rays_d"][0].to(device)
    light = torch.tensor([0.0, 0.0, 1.0], device=device)
    g = torch.Generator().manual_seed(0)

    def render():
        out = render_rays(field, o, d, mode="train", shading="albedo", perturb=False, light_d=light, normals=False,
                          smooth_loss=False)
        return out["image"].reshape(1, size, size, 3).permute(0, 3, 1, 2)

    def full_iteration():
        field.zero_grad(set_to_none=True)
        step = guidance.step(render(), 0, generator=g, t=500)
        step.surrogate.backward()
        _sync(device)

    fixed = torch.randn(1, 4, resolution // 8 if full else resolution // 2, resolution // 8 if full else resolution // 2,
                        generator=torch.Generator().manual_seed(1)).to(device)

    def render_encode_backward():
        field.zero_grad(set_to_none=True)
        latents = guidance.encode(render(), g)
        (latents * fixed).sum().backward()
        _sync(device)

    def unet_alone():
        with torch.no_grad():
            backend.predict_noise(fixed, torch.full((1,), 500.0, device=device), text.cond[:1], text.uncond, 100.0)
        _sync(device)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for fn in (full_iteration, render_encode_backward, unet_alone):  # warm-up
        fn()
    whole, parts_a, parts_b = [], [], []
    for _ in range(repeats):
        whole.append(timed(full_iteration))
        parts_a.append(timed(render_encode_backward))
        parts_b.append(timed(unet_alone))
    t_whole = statistics.median(whole)
    t_parts = statistics.median(parts_a) + statistics.median(parts_b)
    print(f"(a) SDS iteration {t_whole * 1000:.1f} ms; parts: render+encode fwd/bwd "
          f"{statistics.median(parts_a) * 1000:.1f} ms + UNet (CFG batch 2) {statistics.median(parts_b) * 1000:.1f} ms")
    return t_whole / t_parts, {"sds_iteration_ms": round(t_whole * 1000, 2), "sds_parts_ms": round(t_parts * 1000, 2)}


# ------------------------------------------------------------------------------ (b) occupancy, (e) mesh

def fitted_field(quick: bool):
    from nvs_core.procedural import make_scene, render_multiview
    from nvs_core.realfusion import FieldConfig, RealFusionField
    from nvs_core.realfusion.demo import DEMO_FIELD, SCENE_SCALE, demo_cameras
    from nvs_core.realfusion.training import TrainConfig, train

    train_cams, test_cams = demo_cameras(24 if quick else 48)
    scene = make_scene(3)
    views = render_multiview(scene, train_cams, background=(1.0, 1.0, 1.0))
    torch.manual_seed(3)
    field = RealFusionField(FieldConfig(**DEMO_FIELD))
    cfg = TrainConfig(preset="fixed", iters=48 if quick else 120, lr=1e-2, seed=3, multiview_rays=512 if quick else 1024,
                      scene_scale=SCENE_SCALE, max_steps=256, preview_every=0, checkpoint_every=0, grid_levels_mask=0)
    train(field, multiview=views, config=cfg, progress=_quiet)
    return field, test_cams


def occupancy_ratio(field, test_cams):
    from nvs_core.realfusion.cameras import nvs_rays_to_realfusion
    from nvs_core.realfusion.demo import SCENE_SCALE, scaled
    from nvs_core.realfusion.renderer import render_rays

    cams = scaled(test_cams, SCENE_SCALE)
    o, d = cams.rays(cams.height, cams.width, dtype=torch.float32)
    o, d = nvs_rays_to_realfusion(o.reshape(-1, 3), d.reshape(-1, 3))
    counts = {}
    for use in (True, False):
        with torch.no_grad():
            out = render_rays(field, o, d, mode="eval", bg_color=1.0, normals=False, use_occupancy=use,
                              ray_batch=o.shape[0])
        counts[use] = out["samples"]
    rays = o.shape[0]
    print(f"(b) samples per ray: {counts[True] / rays:.1f} with the occupancy grid, {counts[False] / rays:.1f} "
          f"without ({field.occupancy_fraction() * 100:.1f}% of cells occupied)")
    return counts[True] / counts[False], {"samples_per_ray_occupancy": round(counts[True] / rays, 2),
                                          "samples_per_ray_dense": round(counts[False] / rays, 2)}


def mesh_time(field, resolution):
    from nvs_core.realfusion.mesh import extract_mesh

    t = time.perf_counter()
    mesh = extract_mesh(field, resolution)
    seconds = time.perf_counter() - t
    print(f"(e) mesh export at {resolution}^3: {seconds:.1f} s, {len(mesh.faces)} faces")
    return seconds


# ------------------------------------------------------------------------------ (c) grid throughput

def grid_throughput(device, points: int, repeats: int):
    from nvs_core.realfusion import FieldConfig, RealFusionField

    torch.manual_seed(0)
    encoder = RealFusionField(FieldConfig()).encoder.to(device)
    x = (torch.rand(points, 3, device=device) * 2 - 1) * 0.75
    grad = torch.randn(points, encoder.output_dim, device=device)
    times = []
    for i in range(repeats + 1):
        encoder.zero_grad(set_to_none=True)
        _sync(device)
        t = time.perf_counter()
        encoder(x, bound=0.75).backward(grad)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    rate = points / statistics.median(times)
    print(f"(c) full-size grid forward+backward: {rate / 1e6:.2f} M points/s ({points} points)")
    return rate


# ------------------------------------------------------------------------------ (d) training-step memory

def child_memory() -> dict:
    """One full-size training step at the published sizes, in this (fresh) process."""
    from nvs_core.realfusion.cameras import InputView
    from nvs_core.realfusion.sds import SDSConfig, SDSGuidance, TextConditioning
    from nvs_core.realfusion.training import TrainConfig, train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend, width = sd_backend(True, device)
    field = make_field(True, device)
    text = TextConditioning(torch.randn(6, 77, width, device=device), torch.randn(1, 77, width, device=device))
    guidance = SDSGuidance(backend, text, SDSConfig(), device)
    rgba = torch.rand(InputView().size, InputView().size, 4)
    rgba[..., 3] = 0
    rgba[32:96, 32:96, 3] = 1
    cfg = TrainConfig(iters=1, occupancy_every=1, preview_every=0, checkpoint_every=0)
    base = peak_reset(device)
    t = time.perf_counter()
    train(field, rgba=rgba, guidance=guidance, config=cfg, device=device, progress=_quiet)
    return {"train_step_peak_mb": round(peak_since(base, device) / 2 ** 20, 1),
            "train_step_seconds": round(time.perf_counter() - t, 2), "device": device.type}


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny SD and field, fewer repeats, 64^3 mesh")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    if args.child_memory:
        print(json.dumps(child_memory()))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"quick": args.quick, "device": device.type}
    ratio, extra = sds_ratio(not args.quick, device, 3 if args.quick else 5)
    result["sds_step_ratio"] = round(ratio, 3)
    result.update(extra)
    result["grid_points_per_s"] = round(grid_throughput(device, 1 << (15 if args.quick else 18), 2 if args.quick else 5))
    field, test_cams = fitted_field(args.quick)
    occ, extra = occupancy_ratio(field, test_cams)
    result["occupancy_sample_ratio"] = round(occ, 4)
    result.update(extra)
    result["mesh_resolution"] = 64 if args.quick else 256
    result["mesh_seconds"] = round(mesh_time(field, result["mesh_resolution"]), 2)
    if not args.quick:
        out = subprocess.run([sys.executable, "-m", "bench.realfusion_speed", "--child-memory"], capture_output=True,
                             text=True, check=True)
        memory = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"(d) one full-size training step ({memory['device']}): peak +{memory['train_step_peak_mb']} MB, "
              f"{memory['train_step_seconds']} s")
        result.update(memory)
    print(f"sds_step_ratio {result['sds_step_ratio']} (target <= 1.15), occupancy_sample_ratio "
          f"{result['occupancy_sample_ratio']} (aim <= 0.3)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
