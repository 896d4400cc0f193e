"""The real engine's `HardwareProfile`, measured at start-up and refined while it serves.

    at start (`measure`, well under a second on a CPU)       while serving (`refresh`)
    ──────────────────────────────────────────────────       ───────────────────────────────
    h2d / d2h: COPY_BLOCKS arena blocks copied as the        the mover's running means of its
      mover copies them (best of REPS)                         own copies (`ArenaMover`)
    disk: the adapter files `LLM` reads anyway,              the mover's running mean of its
      arena bytes / seconds (parsing included)                 adapter reads
    prefill: the model's forward over PREFILL_TOKENS         a running least-squares line of
      (two sizes) in scratch blocks of the empty arena:        step seconds on step tokens
      base + tokens x per token (best of REPS)                 (`observe_step`, every step)

The cache's cost model reads the profile in use (`CostModel.hw`). Every value is
estimated all the time; the cost model is handed a new profile only when one of them has
moved by more than DRIFT from the one in use, since each change rebuilds its ranking.
`LLM(..., calibrate=False)` skips all of it and keeps the profile it was given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fastlibra.cache.cost import CostModel
from fastlibra.cache.swapper import MoveKind
from fastlibra.config import HardwareProfile
from fastlibra.model.forward import ModelRunner, SeqInput

COPY_BLOCKS = 64
"""Blocks per timed copy (fewer if an arena is smaller)."""
PREFILL_TOKENS = (16, 128)
"""Prompt lengths timed at start (cut to what the device arena and context hold)."""
REPS = 3
DRIFT = 1.25
"""Hand the cost model a new profile when a value moves beyond this ratio of its own."""
FORGET = 0.99
"""Weight left to a step observation after each later step (about the last 100 steps count)."""


def _best(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    """Fastest of REPS timed calls, after one untimed call (first-call allocations)."""
    fn()
    sync()
    times = []
    for _ in range(REPS):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


@dataclass
class StepFit:
    """Weighted least squares of step seconds on step tokens, old steps fading by FORGET."""

    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, tokens: float, seconds: float, weight: float = 1.0) -> None:
        for name in ("w", "x", "y", "xx", "xy"):
            setattr(self, name, getattr(self, name) * FORGET)
        self.w += weight
        self.x += weight * tokens
        self.y += weight * seconds
        self.xx += weight * tokens * tokens
        self.xy += weight * tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(seconds at zero tokens, seconds per token), or None while the tokens seen do
        not spread enough to tell the two apart or the slope is not positive."""
        var = self.xx * self.w - self.x * self.x
        if self.w <= 0 or var <= 1e-9 * self.xx * self.w:
            return None
        slope = (self.xy * self.w - self.x * self.y) / var
        if slope <= 0:
            return None
        return max(0.0, (self.y - slope * self.x) / self.w), slope


class Calibration:
    """The profile the engine's cost model uses, and what keeps it measured."""

    def __init__(self, profile: HardwareProfile, measured: bool, startup_s: float = 0.0) -> None:
        self.profile = profile
        """In use by the cache's cost model (after `attach`)."""
        self.measured = measured
        """False: the profile was given (`calibrate=False`) and is never changed."""
        self.startup_s = startup_s
        self.steps = StepFit()
        self.updates = 0
        """Times the cost model was handed a refined profile."""
        self._cost: CostModel | None = None

    @classmethod
    def measure(cls, runner: ModelRunner, base: HardwareProfile) -> Calibration:
        """Time copies and prefills on this machine, before anything is cached; fields not
        measured here keep `base`'s values (adapter reads: `observe_reads`)."""
        t0 = time.perf_counter()
        data = runner.kv.data
        cuda = data.is_cuda

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(data.device)

        n = min(COPY_BLOCKS, data.shape[0])
        host = torch.zeros((n, *data.shape[1:]), dtype=data.dtype, pin_memory=cuda)
        idx = torch.arange(n, device=data.device)
        nbytes = n * runner.kv.block_bytes

        def h2d() -> None:
            data[idx] = host.to(data.device, non_blocking=cuda)

        def d2h() -> None:
            host.copy_(data[idx])

        cal = cls(replace(base, name=f"calibrated-{data.device.type}",
                          h2d_bandwidth=nbytes / _best(h2d, sync),
                          d2h_bandwidth=nbytes / _best(d2h, sync)), measured=True)
        bs = runner.kv.block_size
        room = min(data.shape[0] * bs, runner.cfg.max_position_embeddings)
        sizes = sorted({min(t, room) for t in PREFILL_TOKENS})
        for tokens in sizes:
            seq = SeqInput([3] * tokens, 0, list(range(-(-tokens // bs))))
            cal.steps.add(tokens, _best(lambda s=seq: runner.forward([s]), sync), REPS)
        line = cal.steps.line()
        if line is not None:
            cal.profile = replace(cal.profile, prefill_base=line[0], prefill_per_token=line[1])
        data[:-(-sizes[-1] // bs)].zero_()  # scratch KV must not look like anything cached
        cal.startup_s = time.perf_counter() - t0
        return cal

    def observe_reads(self, nbytes: int, seconds: float) -> None:
        """`LLM` read and checked adapters of `nbytes` (arena bytes) in `seconds`."""
        if self.measured and nbytes > 0 and seconds > 0:
            self.profile = replace(self.profile, disk_bandwidth=nbytes / seconds,
                                   adapter_parse_s=0.0)  # the rate includes parsing

    def attach(self, cost: CostModel) -> None:
        """From now on, refined profiles go to `cost`."""
        self._cost = cost

    def observe_step(self, tokens: int, seconds: float) -> None:
        """One engine step computed `tokens` tokens in `seconds` (the executor's timing)."""
        if self.measured and tokens > 0:
            self.steps.add(tokens, seconds)

    def refresh(self, bandwidth: dict[MoveKind, float], load_s_per_byte: float | None) -> None:
        """Take in the mover's measured copy bandwidths and disk rate and the step fit;
        hand the cost model a new profile if anything drifted past DRIFT."""
        if not self.measured:
            return
        p = self.profile
        new = replace(p, h2d_bandwidth=bandwidth[MoveKind.SWAP_IN],
                      d2h_bandwidth=bandwidth[MoveKind.SWAP_OUT])
        if load_s_per_byte:
            new = replace(new, disk_bandwidth=1 / load_s_per_byte, adapter_parse_s=0.0)
        line = self.steps.line()
        if line is not None:
            new = replace(new, prefill_base=line[0], prefill_per_token=line[1])
        fields = ("h2d_bandwidth", "d2h_bandwidth", "disk_bandwidth", "prefill_per_token")
        if any(_drifted(getattr(new, f), getattr(p, f)) for f in fields):
            self._use(new)

    def _use(self, profile: HardwareProfile) -> None:
        self.profile = profile
        self.updates += 1
        if self._cost is not None:
            self._cost.set_hardware(profile)

    def describe(self) -> str:
        """One line for the start-up log."""
        p = self.profile
        how = f"measured in {self.startup_s:.2f} s" if self.measured else "given, not measured"
        return (f"hardware profile {p.name} ({how}): h2d {p.h2d_bandwidth / 1e9:.2f} GB/s, "
                f"d2h {p.d2h_bandwidth / 1e9:.2f} GB/s, adapter reads "
                f"{p.disk_bandwidth / 1e9:.3f} GB/s + {p.adapter_parse_s * 1e3:.1f} ms, "
                f"prefill {p.prefill_base * 1e3:.2f} ms + {p.prefill_per_token * 1e6:.1f} "
                "us/token")


def _drifted(new: float, old: float) -> bool:
    return math.isfinite(new) and new > 0 and not 1 / DRIFT <= new / old <= DRIFT
