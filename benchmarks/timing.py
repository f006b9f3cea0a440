"""The benchmarks' one timer, and what torch.profiler says of a call: its GPU operations, the idle
gaps between them, and the aten ops it runs outside compiled graphs."""
from __future__ import annotations

import collections
import statistics
import time

import torch

CLOCKS = ("events", "wall", "host")


class Timer:
    """Seconds per call of `fn`: median over `repeats` windows of `iters` calls, after `warmup` calls.

    How a window is timed (`clock`): "events", CUDA events on the current stream (the default on a
    GPU); "wall", the host's clock from an idle device until the window's device work is done (the
    default on the CPU); "host", the host's clock from an idle device until the last call returns,
    without the wait for the device: close to "wall" when the host is the bottleneck, below it when
    the GPU is."""

    def __init__(self, device: torch.device, warmup: int, iters: int, repeats: int, clock: str | None = None):
        self.device, self.warmup, self.iters, self.repeats = device, warmup, iters, repeats
        self.clock = clock or ("events" if device.type == "cuda" else "wall")
        if self.clock not in CLOCKS or (self.clock == "events" and device.type != "cuda"):
            raise ValueError(f"clock {self.clock!r} on {device}: one of {CLOCKS}, events on a GPU only")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        return statistics.median(self._window(fn) for _ in range(self.repeats))

    def _window(self, fn) -> float:
        if self.clock == "events":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._calls(fn)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / self.iters
        self._synchronize()
        tick = time.perf_counter()
        self._calls(fn)
        if self.clock == "wall":
            self._synchronize()
        seconds = time.perf_counter() - tick
        self._synchronize()  # leave the device idle, as the window found it
        return seconds / self.iters

    def _calls(self, fn) -> None:
        for _ in range(self.iters):
            fn()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def gpu_ms_per_call(fn, calls: int = 10) -> float:
    """Summed duration of the GPU operations (kernels, copies, fills) one call of `fn` runs
    (torch.profiler), in ms."""
    return sum(end - start for start, end in cuda_intervals(fn, calls)) / calls / 1000


def cuda_intervals(fn, calls: int) -> list[tuple[float, float]]:
    """(start, end) in us of every CUDA kernel, copy and fill that `calls` calls of `fn` run."""
    return [(e.time_range.start, e.time_range.end) for e in cuda_events(fn, calls)]


def cuda_events(fn, calls: int, warmup: int = 1) -> list:
    """torch.profiler's events of every CUDA kernel, copy and fill that `calls` calls of `fn` run
    (.time_range in us, .device_resource_id the stream), after `warmup` unprofiled calls."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def idle_gaps_us(intervals) -> list[float]:
    """The idle stretches (us) between consecutive GPU operations, given as (start, end) in us."""
    gaps, busy_until = [], None
    for start, end in sorted(intervals):
        if busy_until is not None and start > busy_until:
            gaps.append(start - busy_until)
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def short_gaps_us(intervals, below_us: float = 20.0) -> float:
    """Summed idle time between consecutive GPU operations, counting only gaps shorter than
    `below_us`: what the GPU spends between dependent kernels on its own (a few us each, inside
    CUDA graphs too). Longer gaps are waits for the host, which the profiler itself lengthens."""
    return sum((gap for gap in idle_gaps_us(intervals) if gap < below_us), 0.0)


def eager_ops_per_call(fn, calls: int = 3) -> dict[str, float]:
    """The aten ops one call of `fn` dispatches outside torch.compile's graphs (top-level ones, by
    name; torch.profiler): host work on every device, and on a GPU launches outside CUDA graphs."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    counts = collections.Counter(e.name for e in prof.events()
                                 if e.name.startswith("aten::") and not _nested_or_compiled(e))
    return {name: n / calls for name, n in counts.most_common()}


def _nested_or_compiled(event) -> bool:
    """Inside another aten op, or inside a compiled graph ("Torch-Compiled Region", "CompiledFunction",
    "CompiledFunctionBackward", "## Call CompiledFxGraph ...")."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") or "Compiled" in parent.name:
            return True
        parent = parent.cpu_parent
    return False

