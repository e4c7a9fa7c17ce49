"""Where an engine step's time goes, per phase, so a slow server says whether the host or the GPU
is the bottleneck (exported on /metrics; benchmarks/bench_serve.py reports it per case).

A step is "decode" when every chunk is one token (the CUDA-graph path) and "mixed" when it carries
prompt chunks. Host phases are wall time on the loop thread:
- schedule: new requests, cancellations, the scheduler's plan;
- launch: `runner.execute` until it returns (eager steps launch every kernel from Python here);
- wait: publishing the previous step's events, then sampling, which includes waiting for the
  GPU to finish the forward;
- output: applying the sampled tokens (detokenizing, stop checks), and publishing the events
  when nothing keeps running (else the next step's wait phase publishes them).
"gpu" is the forward's span on the device (CUDA events around `execute`, read after the sampler's
sync, so it costs no extra sync); on CPU it stays 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

KINDS = ("decode", "mixed")
PHASES = ("schedule", "launch", "wait", "output", "gpu")


@dataclass
class StepTimings:
    steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    seconds: dict[tuple[str, str], float] = field(
        default_factory=lambda: {(k, p): 0.0 for k in KINDS for p in PHASES}
    )


class StepClock:
    """Marks one step's phase boundaries on the loop thread and adds them to `StepTimings`."""

    def __init__(self, device: torch.device) -> None:
        self.totals = StepTimings()
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2))
        self._marks: list[float] = []
        self._kind = "decode"

    def begin(self) -> None:
        self._marks = [time.perf_counter()]

    def mark(self) -> None:
        """End of the current host phase (schedule, launch, wait, output in that order)."""
        self._marks.append(time.perf_counter())

    def before_forward(self, decode_only: bool) -> None:
        self._kind = "decode" if decode_only else "mixed"
        self.mark()  # schedule ends
        if self._cuda:
            self._events[0].record()

    def after_forward(self) -> None:
        if self._cuda:
            self._events[1].record()
        self.mark()  # launch ends

    def end(self) -> None:
        """Close the step (after output). A step without exactly one forward (nothing to run, or
        a failed one retried chunk by chunk) is not counted."""
        self.mark()
        if len(self._marks) != 5:
            return
        kind, marks = self._kind, self._marks
        totals = self.totals
        totals.steps[kind] += 1
        for phase, lo, hi in zip(PHASES[:4], marks[:-1], marks[1:], strict=True):
            totals.seconds[kind, phase] += hi - lo
        if self._cuda and self._events[1].query():
            totals.seconds[kind, "gpu"] += self._events[0].elapsed_time(self._events[1]) / 1000
