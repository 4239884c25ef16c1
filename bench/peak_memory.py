"""Peak memory of a code section for the bench scripts: CUDA's allocator peak, else peak RSS on Linux
(VmHWM after resetting it through /proc/self/clear_refs)."""
import torch


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_reset(device=None) -> int:
    """Start a measurement; returns the baseline in bytes (``device`` None: CUDA when available)."""
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kb("VmRSS") * 1024


def peak_since(base: int, device=None) -> int:
    """Peak bytes above ``base`` since :func:`peak_reset`."""
    if _cuda(device):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return status_kb("VmHWM") * 1024 - base
