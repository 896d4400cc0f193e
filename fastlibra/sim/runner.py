"""The simulated runner and copy engine: time instead of tensors.

`SimRunner.execute` returns the step time of `SimProfile.step_time` and the scripted
output tokens. `SimMover` keeps three copy queues that overlap with compute, like CUDA
copy engines beside the compute stream: host->device, device->host, and disk reads.
A copy starts when its queue is free. Nothing is free that the real runner
(`model/executor.py`) waits for: a step starts once the copies its prefills read have
landed (whole blocks, no per-layer overlap) and every pending swap-out is done, since the
blocks a swap-out frees may be written by this step.
"""

from __future__ import annotations

import math

from fastlibra.cache import Move, MoveKind
from fastlibra.engine.engine import StepOutput
from fastlibra.engine.scheduler import Batch
from fastlibra.sim.profiles import SimProfile

IDLE_AFTER_S = 0.005
"""A step that starts this long after the previous one ended pays `GpuSpec.idle_wake_s`."""


class SimMover:
    def __init__(self, profile: SimProfile) -> None:
        hw = profile.hardware_profile()
        self.hw = hw
        self.busy_until = {"h2d": 0.0, "d2h": 0.0, "disk": 0.0}
        self.bytes = {"h2d": 0, "d2h": 0, "disk": 0}
        self.swap_outs_due = 0.0
        """When the last swap-out whose source blocks were freed for reuse completes."""

    def _queue(self, kind: MoveKind, nbytes: int) -> tuple[str, float]:
        if kind is MoveKind.SWAP_OUT:
            return "d2h", nbytes / self.hw.d2h_bandwidth
        if kind is MoveKind.SWAP_IN:
            return "h2d", self.hw.h2d_time(nbytes)
        return "disk", self.hw.disk_load_time(nbytes)

    def estimate(self, kind: MoveKind, nbytes: int, now: float) -> float:
        queue, seconds = self._queue(kind, nbytes)
        return max(now, self.busy_until[queue]) + seconds

    def submit(self, move: Move, now: float) -> float:
        queue, seconds = self._queue(move.kind, move.nbytes)
        done = max(now, self.busy_until[queue]) + seconds
        self.busy_until[queue] = done
        self.bytes[queue] += move.nbytes
        if move.kind is MoveKind.SWAP_OUT and not move.written_through:
            self.swap_outs_due = max(self.swap_outs_due, done)
        return done


class SimRunner:
    """Charges `SimProfile.step_time`; emits each request's scripted output tokens."""

    max_fused_steps = 64

    def __init__(self, profile: SimProfile, mover: SimMover) -> None:
        self.profile = profile
        self.mover = mover
        self._last_end = -math.inf

    def _time(self, batch: Batch, extra_ctx: int = 0) -> float:
        prefills = [(p.num_tokens, p.prefix_len) for p in batch.prefills]
        ctx = sum(r.num_computed for r in batch.decodes) + extra_ctx * len(batch.decodes)
        adapters = sum(1 for a in batch.adapters if a)
        return self.profile.step_time(prefills, ctx, len(batch.decodes), adapters)

    def step_estimate(self, batch: Batch) -> float:
        return self._time(batch)

    def execute(self, batch: Batch, now: float) -> StepOutput:
        k = batch.num_steps
        # Step time is affine in context within a regime: average the first and last step.
        duration = self._time(batch) if k == 1 else \
            k * (self._time(batch) + self._time(batch, k - 1)) / 2
        start = max([now, self.mover.swap_outs_due] + [p.ready_at for p in batch.prefills])
        duration += start - now
        if now - self._last_end > IDLE_AFTER_S:
            duration += self.profile.gpu.idle_wake_s
        self._last_end = now + duration
        tokens: dict[str, list[int]] = {}
        for p in batch.prefills:
            r = p.request
            if p.prefix_len + p.num_tokens >= len(r.prompt) + len(r.generated):
                tokens[r.request_id] = _script(r, 1)
        for r in batch.decodes:
            tokens[r.request_id] = _script(r, k)
        return StepOutput(duration, tokens)


def _script(req, k: int) -> list[int]:
    start = len(req.generated)
    if req.output is not None:
        return req.output[start:start + k]
    return [0] * k
