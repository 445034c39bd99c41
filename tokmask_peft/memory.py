"""A run's peak memory: reset when it starts, read when it ends, so each run of a sweep's process
reports its own peak (the device's allocator on a GPU, the resident set on a CPU)."""
from __future__ import annotations

import resource
from pathlib import Path

import torch

__all__ = ["reset_peak_memory", "peak_memory_mb"]
PEAK_RSS_RESET = Path("/proc/self/clear_refs")  # Linux: writing 5 resets the process's peak resident set


def reset_peak_memory(device: torch.device) -> None:
    """Each run's peak is its own: without a reset, runs after the first in a sweep's process would
    report the largest peak so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PEAK_RSS_RESET.write_text("5")
    except OSError:
        pass  # not Linux: the process-wide maximum is what peak_memory_mb reads


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The peak since :func:`reset_peak_memory`, in MiB, and what kind of peak it is."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024, "cpu_peak_rss_of_run"
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss_of_process"
