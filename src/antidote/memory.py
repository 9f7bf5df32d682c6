"""Memory of this process: its peak (for reports), a peak window per stage, and giving freed memory back."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path


def trim_heap() -> None:
    """Ask the C allocator to give freed memory back to the system (glibc keeps large freed blocks in its
    heap otherwise: measured, a run's resident size grew stage after stage, block after block)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


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


def release_memory() -> None:
    """Give what a finished stage allocated back to the system. Freed model weights otherwise stay in the
    C allocator's heap (glibc raises its mmap threshold after large frees), so a long run's resident size
    would grow stage after stage, far beyond its largest stage."""
    import gc

    gc.collect()
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    trim_heap()


def reset_peak_memory() -> bool:
    """Start a new peak-memory window: the kernel's resident-size high-water mark (VmHWM) is reset to the
    present size (`/proc/self/clear_refs`, Linux 4.0+), and torch's CUDA peak if CUDA is in use. False when
    the resident peak cannot be reset here (then it is not reported: an inherited peak would mislead)."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def read_peak_memory(reset: bool) -> dict[str, float | None]:
    """Peak resident size (MiB) of this process since `reset_peak_memory` (None if that failed) and peak
    allocated CUDA memory (MiB; None when CUDA was not used)."""
    out: dict[str, float | None] = {"peak_rss_mib": round(peak_rss_mib(), 1) if reset else None}
    out["peak_cuda_allocated_mib"] = None
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
