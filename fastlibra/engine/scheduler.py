"""Continuous batching: which requests compute how many tokens in the next step.

One step = decode one token for every running request past its prompt, plus prefill
chunks for admitted requests, within a token budget. Admission is first come, first
served and stops at the first request the cache cannot place (no overtaking), except that
a request whose adapter finds no slot is passed over, as vLLM v1 does: under a policy
modelling vLLM's adapter slots, or past `max_loras` distinct adapters among the running.
When a running request cannot grow, the most recently admitted one is preempted: its
blocks return to the cache (its finished blocks stay cached, so recomputing it is
mostly a hit) and it goes back to the head of the queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fastlibra.cache import Allocation, CacheManager, RequestTooLarge
from fastlibra.config import SchedulerConfig
from fastlibra.engine.request import Request, RequestState


@dataclass(slots=True)
class PrefillItem:
    request: Request
    num_tokens: int
    """Prompt tokens computed this step."""
    prefix_len: int
    """Prompt tokens whose KV already exists (cached or earlier chunks)."""
    ready_at: float = 0.0
    """When the copies this prefill reads (adapter, cached KV) complete: the step starts
    no earlier (the runner waits for them before the forward pass)."""


@dataclass
class Batch:
    """One step of work for a runner."""

    prefills: list[PrefillItem] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    num_steps: int = 1
    """Decode steps fused into this one (simulator only; always 1 with prefills)."""

    @property
    def adapters(self) -> set[str | None]:
        return {p.request.adapter for p in self.prefills} | {r.adapter for r in self.decodes}

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.prefills) + len(self.decodes)

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, cache: CacheManager) -> None:
        self.cfg = cfg
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Admitted requests in admission order (the last is preempted first)."""
        self.allocs: dict[str, Allocation] = {}
        self.rejected: list[Request] = []
        self.head_blocked = False
        """The last schedule could not place the queue head: memory frees only when a
        running request finishes or is preempted, so nothing behind it can start."""

    def add(self, req: Request, now: float) -> None:
        """An arrival joins the queue; the nodes it will need gain queued demand."""
        req.state = RequestState.WAITING
        self.waiting.append(req)
        self.cache.add_demand(req.request_id, req.adapter, req.prompt)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- building a step ----------------------------------------------------------------
    def schedule(self, now: float) -> Batch:
        """Decodes first (every running request past its prompt gets a token), then prefill
        chunks in admission order, then admissions, all within the token budget."""
        batch = Batch()
        budget = self.cfg.max_batched_tokens
        for req in list(self.running):
            if req.state is RequestState.RUNNING and self._pending(req) == 1 \
                    and req.t_first_token is not None:
                if self._grow(req, req.num_computed + 1, now):
                    batch.decodes.append(req)
                    budget -= 1
        for req in self.running:
            if budget <= 0:
                break
            if req.t_first_token is None or self._pending(req) > 1:
                budget -= self._add_prefill(batch, req, budget, now)
        self.head_blocked = False
        passed_over: list[Request] = []
        loras = {r.adapter for r in self.running if r.adapter is not None}
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if not self._lora_slot(req.adapter, loras):
                passed_over.append(self.waiting.popleft())
                continue
            if not self._admit(req, now):
                if self.cache.blocked_on_adapter and self.cache.policy.skip_without_adapter_slot:
                    passed_over.append(self.waiting.popleft())
                    continue
                self.head_blocked = True
                break
            if req.state is RequestState.RUNNING:
                if req.adapter is not None:
                    loras.add(req.adapter)
                budget -= self._add_prefill(batch, req, budget, now)
        if passed_over:  # they keep their places at the head, waiting for a free slot
            # Slots free only when running requests finish: if nobody else is left to
            # try, nothing can start until then, as when the head is blocked.
            self.head_blocked = self.head_blocked or not self.waiting
            self.waiting.extendleft(reversed(passed_over))
        return batch

    def _lora_slot(self, adapter: str | None, loras: set[str]) -> bool:
        """`adapter` may join the running set without exceeding `max_loras`."""
        cap = self.cfg.max_loras
        return adapter is None or cap is None or adapter in loras or len(loras) < cap

    @staticmethod
    def _pending(req: Request) -> int:
        """Context tokens (prompt + generated) whose KV is not computed yet."""
        return len(req.prompt) + len(req.generated) - req.num_computed

    def _add_prefill(self, batch: Batch, req: Request, budget: int, now: float) -> int:
        ready = self.allocs[req.request_id].ready_at
        n = self._chunk(self._pending(req), budget)
        if not n or ready - now > self.cfg.copy_join_s and not self.cache.policy.copies_in_step:
            return 0  # its adapter or cached prefix is still being copied in
        batch.prefills.append(PrefillItem(req, n, req.num_computed, ready))
        if req.t_prefill_start is None:
            req.t_prefill_start = now
        return n

    def _chunk(self, remaining: int, budget: int) -> int:
        if self.cfg.chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget or budget == self.cfg.max_batched_tokens else 0

    def _admit(self, req: Request, now: float) -> bool:
        try:
            alloc = self.cache.allocate(req.request_id, req.adapter, req.all_tokens, now,
                                        reserve_tokens=1)
        except RequestTooLarge as e:
            self.waiting.popleft()
            self.cache.remove_demand(req.request_id)
            req.state, req.reject_reason = RequestState.REJECTED, str(e)
            self.rejected.append(req)
            return True
        if alloc is None:
            return False
        self.waiting.popleft()
        self.cache.remove_demand(req.request_id)
        self.allocs[req.request_id] = alloc
        self.running.append(req)
        req.state = RequestState.RUNNING
        req.num_computed = alloc.cached_tokens
        req.cached_tokens = alloc.cached_tokens
        if req.t_scheduled is None:
            req.t_scheduled = now
            req.adapter_ready_at = alloc.adapter.ready_at
        return True

    def _grow(self, req: Request, num_tokens: int, now: float) -> bool:
        """Room for `num_tokens` of KV for `req`, preempting later admissions if needed."""
        while not self.cache.append(self.allocs[req.request_id], num_tokens, now):
            victim = self.running[-1]
            self.preempt(victim, now)
            if victim is req:
                return False
        return True

    def preempt(self, req: Request, now: float) -> None:
        """Give `req`'s blocks back (what it computed stays cached, so recomputing it is
        mostly a hit) and requeue it first; it resumes from prompt + generated tokens."""
        alloc = self.allocs.pop(req.request_id)
        self.cache.free(alloc, req.all_tokens[:req.num_computed], now)
        self.running.remove(req)
        req.num_preemptions += 1
        req.num_computed = 0
        req.state = RequestState.WAITING
        self.waiting.appendleft(req)
        self.cache.add_demand(req.request_id, req.adapter, req.prompt)

    # -- after a step -------------------------------------------------------------------
    def finish(self, req: Request, now: float) -> None:
        alloc = self.allocs.pop(req.request_id)
        self.cache.free(alloc, req.all_tokens[:req.num_computed], now)
        self.running.remove(req)
        req.state = RequestState.FINISHED
        req.t_finish = now

    def next_ready(self, now: float) -> float | None:
        """Earliest time an admitted request waiting on copies becomes ready."""
        times = [a.ready_at for a in self.allocs.values() if a.ready_at > now]
        return min(times) if times else None
