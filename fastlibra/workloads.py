"""Seeded workload generators: chatbot, translation, agent, and drift (chatbot sessions
or agent bursts, `agent-drift`, whose popular adapters change over time).

`make_workload(WorkloadSpec(...))` returns `Request`s sorted by arrival. It is a pure
function of the spec: all randomness comes from `numpy.random.default_rng(spec.seed)` and
from `TokenStreams(spec.seed)`, never from global state.

Adapters are named `lora-0 .. lora-{N-1}`; popularity rank r (0 = hottest) has weight
1 / (r + 1) ** zipf (or `spec.popularity[r]`), and rank r is `lora-r` except in `drift`.

Multi-turn sessions are closed loop: only a session's first turn is in the returned list;
turn k+1 hangs off turn k's `next_turn` and arrives `think_s` (set on turn k) after turn k
finishes. Later turns carry the session's start as a placeholder `arrival`; the engine
sets the real one. Every turn has scripted `output` tokens, and turn k+1's prompt is
exactly turn k's prompt + turn k's output + a new message, so its KV can be reused if it
survived.

Trace replay and converters of public traces live in `fastlibra.traces`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from fastlibra.config import ConfigError
from fastlibra.engine.request import Request

GENERATORS = ("chatbot", "translation", "agent", "drift", "agent-drift")
VOCAB_SIZE = 32000
_MASK = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser on a Python int (64-bit wrap)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _mix64_np(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TokenStreams:
    """Deterministic token ids in [0, vocab_size).

    Stream `key` (an int >= 0, in `domain`) is an endless pseudo-random sequence that
    depends only on (seed, domain, key); `take(key, n)` is its first n tokens, so any
    two takes of one stream agree on their common prefix. Its first two tokens are the
    key itself (key % V, key // V % V), so streams whose keys differ modulo V**2 never
    share a prefix longer than one token. `fresh(n)` takes a new stream from a counter:
    fresh streams never share a prefix (up to V**2 ~ 1e9 of them).
    """

    def __init__(self, seed: int, vocab_size: int = VOCAB_SIZE) -> None:
        if vocab_size < 2:
            raise ConfigError(f"vocab_size must be >= 2, got {vocab_size}")
        self.seed = seed
        self.vocab_size = vocab_size
        self._table = tuple(range(vocab_size))  # shared int objects: lists of tokens are cheap
        self._next = 0

    def take(self, key: int, n: int, domain: int = 0) -> list[int]:
        if n <= 0:
            return []
        base = _mix64(_mix64(self.seed * 0x9E3779B97F4A7C15 + domain) ^ (key & _MASK))
        idx = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(base)
        toks = (_mix64_np(idx) % np.uint64(self.vocab_size)).astype(np.int64)
        v = self.vocab_size
        toks[0] = key % v
        if n > 1:
            toks[1] = key // v % v
        if n == 1:
            return [self._table[int(toks[0])]]
        return list(itemgetter(*toks.tolist())(self._table))

    def fresh(self, n: int) -> list[int]:
        key = self._next
        self._next += 1
        return self.take(key, n, domain=1)


def zipf_weights(n: int, alpha: float) -> list[float]:
    """Normalised popularity of ranks 0..n-1: weight of rank r is 1 / (r + 1) ** alpha."""
    w = [1.0 / (r + 1) ** alpha for r in range(n)]
    total = sum(w)
    return [x / total for x in w]


class RankSampler:
    """Draws popularity ranks from a weight vector (any scale) with a numpy Generator."""

    def __init__(self, weights) -> None:
        cum = np.cumsum(np.asarray(weights, dtype=float))
        if len(cum) == 0 or not cum[-1] > 0:
            raise ConfigError("popularity weights must be non-empty with a positive sum")
        self._cum = cum / cum[-1]

    def __call__(self, rng: np.random.Generator) -> int:
        return min(int(np.searchsorted(self._cum, rng.random(), side="right")), len(self._cum) - 1)


def lognormal_int(rng: np.random.Generator, mean: float, sigma: float, lo: int, hi: int) -> int:
    """A lognormal draw with the given mean (before clipping), rounded and clipped."""
    mu = math.log(mean) - sigma * sigma / 2
    return int(min(hi, max(lo, round(rng.lognormal(mu, sigma)))))


def _range(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(r[0], r[1] + 1))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(f"WorkloadSpec: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. Lengths are tokens, times seconds, `(lo, hi)` ranges inclusive."""

    name: str = "chatbot"
    """One of GENERATORS."""
    num_adapters: int = 16
    zipf: float = 1.0
    """Popularity skew alpha; 0 = uniform."""
    rate: float = 1.0
    """Poisson rate of new sessions (chatbot, drift), requests (translation) or user
    bursts (agent), per second."""
    duration: float = 600.0
    """Sessions/requests/bursts start in [0, duration); later turns may run past it."""
    seed: int = 0
    popularity: tuple[float, ...] | None = None
    """Explicit weight per popularity rank (len num_adapters); overrides `zipf`."""
    vocab_size: int = VOCAB_SIZE

    # chatbot, drift
    max_context: int = 4096
    """A session ends instead of letting prompt + answer exceed this."""
    mean_turns: float = 4.0
    """Turns per session ~ geometric with this mean, truncated at max_turns."""
    max_turns: int = 10
    think_mean_s: float = 30.0
    """Exponential think time between a turn's finish and the next turn."""
    system_len: tuple[int, int] = (100, 300)
    """Per-adapter system prompt, shared by all its sessions."""
    user_mean: float = 150.0
    user_len: tuple[int, int] = (8, 1024)
    answer_mean: float = 250.0
    answer_len: tuple[int, int] = (8, 1024)
    length_sigma: float = 0.8
    """Lognormal sigma of user messages and answers (ShareGPT-like), clipped to the ranges."""

    # translation
    instruction_len: tuple[int, int] = (200, 500)
    """Per-adapter instruction prefix that every request of the adapter starts with."""
    source_len: tuple[int, int] = (50, 150)
    target_ratio: tuple[float, float] = (0.8, 1.25)
    """Output length = source length x uniform(target_ratio)."""

    # agent
    agent_max_context: int = 8192
    context_len: tuple[int, int] = (2000, 6000)
    """Per-user (= per-adapter) long context, reused by every request of that user."""
    burst: tuple[int, int] = (3, 8)
    """Requests per burst; step k+1 = step k's prompt + answer + a new part."""
    burst_gap_s: tuple[float, float] = (1.0, 3.0)
    step_len: tuple[int, int] = (20, 200)
    step_answer_mean: float = 80.0
    """Lognormal mean of an agent step's answer, clipped to answer_len."""

    # drift
    drift_phases: int = 4
    drift_shift: int | None = None
    """In phase p (= floor(t * drift_phases / duration)) rank r is adapter
    lora-((r + p * shift) mod N); shift defaults to max(1, N // drift_phases)."""

    def __post_init__(self) -> None:
        _check(self.name in GENERATORS, f"name must be one of {GENERATORS}, got {self.name!r}")
        for f in ("num_adapters", "seed", "vocab_size", "max_context", "max_turns",
                  "agent_max_context", "drift_phases"):
            _check(_is_int(getattr(self, f)), f"{f} must be an int, got {getattr(self, f)!r}")
        _check(self.num_adapters >= 1, f"num_adapters must be >= 1, got {self.num_adapters}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        for f in ("zipf", "rate", "duration", "mean_turns", "think_mean_s", "user_mean",
                  "answer_mean", "length_sigma", "step_answer_mean"):
            v = getattr(self, f)
            _check(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
                   f"{f} must be a finite number, got {v!r}")
        _check(self.zipf >= 0, f"zipf must be >= 0, got {self.zipf}")
        _check(self.rate > 0, f"rate must be > 0 (per second), got {self.rate}")
        _check(self.duration > 0, f"duration must be > 0 seconds, got {self.duration}")
        _check(self.mean_turns >= 1, f"mean_turns must be >= 1, got {self.mean_turns}")
        _check(self.max_turns >= 1, f"max_turns must be >= 1, got {self.max_turns}")
        _check(self.think_mean_s >= 0, f"think_mean_s must be >= 0, got {self.think_mean_s}")
        for f in ("user_mean", "answer_mean", "step_answer_mean"):
            _check(getattr(self, f) >= 1, f"{f} must be >= 1 token, got {getattr(self, f)}")
        _check(self.length_sigma >= 0, f"length_sigma must be >= 0, got {self.length_sigma}")
        for f in ("system_len", "user_len", "answer_len", "instruction_len", "source_len",
                  "context_len", "burst", "step_len"):
            r = getattr(self, f)
            _check(isinstance(r, tuple) and len(r) == 2 and all(_is_int(x) for x in r)
                   and 1 <= r[0] <= r[1],
                   f"{f} must be an int range (lo, hi) with 1 <= lo <= hi, got {r!r}")
        for f in ("target_ratio", "burst_gap_s"):
            r = getattr(self, f)
            _check(isinstance(r, tuple) and len(r) == 2 and 0 <= r[0] <= r[1]
                   and all(math.isfinite(x) for x in r),
                   f"{f} must be a range (lo, hi), 0 <= lo <= hi, got {r!r}")
        _check(self.target_ratio[1] > 0, "target_ratio must allow a positive output length")
        if self.popularity is not None:
            _check(len(self.popularity) == self.num_adapters,
                   f"popularity has {len(self.popularity)} weights for "
                   f"{self.num_adapters} adapters")
            _check(all(math.isfinite(w) and w >= 0 for w in self.popularity)
                   and sum(self.popularity) > 0,
                   "popularity weights must be >= 0 with a positive sum")
        first = self.system_len[1] + self.user_len[1] + self.answer_len[1]
        _check(self.name not in ("chatbot", "drift") or first <= self.max_context,
               f"max_context={self.max_context} cannot hold a first turn of up to {first} tokens "
               "(system_len + user_len + answer_len maxima); raise it or shrink the ranges")
        first = self.context_len[1] + self.step_len[1] + self.answer_len[1]
        _check(not self.name.startswith("agent") or first <= self.agent_max_context,
               f"agent_max_context={self.agent_max_context} cannot hold a first step of up to "
               f"{first} tokens (context_len + step_len + answer_len maxima)")
        _check(self.drift_phases >= 1, f"drift_phases must be >= 1, got {self.drift_phases}")
        _check(self.drift_shift is None or (_is_int(self.drift_shift) and self.drift_shift >= 0),
               f"drift_shift must be None or an int >= 0, got {self.drift_shift!r}")

    def weights(self) -> list[float]:
        return list(self.popularity) if self.popularity is not None else zipf_weights(
            self.num_adapters, self.zipf)

    def drift_adapter(self, rank: int, t: float) -> int:
        """The adapter index that has popularity `rank` at time t (the drift rule)."""
        phase = min(int(t * self.drift_phases / self.duration), self.drift_phases - 1)
        shift = self.drift_shift if self.drift_shift is not None else max(
            1, self.num_adapters // self.drift_phases)
        return (rank + phase * shift) % self.num_adapters


def make_workload(spec: WorkloadSpec) -> list[Request]:
    """Generate the workload `spec` describes; first turns only, sorted by arrival."""
    gen = {"chatbot": _chat, "drift": _chat, "translation": _translation, "agent": _agent,
           "agent-drift": _agent}
    return gen[spec.name](spec)


def _arrivals(spec: WorkloadSpec, rng: np.random.Generator):
    t = 0.0
    while True:
        t += float(rng.exponential(1.0 / spec.rate))
        if t >= spec.duration:
            return
        yield t


def _chain(prev: Request | None, req: Request, think_s: float) -> None:
    if prev is not None:
        prev.next_turn = req
        prev.think_s = think_s


def _chat(spec: WorkloadSpec) -> list[Request]:
    """Chatbot / drift sessions: one adapter per session; turn k+1 = turn k + answer + message."""
    rng = np.random.default_rng(spec.seed)
    toks = TokenStreams(spec.seed, spec.vocab_size)
    draw = RankSampler(spec.weights())
    system = [toks.fresh(_range(rng, spec.system_len)) for _ in range(spec.num_adapters)]
    out: list[Request] = []
    for s, t in enumerate(_arrivals(spec, rng)):
        rank = draw(rng)
        a = spec.drift_adapter(rank, t) if spec.name == "drift" else rank
        turns = min(int(rng.geometric(1.0 / spec.mean_turns)), spec.max_turns)
        history, prev = system[a], None
        for k in range(turns):
            user = toks.fresh(lognormal_int(rng, spec.user_mean, spec.length_sigma, *spec.user_len))
            n_ans = lognormal_int(rng, spec.answer_mean, spec.length_sigma, *spec.answer_len)
            prompt = history + user
            if len(prompt) + n_ans > spec.max_context:
                break
            answer = toks.fresh(n_ans)
            req = Request(f"{spec.name}-{s}-{k}", prompt, n_ans, arrival=t, adapter=f"lora-{a}",
                          output=answer, session=f"{spec.name}-{s}")
            think = float(rng.exponential(spec.think_mean_s)) if spec.think_mean_s else 0.0
            _chain(prev, req, think)
            if prev is None:
                out.append(req)
            prev, history = req, prompt + answer
    return out


def _translation(spec: WorkloadSpec) -> list[Request]:
    """Single-turn short requests; each starts with its adapter's instruction prefix."""
    rng = np.random.default_rng(spec.seed)
    toks = TokenStreams(spec.seed, spec.vocab_size)
    draw = RankSampler(spec.weights())
    instr = [toks.fresh(_range(rng, spec.instruction_len)) for _ in range(spec.num_adapters)]
    out = []
    for i, t in enumerate(_arrivals(spec, rng)):
        a = draw(rng)
        n_src = _range(rng, spec.source_len)
        n_out = max(1, round(n_src * float(rng.uniform(*spec.target_ratio))))
        out.append(Request(f"translation-{i}", instr[a] + toks.fresh(n_src), n_out, arrival=t,
                           adapter=f"lora-{a}", output=toks.fresh(n_out)))
    return out


def _agent(spec: WorkloadSpec) -> list[Request]:
    """Per-user adapters (user u = lora-u) with a long per-user context; bursts of steps.

    Bursts arrive Poisson(rate); the user is drawn by popularity; a burst has
    uniform(burst) steps, step 1 = user context + a new part, step k+1 = step k's prompt +
    its answer + a new part, each step arriving uniform(burst_gap_s) after the previous
    finished (closed loop). A burst stops early rather than exceed agent_max_context.
    `agent-drift` moves popularity between users by the drift rule.
    """
    rng = np.random.default_rng(spec.seed)
    toks = TokenStreams(spec.seed, spec.vocab_size)
    draw = RankSampler(spec.weights())
    ctx_len = [_range(rng, spec.context_len) for _ in range(spec.num_adapters)]
    contexts: dict[int, list[int]] = {}
    out: list[Request] = []
    for b, t in enumerate(_arrivals(spec, rng)):
        u = draw(rng)
        if spec.name == "agent-drift":
            u = spec.drift_adapter(u, t)
        if u not in contexts:  # made on first use; the fresh-stream counter order is still seeded
            contexts[u] = toks.fresh(ctx_len[u])
        history, prev = contexts[u], None
        for k in range(_range(rng, spec.burst)):
            part = toks.fresh(_range(rng, spec.step_len))
            n_ans = lognormal_int(rng, spec.step_answer_mean, spec.length_sigma, *spec.answer_len)
            prompt = history + part
            if len(prompt) + n_ans > spec.agent_max_context:
                break
            answer = toks.fresh(n_ans)
            req = Request(f"agent-{b}-{k}", prompt, n_ans, arrival=t, adapter=f"lora-{u}",
                          output=answer, session=f"agent-{b}")
            _chain(prev, req, float(rng.uniform(*spec.burst_gap_s)))
            if prev is None:
                out.append(req)
            prev, history = req, prompt + answer
    return out


def iter_turns(requests: list[Request]):
    """Every request including follow-up turns: each first turn, then its next_turn chain."""
    for r in requests:
        while r is not None:
            yield r
            r = r.next_turn


def session_spec(args, *, name: str, num_adapters: int, max_context: int) -> WorkloadSpec:
    """A multi-turn session workload from the session flags (`--rate --duration --think
    --mean-turns --zipf --system-len --user-len --answer-len --seed --vocab`). Each length
    flag is a mean; its range is derived the same way for every benchmark that replays
    sessions (bench replay, bench fidelity, bench serve, the demo)."""
    return WorkloadSpec(
        name=name, num_adapters=num_adapters, zipf=args.zipf, rate=args.rate,
        duration=args.duration, seed=args.seed, vocab_size=args.vocab,
        max_context=max_context, mean_turns=args.mean_turns, max_turns=6,
        think_mean_s=args.think, system_len=(args.system_len // 2 + 1, args.system_len * 3 // 2),
        user_mean=float(args.user_len), user_len=(max(1, args.user_len // 4), args.user_len * 3),
        answer_mean=float(args.answer_len),
        answer_len=(max(1, args.answer_len // 2), args.answer_len * 2), length_sigma=0.5)
