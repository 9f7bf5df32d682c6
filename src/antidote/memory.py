"""Peak memory of this process, for reports."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """VmHWM from /proc (ru_maxrss is inherited across fork+exec, so a child would report its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory (MiB)."""
    import torch

    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
