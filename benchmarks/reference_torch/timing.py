"""Device-synchronized wall time, peak device memory and the measured bf16 matmul peak for MFU."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


def synchronize(device: torch.device) -> None:
    """Waits for queued CUDA work, so a clock read covers it; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Elapsed seconds of a `with` block, synchronized with the device on entry and exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Yields a dict whose "gib" is set on exit: the peak allocated device memory in the block (None on CPU)."""
    result: dict[str, float | None] = {"gib": None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            result["gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def measure_peak_tflops(device: torch.device, size: int = 8192, iters: int = 50, warmup: int = 5) -> float | None:
    """Achieved bf16 TFLOP/s of back-to-back size³ matmuls: the denominator of MFU. None on the CPU.

    Measured in the same process, on the same chip, right before the stages, so MFU is relative to
    what this device really sustains rather than to a datasheet.
    """
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    with Stopwatch(device) as watch:
        for _ in range(iters):
            a @ b
    tflops = 2.0 * size**3 * iters / watch.seconds / 1e12
    log.info("bf16 matmul peak (%d³ x %d): %.1f TFLOP/s", size, iters, tflops)
    return tflops


def mfu(flops: float | None, seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of the measured peak (None without a peak)."""
    if flops is None or peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
