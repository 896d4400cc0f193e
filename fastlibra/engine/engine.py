"""The engine loop shared by every runner: schedule -> run -> postprocess.

    arrivals ─► Scheduler.schedule ─► Runner.execute ─► postprocess ─► CacheManager.tick
                 (cache.allocate/append)   (sim: a duration;      (tokens, timestamps,
                                            model: real tokens)    finish -> cache.free)

A runner reports how long the step took; the simulator's clock jumps by that much, a
real runner's clock is the wall clock. Nothing here knows which one it drives.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Protocol

from fastlibra.cache import CacheManager
from fastlibra.config import SchedulerConfig
from fastlibra.engine.request import Request, RequestState
from fastlibra.engine.scheduler import Batch, Scheduler


@dataclass
class StepOutput:
    duration: float
    """Seconds the step took (simulated or measured)."""
    tokens: dict[str, list[int]] = field(default_factory=dict)
    """Sampled tokens per request id, for requests whose context was fully computed."""
    failed: dict[str, Exception] = field(default_factory=dict)
    """Requests whose part of the step failed (their own error each): their step is not
    counted, and the caller ends them; the rest of the batch goes on."""


class Runner(Protocol):
    """Executes one batch. `max_fused_steps` > 1 lets pure-decode steps be fused."""

    max_fused_steps: int

    def execute(self, batch: Batch, now: float) -> StepOutput: ...

    def step_estimate(self, batch: Batch) -> float:
        """Expected seconds of one step of `batch` (used to fuse decode steps)."""
        ...


class Engine:
    def __init__(self, cfg: SchedulerConfig, cache: CacheManager, runner: Runner,
                 observer=None, next_turns=None) -> None:
        self.cache = cache
        self.runner = runner
        self.scheduler = Scheduler(cfg, cache)
        self.now = 0.0
        self.finished: list[Request] = []
        self.observer = observer
        """Called as observer(engine) after every step (metrics sampling, progress)."""
        self.next_turns = next_turns if next_turns is not None else self.add_request
        """Where a finished request's follow-up turn goes, its arrival set: this engine's
        queue, or a cluster's router."""
        self._arrivals: list[tuple[float, int, Request]] = []
        self._seq = itertools.count()

    # -- input --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue `req` for its arrival time (now, if that has passed)."""
        req.state = RequestState.PENDING
        heapq.heappush(self._arrivals, (req.arrival, next(self._seq), req))

    @property
    def has_work(self) -> bool:
        return bool(self._arrivals) or self.scheduler.has_work

    # -- the loop -----------------------------------------------------------------------
    def step(self, until: float | None = None) -> list[Request]:
        """One scheduler step; returns the requests that finished in it. `until` is an
        event outside the engine (a cluster's next arrival) that fused decode steps must
        not run past, since it may bring work here."""
        self._admit_arrivals()
        batch = self.scheduler.schedule(self.now)
        if not batch:
            self._idle()
            return []
        batch.num_steps = self._fusable_steps(batch, until)
        out = self.runner.execute(batch, self.now)
        self.now += out.duration
        done = self._postprocess(batch, out)
        self.cache.tick(self.now)
        if self.observer is not None:
            self.observer(self)
        return done

    def run(self) -> list[Request]:
        """Step until every request (and every follow-up turn) is done."""
        while self.has_work:
            self.step()
        return self.finished

    def _admit_arrivals(self) -> None:
        while self._arrivals and self._arrivals[0][0] <= self.now:
            _, _, req = heapq.heappop(self._arrivals)
            self.scheduler.add(req, self.now)

    def _idle(self) -> None:
        """Nothing can run now: jump to the next arrival or copy completion."""
        times = [t for t in (self._arrivals[0][0] if self._arrivals else None,
                             self.scheduler.next_ready(self.now)) if t is not None]
        if times:
            self.now = max(self.now, min(times))
            self.cache.tick(self.now)
        elif self.scheduler.waiting and not self.scheduler.running:
            # Nothing runs, nothing arrives, and the head still does not fit: the cache
            # holds only unpinned nodes, so this cannot happen unless allocate is broken.
            raise RuntimeError("scheduler stalled: the queue head never fits an idle pool")

    def _fusable_steps(self, batch: Batch, until: float | None) -> int:
        """Pure decode with nothing to admit or wake: fuse steps up to the next event."""
        if batch.prefills or self.runner.max_fused_steps <= 1:
            return 1
        s = self.scheduler
        k = min(r.target_output_len - len(r.generated) for r in batch.decodes)
        k = min(k, self.runner.max_fused_steps)
        if k <= 1 or (s.waiting and not s.head_blocked
                      and len(s.running) < s.cfg.max_num_seqs):
            return 1  # the queue head could start next step
        # A blocked head waits for a finish (which ends the fused run); arrivals queue
        # behind it. Otherwise the next arrival may start at once.
        arrival = self._arrivals[0][0] if self._arrivals and not s.waiting else None
        events = [t for t in (arrival, s.next_ready(self.now), until) if t is not None]
        if events:
            one = self.runner.step_estimate(batch)
            k = min(k, max(1, int((min(events) - self.now) / max(one, 1e-9))))
        for req in batch.decodes:
            if not self.cache.append(s.allocs[req.request_id], req.num_computed + k, self.now):
                return 1
        return k

    def _postprocess(self, batch: Batch, out: StepOutput) -> list[Request]:
        done: list[Request] = []
        now = self.now
        for item in batch.prefills:
            if item.request.request_id not in out.failed:
                item.request.num_computed += item.num_tokens
        for req in batch.decodes:
            if req.request_id not in out.failed:
                req.num_computed += batch.num_steps
        for req in [p.request for p in batch.prefills] + batch.decodes:
            if req.request_id in out.failed \
                    or req.num_computed < len(req.prompt) + len(req.generated):
                continue  # a prefill chunk short of the end: no token yet
            req.generated += out.tokens[req.request_id]
            req.num_computed = len(req.prompt) + len(req.generated) - 1
            if req.t_first_token is None:
                req.t_first_token = now
                req.close_breakdown()
            if len(req.generated) >= req.target_output_len:
                self.scheduler.finish(req, now)
                self.finished.append(req)
                done.append(req)
                if req.next_turn is not None:
                    nxt = req.next_turn
                    nxt.arrival = now + req.think_s
                    self.next_turns(nxt)
        return done
