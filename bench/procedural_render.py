"""Procedural renderer speed: batched ray casting of a camera batch vs one camera at a time.

Run from the repository root: ``python -m bench.procedural_render [--quick]``.

Prints the ratio baseline/batched (> 1 means batching helps) and the time per 64x64 view relative
to the 16-view budget of one second, both measured in this run. Ends with one JSON line.
"""
import argparse
import json
import math
import time

import torch

from nvs_core.cameras import orbit
from nvs_core.procedural import make_scene, render


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer views and repeats, same fields")
    args = parser.parse_args()
    views, repeats, size = (8, 2, 64) if args.quick else (16, 5, 64)
    scene = make_scene(7, num_objects=4)
    cameras = orbit(views, math.radians(20), 0.0, 2 * math.pi, 2.6, math.radians(45), size, size)
    render(scene, cameras[[0]])  # warm-up
    batched = best_of(lambda: render(scene, cameras), repeats)
    one_by_one = best_of(lambda: [render(scene, cameras[[i]]) for i in range(views)], repeats)
    # Small kernels: on a busy 2-core machine thread hand-offs can dominate, so report 1 thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single_thread = best_of(lambda: render(scene, cameras), repeats)
    torch.set_num_threads(threads)
    result = {
        "bench": "procedural_render", "quick": args.quick, "views": views, "size": size,
        "threads": threads,
        "batched_s": round(batched, 4), "one_by_one_s": round(one_by_one, 4),
        "single_thread_s": round(single_thread, 4), "threads_speedup": round(single_thread / batched, 3),
        "batching_speedup": round(one_by_one / batched, 3),
        "fraction_of_16_view_budget": round(batched / views * 16 / 1.0, 4),
    }
    print(f"{views} views at {size}x{size}: batched {batched:.3f} s, one by one {one_by_one:.3f} s "
          f"(speed-up x{result['batching_speedup']}); 16 views would use "
          f"{100 * result['fraction_of_16_view_budget']:.1f}% of the 1 s budget; 1 thread {single_thread:.3f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
