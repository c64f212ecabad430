"""What predicting a case costs: peak host memory, peak GPU memory and the FLARE GPU memory-time area.

FLARE 2024 scores efficiency by the area under the GPU memory-time curve (MB·s), with memory
sampled every 0.1 s. `CaseUsage` measures one case the same way from inside the process:

- peak RSS: the kernel's high-water mark (VmHWM in /proc/self/status), reset before the case by
  writing 5 to /proc/self/clear_refs, so it is this case's peak and not the process's lifetime peak.
  Where that reset is not allowed, the lifetime peak (getrusage) is reported and `rss_peak_is_per_case`
  is False.
- GPU memory: sampled every 0.1 s in a background thread. With NVML (`pynvml`) the sample is the
  device's used memory, as `nvidia-smi` and the organisers report it (CUDA context included); without
  it, the caching allocator's `torch.cuda.memory_reserved` (context excluded, ~300-500 MB less).
  The area is the integral of the samples over the measured wall time.
On CPU the GPU fields are None.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

SAMPLE_INTERVAL_S = 0.1  # FLARE: GPU memory sampled every 0.1 s
_MB = 2**20


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB since the last `reset_peak_rss` (or since it started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports kB


def gpu_memory_sampler(device: torch.device) -> tuple[Callable[[], float] | None, str | None]:
    """A function returning the device's memory in use (MB), and the name of its source.

    Returns:
        (None, None) on a non-CUDA device; else NVML's used memory of the device ('nvml') when
        pynvml works, otherwise torch's reserved memory of this process ('torch_reserved').
    """
    if device.type != "cuda":
        return None, None
    sampler = _nvml_sampler(device)
    if sampler is not None:
        return sampler, "nvml"
    return (lambda: torch.cuda.memory_reserved(device) / _MB), "torch_reserved"


def _nvml_sampler(device: torch.device) -> Callable[[], float] | None:
    """NVML's used memory of the physical GPU behind `device`, found by UUID; None when unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        name = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(name)
        pynvml.nvmlDeviceGetMemoryInfo(handle)  # fail here, not in the sampling thread
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / _MB
    except Exception:  # no pynvml, no driver access, an unknown UUID format: fall back to torch
        return None


class MemoryTimeMonitor:
    """Samples a memory reading every `interval_s` in a daemon thread; gives the peak and the MB·s area.

    The area is a left Riemann sum over the actual sample times (each sample holds until the next),
    closed by a last sample at `stop`.
    """

    def __init__(self, sample_mb: Callable[[], float], interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._sample_mb = sample_mb
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[float, float] | None = None  # (time, MB) of the previous sample
        self.peak_mb = 0.0
        self.area_mb_s = 0.0
        self.samples = 0

    def _record(self) -> None:
        now, value = time.perf_counter(), float(self._sample_mb())
        if self._last is not None:
            self.area_mb_s += self._last[1] * (now - self._last[0])
        self._last = (now, value)
        self.peak_mb = max(self.peak_mb, value)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._record()

    def start(self) -> MemoryTimeMonitor:
        self._record()
        self._thread = threading.Thread(target=self._run, name="panseg-memory-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MemoryTimeMonitor:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._record()
        return self


@dataclass
class UsageReport:
    """Costs of one case. GPU fields are None on CPU."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    rss_peak_is_per_case: bool = False
    gpu_peak_mb: float | None = None
    gpu_area_mb_s: float | None = None
    gpu_memory_source: str | None = None

    def as_row(self) -> dict:
        def rounded(v):
            return None if v is None else round(v, 3)

        return {"seconds": rounded(self.seconds), "peak_rss_mb": rounded(self.peak_rss_mb),
                "gpu_peak_mb": rounded(self.gpu_peak_mb), "gpu_area_mb_s": rounded(self.gpu_area_mb_s),
                "gpu_memory_source": self.gpu_memory_source}


class CaseUsage:
    """Context manager measuring one case: wall time, peak RSS, and on CUDA GPU peak and area.

    Example:
        with CaseUsage(device) as usage:
            ...
        usage.report.gpu_area_mb_s
    """

    def __init__(self, device: torch.device | str, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.report = UsageReport()
        self._monitor: MemoryTimeMonitor | None = None
        self._start = 0.0

    def __enter__(self) -> CaseUsage:
        self.report.rss_peak_is_per_case = reset_peak_rss()
        sampler, source = gpu_memory_sampler(self.device)
        if sampler is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.report.gpu_memory_source = source
            self._monitor = MemoryTimeMonitor(sampler, self.interval_s).start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.report.seconds = time.perf_counter() - self._start
        if self._monitor is not None:
            self._monitor.stop()
            torch_peak = torch.cuda.max_memory_reserved(self.device) / _MB
            self.report.gpu_peak_mb = max(self._monitor.peak_mb, torch_peak)
            self.report.gpu_area_mb_s = self._monitor.area_mb_s
        self.report.peak_rss_mb = peak_rss_mb()


__all__ = ["CaseUsage", "MemoryTimeMonitor", "SAMPLE_INTERVAL_S", "UsageReport", "gpu_memory_sampler",
           "peak_rss_mb", "reset_peak_rss"]
