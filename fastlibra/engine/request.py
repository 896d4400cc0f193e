"""Requests as plain data: what the user asked for, and what happened to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class RequestState(Enum):
    PENDING = "pending"  # not arrived yet (a follow-up turn waiting for its previous one)
    WAITING = "waiting"  # arrived, in the queue
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"


@dataclass(eq=False)
class Request:
    """One generation request. Workloads fill the first block; the engine the rest."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0
    adapter: str | None = None
    output: list[int] | None = None
    """Scripted output tokens (simulator, replay); None = the model samples them."""
    next_turn: Request | None = None
    """Closed-loop follow-up: arrives `think_s` after this request finishes."""
    think_s: float = 0.0
    session: str | None = None

    state: RequestState = RequestState.WAITING
    generated: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Prompt tokens whose KV exists (cached prefix + prefill done so far)."""
    t_scheduled: float | None = None
    t_first_token: float | None = None
    t_finish: float | None = None
    reject_reason: str | None = None
    num_preemptions: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from cache at (the last) admission."""
    t_prefill_start: float | None = None
    """When its first prefill step started (after any copy wait)."""
    adapter_ready_at: float = 0.0
    # TTFT breakdown (seconds), phases that sum to TTFT: queueing (arrival -> admission),
    # adapter and KV cold start (admission -> first prefill step, split by which copy it
    # waited for), prefill (first prefill step -> first token, copy stalls inside included)
    t_queue: float = 0.0
    t_adapter_wait: float = 0.0
    t_kv_wait: float = 0.0
    t_prefill: float = 0.0

    def close_breakdown(self) -> None:
        """Fill the TTFT breakdown once the first token exists."""
        assert self.t_first_token is not None and self.t_scheduled is not None
        start = self.t_prefill_start if self.t_prefill_start is not None else self.t_scheduled
        self.t_queue = self.t_scheduled - self.arrival
        wait = start - self.t_scheduled
        self.t_adapter_wait = min(wait, max(0.0, self.adapter_ready_at - self.t_scheduled))
        self.t_kv_wait = wait - self.t_adapter_wait
        self.t_prefill = self.t_first_token - start

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_new_tokens must be >= 1")
        if self.output is not None and not self.output:
            raise ValueError(f"request {self.request_id}: a scripted output needs >= 1 token")

    def fresh_copy(self) -> Request:
        """This request and its follow-up turns, as if never run (prompts are shared:
        nothing mutates them). Lets every policy replay the same workload."""
        turn = Request(self.request_id, self.prompt, self.max_new_tokens, arrival=self.arrival,
                       adapter=self.adapter, output=self.output, think_s=self.think_s,
                       session=self.session)
        if self.next_turn is not None:
            turn.next_turn = self.next_turn.fresh_copy()
        return turn

    @property
    def target_output_len(self) -> int:
        return min(self.max_new_tokens, len(self.output)) if self.output else self.max_new_tokens

    @property
    def ttft(self) -> float | None:
        return None if self.t_first_token is None else self.t_first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.t_finish is None or self.t_first_token is None or len(self.generated) < 2:
            return None
        return (self.t_finish - self.t_first_token) / (len(self.generated) - 1)

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.generated
