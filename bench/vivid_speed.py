"""VIVID sampling speed and memory at the published sizes (random weights).

Run from the repository root: ``python -m bench.vivid_speed [--quick]``.

Nets: ``VIVID_PRESETS`` vivid-base + vivid-uncond (64 px, autoguidance 1.5) and vivid-sr (64 -> 256 px),
random weights (speed and memory do not depend on the values).

(a) Sampler overhead: the time of a full autoguided sampling with SR (``sampler.generate_views``) divided
    by the time of exactly the network evaluations it makes (2 N - 1 calls of base, guidance and SR net
    each for N steps), both measured in this run. Two estimates: ``overhead_ratio`` times every network
    call inside the sampling itself (the nets wrapped in a timer), so the machine's load, which drifts
    on a shared box, affects numerator and denominator alike; ``overhead_ratio_raw_loop`` compares with
    a separate loop calling the nets directly on the same inputs (interleaved runs). Target <= 1.03.
(b) Peak memory of base + SR sampling at batch 1 and 4. On the CPU each batch runs in a fresh
    subprocess (started before this process builds any net): RSS with the nets built, then the peak RSS
    during one sampling (Linux ``/proc/self/status`` VmHWM after resetting it through
    ``/proc/self/clear_refs``; elsewhere ``getrusage().ru_maxrss``, which then includes the build). The
    difference is what sampling adds (activations). tracemalloc does not see torch's allocations, and
    ``ru_maxrss`` is inherited across fork/exec, hence fresh processes and VmHWM. On CUDA:
    ``torch.cuda.max_memory_allocated`` around the sampling, in process.
(c) Throughput in images per minute (full pipeline with SR) at batch 1 and 4 on the CPU, and on CUDA
    (when present) in fp16 (the nets' published float16 path) and bf16 (autocast). Measured at the
    steps used here and extrapolated to the published 32 steps (time x 63 / (2 N - 1): every step but
    the last calls the nets twice).

Prints ratios and ends with one JSON line.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from nvs_core.progress import silent_progress
from nvs_core.vivid import sampler as vs
from nvs_core.vivid.loading import VIVID_PRESETS, build_vivid_network

PUBLISHED_STEPS = 32
GUIDANCE = 1.5


def evaluations(steps: int) -> int:
    """Network calls per net in an N-step Heun sampling (the last step is Euler)."""
    return 2 * steps - 1


def build_nets(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    nets = {}
    for role, preset in (("base", "vivid-base"), ("guidance", "vivid-uncond"), ("sr", "vivid-sr")):
        net = build_vivid_network(VIVID_PRESETS[preset], device=device).to(dtype)
        net.use_fp16 = dtype == torch.float16  # fp16: the published CUDA float16 path; else float32 activations
        nets[role] = net
    return nets


def make_inputs(nets, batch: int, device="cpu"):
    g = torch.Generator().manual_seed(1)
    res, sr_res = nets["base"].img_resolution, nets["sr"].img_resolution
    return {
        "src": torch.randint(0, 256, (batch, 3, res, res), generator=g).float(),
        "labels": torch.randn(batch, 20, generator=g),
        "sr_src": torch.randint(0, 256, (batch, 3, sr_res, sr_res), generator=g).float(),
        "sr_labels": torch.randn(batch, 20, generator=g),
        "seeds": list(range(batch)),
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TimedNet:
    """A net whose calls are timed (synchronised on CUDA); everything else is the net's."""

    def __init__(self, net):
        self.net = net
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, *args, **kwargs):
        device = next(self.net.parameters()).device
        sync(device)
        start = time.perf_counter()
        out = self.net(*args, **kwargs)
        sync(device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def full_sampling(nets, inputs, steps: int, autocast_dtype=None):
    device = next(nets["base"].parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                                enabled=autocast_dtype is not None):
        out = vs.generate_views(nets["base"], inputs["src"], inputs["labels"], inputs["seeds"], gnet=nets["guidance"],
                                guidance=GUIDANCE, num_steps=steps, max_batch_size=len(inputs["seeds"]),
                                sr_net=nets["sr"], sr_src_pixels=inputs["sr_src"], sr_labels=inputs["sr_labels"],
                                progress=silent_progress)
    sync(device)
    return out


def raw_evaluations(nets, inputs, steps: int, autocast_dtype=None) -> None:
    """The same network calls as ``full_sampling`` (count, shapes, argument kinds), without the sampler."""
    device = next(nets["base"].parameters()).device
    n = len(inputs["seeds"])
    res, sr_res = nets["base"].img_resolution, nets["sr"].img_resolution
    src = vs.encode_pixels(inputs["src"].to(device))
    sr_src = vs.encode_pixels(inputs["sr_src"].to(device))
    labels, sr_labels = inputs["labels"].to(device), inputs["sr_labels"].to(device)
    x = torch.randn(n, 3, res, res, device=device)
    x_sr = torch.randn(n, 3, sr_res, sr_res, device=device)
    cond = torch.randn(n, 3, sr_res, sr_res, device=device)
    t_steps = vs.edm_time_steps(steps, device=device)
    sigmas = []  # the noise levels edm_sampler evaluates at: t_i, then t_{i+1} for the Heun correction
    for i in range(steps):
        sigmas += [t_steps[i]] + ([t_steps[i + 1]] if i < steps - 1 else [])
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                                enabled=autocast_dtype is not None):
        for t in sigmas:
            nets["base"](src, x, t, labels)
            nets["guidance"](src, x, t, None)
        for t in sigmas:
            nets["sr"](sr_src, x_sr, t, sr_labels, conditioning_image=cond)
    sync(device)


def warm_up(nets, inputs) -> None:
    """One call of each net at the benchmark's shapes (allocator, kernel selection)."""
    with torch.inference_mode():
        src = vs.encode_pixels(inputs["src"])
        sr_src = vs.encode_pixels(inputs["sr_src"])
        t = torch.tensor(1.0)
        nets["base"](src, torch.randn_like(src), t, inputs["labels"])
        nets["guidance"](src, torch.randn_like(src), t, None)
        cond = torch.randn_like(sr_src)
        nets["sr"](sr_src, torch.randn_like(sr_src), t, inputs["sr_labels"], conditioning_image=cond)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_minute(batch: int, seconds: float, steps: int) -> dict:
    at_32 = seconds * evaluations(PUBLISHED_STEPS) / evaluations(steps)
    return {"images_per_min": round(60 * batch / seconds, 3),
            "images_per_min_at_32_steps": round(60 * batch / at_32, 4)}


# ------------------------------------------------------------------------------------------ memory child
def _rss_kib() -> dict:
    """Current and peak resident set size of this process (KiB): /proc/self/status VmRSS and VmHWM (Linux),
    else ``ru_maxrss`` for both."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return {k: int(v.split()[0]) for k, v in fields.items()}
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"VmRSS": peak, "VmHWM": peak}


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_memory(batch: int, steps: int) -> dict:
    """Run in a fresh process: RSS with the nets built, and the peak during one full sampling at ``batch``.

    The peak is reset after building (building has its own transient peak), so ``sampling_delta_mib``
    is what sampling adds on top of the resident nets.
    """
    nets = build_nets()
    inputs = make_inputs(nets, batch)
    build_peak = _rss_kib()["VmHWM"]
    reset = _reset_peak()
    before = _rss_kib()["VmRSS"]
    seconds = timed(lambda: full_sampling(nets, inputs, steps))
    peak = _rss_kib()["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"batch": batch, "steps": steps, "nets_mib": round(before / 1024, 1),
            "build_peak_mib": round(build_peak / 1024, 1), "peak_mib": round(peak / 1024, 1),
            "sampling_delta_mib": round((peak - before) / 1024, 1), "peak_reset": reset,
            "seconds": round(seconds, 2)}


def memory_in_subprocess(batch: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "bench.vivid_speed", "--child-memory", str(batch), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ CUDA
def cuda_runs(steps: int, batches) -> dict:
    results = {}
    for name, dtype, autocast_dtype in (("fp16", torch.float16, None), ("bf16", torch.bfloat16, torch.bfloat16)):
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            results[name] = "bf16 not supported on this GPU"
            continue
        nets = build_nets("cuda", dtype)
        entry = {}
        for batch in batches:
            inputs = make_inputs(nets, batch)
            full_sampling(nets, inputs, 2, autocast_dtype)  # warm-up (kernels, allocator)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            seconds = timed(lambda: full_sampling(nets, inputs, steps, autocast_dtype))
            entry[f"batch{batch}"] = {"seconds": round(seconds, 3), **per_minute(batch, seconds, steps),
                                      "nets_mib": round(before / 2 ** 20, 1),
                                      "peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)}
        raw = timed(lambda: raw_evaluations(nets, make_inputs(nets, 1), steps, autocast_dtype))
        full = timed(lambda: full_sampling(nets, make_inputs(nets, 1), steps, autocast_dtype))
        entry["overhead_ratio_raw_loop"] = round(full / raw, 4)
        results[name] = entry
        del nets
        torch.cuda.empty_cache()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 steps, one repeat (same fields)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps for (a) and the batch-1 throughput (default 2 quick, 4 full)")
    parser.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 4)
    if args.child_memory is not None:
        print(json.dumps(child_memory(args.child_memory, steps)))
        return
    repeats = 1 if args.quick else 2
    memory_steps = 2  # the peak is reached within the first evaluations; more steps only take longer

    started = time.perf_counter()
    # Memory first, in fresh subprocesses, while this process is still small.
    memory = {f"batch{b}": memory_in_subprocess(b, memory_steps) for b in (1, 4)}
    for key, m in memory.items():
        print(f"(b) CPU {key}: nets {m['nets_mib']:.0f} MiB RSS (building peaked at {m['build_peak_mib']:.0f}), "
              f"sampling peak {m['peak_mib']:.0f} MiB = nets + {m['sampling_delta_mib']:.0f} MiB "
              f"({m['steps']} steps in {m['seconds']:.1f} s)")
    ratio_4_1 = memory["batch4"]["sampling_delta_mib"] / max(memory["batch1"]["sampling_delta_mib"], 1.0)
    print(f"    sampling memory batch 4 / batch 1: {ratio_4_1:.2f}")

    nets = build_nets()
    inputs = make_inputs(nets, 1)
    warm_up(nets, inputs)
    raw_times, full_times, in_nets, calls = [], [], [], 0
    timed_nets = {role: TimedNet(net) for role, net in nets.items()}
    for _ in range(repeats):  # interleaved, so drifting machine load affects both alike
        raw_times.append(timed(lambda: raw_evaluations(nets, inputs, steps)))
        for t in timed_nets.values():
            t.seconds, t.calls = 0.0, 0
        full_times.append(timed(lambda: full_sampling(timed_nets, inputs, steps)))
        in_nets.append(sum(t.seconds for t in timed_nets.values()))
        calls = sum(t.calls for t in timed_nets.values())
    assert calls == 3 * evaluations(steps), calls  # the sampler made exactly the evaluations counted
    overhead = sum(full_times) / sum(in_nets)
    overhead_raw = sum(full_times) / sum(raw_times)
    full_best = min(full_times)
    del nets, timed_nets
    print(f"(a) sampler overhead, base+guidance 64 px + SR 256 px, batch 1, {steps} steps "
          f"({evaluations(steps)} calls per net): full sampling {sum(full_times) / repeats:.2f} s, of which "
          f"{sum(in_nets) / repeats:.2f} s in the nets -> ratio {overhead:.4f} (target <= 1.03); "
          f"separate raw loop {sum(raw_times) / repeats:.2f} s -> ratio {overhead_raw:.4f}")

    # Throughput: both batches from the memory subprocesses (same steps, fresh processes); batch 1 also
    # from the overhead run.
    throughput = {key: {"steps": m["steps"], "seconds": m["seconds"],
                        **per_minute(m["batch"], m["seconds"], m["steps"])} for key, m in memory.items()}
    throughput["batch1_overhead_run"] = {"steps": steps, "seconds": round(full_best, 2),
                                         **per_minute(1, full_best, steps)}
    for key, t in throughput.items():
        print(f"(c) CPU {key}: {t['images_per_min']:.3f} images/min at {t['steps']} steps, "
              f"~{t['images_per_min_at_32_steps']:.4f} images/min at 32 steps (estimated)")
    speedup = throughput["batch4"]["images_per_min"] / throughput["batch1"]["images_per_min"]
    print(f"    batching speed-up batch 4 / batch 1: x{speedup:.2f}")

    cuda = None
    if torch.cuda.is_available():
        cuda = cuda_runs(PUBLISHED_STEPS if not args.quick else 8, (1, 4))
        for name, entry in cuda.items():
            print(f"(c) CUDA {name}: {json.dumps(entry)}")
    else:
        print("(c) CUDA: not available on this machine")

    result = {
        "bench": "vivid_speed", "quick": args.quick, "threads": torch.get_num_threads(), "steps": steps,
        "repeats": repeats, "overhead_ratio": round(overhead, 4), "overhead_target_met": overhead <= 1.03,
        "overhead_ratio_raw_loop": round(overhead_raw, 4), "full_s": [round(t, 3) for t in full_times],
        "in_nets_s": [round(t, 3) for t in in_nets], "raw_s": [round(t, 3) for t in raw_times],
        "cpu_memory": memory, "activation_ratio_batch4_batch1": round(ratio_4_1, 3),
        "cpu_throughput": throughput, "batching_speedup": round(speedup, 3), "cuda": cuda,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
