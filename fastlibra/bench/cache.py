"""`fastlibra bench cache`: what the cache bookkeeping costs the scheduler per step.

    warm-up (untimed)                          measured (timed: cache calls only)
    ─────────────────────────────────────      ────────────────────────────────────────
    multi-turn sessions over Zipf-popular      each step = one continuous-batching step
    adapters fill the tree until the last      with `batch` running requests:
    KV tier is full and evicting, then a         append  x batch  (decode growth)
    settle phase                                 allocate x few   (match + pin + swap-in/evict)
                                                 free     x few   (insert + unpin)
                                                 tick     x 1     (swap planning)
                                               then: match throughput over a prompt stream

The model is Llama-2-7B-like (8 MiB per 16-token block) with rank-16 q/k/v/o adapters
(4 blocks each). The device pool is an H100/H200-class KV space (a tenth of the KV
target); the host pool holds the rest of the target, so the steady state has about
`kv_blocks` cached KV blocks in the tree, the device evicts all the time, and adapters
compete with KV for device blocks. Nothing is copied (`CountingMover`); only the cache's
Python bookkeeping is timed, with `time.perf_counter` around each call, never around the
workload generator. Every policy in `--policy` runs the same workload with the same
seed; `vllm` always runs too, as the baseline the others are reported relative to.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from fastlibra.bench.report import run_facts, write_json
from fastlibra.cache import CacheManager, CountingMover, Tier, get_policy
from fastlibra.config import CacheConfig, LoraShape, ModelShape

MODEL = ModelShape("llama-2-7b-like", num_layers=32, hidden_size=4096, num_heads=32,
                   num_kv_heads=32, intermediate_size=11008, dtype_bytes=2)
LORA = LoraShape(rank=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
BLOCK_SIZE = 16
BASELINE = "vllm"
TARGET_STEP_MS = 1.0

VOCAB = 32000
MAX_CONTEXT = 2048
"""Tokens; a session ends before its next turn would pass this."""
STEP_S = 0.025
"""Simulated wall time of one decode step (a 64-request batch of a 7B model)."""
ZIPF_S = 1.0
P_CONTINUE = 0.6
"""Chance that the next request is the next turn of a waiting session."""
P_BASE = 0.05
"""Chance that a new session uses no adapter (the base model)."""
_TOKENS = list(range(VOCAB))  # shared int objects: prompts hold references, not copies


# -- sizes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSizes:
    adapters: int
    kv_blocks: int
    batch: int
    adapter_blocks: int
    device_blocks: int
    host_blocks: int

    @classmethod
    def build(cls, adapters: int, kv_blocks: int, batch: int) -> BenchSizes:
        if adapters < 1 or kv_blocks < 1 or batch < 1:
            raise SystemExit("bench cache: --adapters, --kv-blocks and --batch must be positive")
        probe = CacheConfig(MODEL, device_blocks=1, host_blocks=0, block_size=BLOCK_SIZE)
        adapter_blocks = probe.blocks_for_bytes(LORA.nbytes(MODEL))
        # A tenth of the KV target (10,000 blocks = 78 GiB for the default), but always room
        # for a full batch of long requests (pinned prefix + own blocks) and their adapters.
        max_req_blocks = probe.blocks_for_tokens(MAX_CONTEXT)
        device = max(kv_blocks // 10, batch * (max_req_blocks + adapter_blocks))
        # The host takes what the device cannot, plus room for every adapter and the
        # device's swapper headroom, so a full cache holds about `kv_blocks` of KV.
        host = max(0, kv_blocks - device) + adapters * adapter_blocks + device // 20
        return cls(adapters, kv_blocks, batch, adapter_blocks, device, host)

    def config(self) -> CacheConfig:
        return CacheConfig(MODEL, device_blocks=self.device_blocks, host_blocks=self.host_blocks,
                           block_size=BLOCK_SIZE)


# -- workload ---------------------------------------------------------------------------
@dataclass(eq=False)
class Session:
    adapter: str | None
    context: tuple[int, ...]
    """Everything said so far (prompt + response of the last turn)."""
    turns_left: int


@dataclass(eq=False)
class Request:
    rid: str
    session: Session
    prompt: tuple[int, ...]
    response: tuple[int, ...]
    """Tokens it will generate; its length is the number of steps it runs."""
    alloc: object = None
    generated: int = 0


class Workload:
    """Multi-turn chat over adapters with Zipf popularity and per-adapter system prompts.

    Every adapter has 1-3 system prompts (64-512 tokens); a session starts with one of
    them plus a user message and returns for up to 8 turns, each prompt extending the
    previous turn's prompt and response. So each adapter's radix tree has shared roots
    (system prompts), branches (sessions) and depth (turns).
    """

    def __init__(self, adapters: list[str], seed: int) -> None:
        self.adapters = adapters
        self.seed = seed
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        order = list(range(len(adapters)))
        self.rng.shuffle(order)  # popularity rank is not registration order
        self.by_rank = [adapters[i] for i in order]
        weights = [1.0 / (r + 1) ** ZIPF_S for r in range(len(adapters))]
        total = 0.0
        self.cum = []
        for w in weights:
            total += w
            self.cum.append(total)
        self._index = {a: i for i, a in enumerate(adapters)}
        self._system: dict[str | None, list[tuple[int, ...]]] = {}
        self.idle: deque[Session] = deque(maxlen=2000)
        self._n = 0

    def tokens(self, n: int, rng: np.random.Generator | None = None) -> tuple[int, ...]:
        ids = (rng or self.np).integers(0, VOCAB, n).tolist()
        return tuple(map(_TOKENS.__getitem__, ids))

    def zipf_adapter(self) -> str | None:
        if self.rng.random() < P_BASE:
            return None
        return self.rng.choices(self.by_rank, cum_weights=self.cum)[0]

    def system_prompt(self, adapter: str | None) -> tuple[int, ...]:
        prompts = self._system.get(adapter)
        if prompts is None:
            rng = np.random.default_rng([self.seed, self._index.get(adapter, -1) + 1])
            prompts = [self.tokens(int(rng.integers(64, 513)), rng)
                       for _ in range(int(rng.integers(1, 4)))]
            self._system[adapter] = prompts
        return self.rng.choice(prompts)

    def user_message(self) -> tuple[int, ...]:
        return self.tokens(self.rng.randint(32, 256))

    def next_request(self) -> Request:
        self._n += 1
        life = self.rng.randint(8, 56)
        if self.idle and self.rng.random() < P_CONTINUE:
            i = self.rng.randrange(len(self.idle))
            session = self.idle[i]
            del self.idle[i]
            prompt = session.context + self.user_message()
        else:
            adapter = self.zipf_adapter()
            session = Session(adapter, (), self.rng.randint(0, 7))
            prompt = self.system_prompt(adapter) + self.user_message()
        return Request(f"r{self._n}", session, prompt, self.tokens(life))

    def finished(self, req: Request) -> None:
        """The turn is over: the session may come back with another turn later."""
        s = req.session
        s.context = req.prompt + req.response
        if s.turns_left > 0 and len(s.context) + 256 + 56 <= MAX_CONTEXT:
            s.turns_left -= 1
            self.idle.append(s)

    def match_prompts(self, n: int) -> tuple[list[tuple[str | None, tuple[int, ...]]], dict]:
        """A stream of prompts as they arrive, without changing the sessions:
        next turns of waiting sessions (long hits, unless evicted), new sessions on
        popular adapters (system-prompt hits), new sessions on any adapter (tail: often
        host or miss) and prompts sharing nothing cached (misses)."""
        kinds = {"next_turn": 0.45, "new_popular": 0.25, "new_tail": 0.10, "unrelated": 0.20}
        names, weights = list(kinds), list(kinds.values())
        out = []
        count = dict.fromkeys(kinds, 0)
        for _ in range(n):
            kind = self.rng.choices(names, weights)[0]
            if kind == "next_turn" and not self.idle:
                kind = "new_popular"
            count[kind] += 1
            if kind == "next_turn":
                s = self.idle[self.rng.randrange(len(self.idle))]
                out.append((s.adapter, s.context + self.user_message()))
            elif kind == "new_popular":
                a = self.zipf_adapter()
                out.append((a, self.system_prompt(a) + self.user_message()))
            elif kind == "new_tail":
                a = self.rng.choice(self.adapters)
                out.append((a, self.system_prompt(a) + self.user_message()))
            else:
                out.append((self.zipf_adapter(), self.tokens(self.rng.randint(96, 768))))
        return out, count


# -- the scheduler loop -----------------------------------------------------------------
OPS = ("allocate", "append", "free", "tick")


@dataclass
class Recorder:
    """Per-call and per-step times of the cache calls (seconds)."""

    calls: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    steps: list[float] = field(default_factory=list)


class GCMonitor:
    """Counts the garbage collector's runs during the measured steps: with the default
    thresholds they land inside cache calls now and then and make much of the tail."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.events: list[tuple[int, int, float]] = []  # (step index, generation, seconds)
        self._t0 = 0.0

    def __enter__(self) -> GCMonitor:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.events.append((len(self.rec.steps), info["generation"],
                                time.perf_counter() - self._t0))

    def summary(self, slow_steps: set[int]) -> dict:
        by_gen = {str(g): sum(1 for _, gg, _ in self.events if gg == g) for g in range(3)}
        return {"collections": by_gen,
                "ms_total": 1e3 * sum(d for *_, d in self.events),
                "ms_max": 1e3 * max((d for *_, d in self.events), default=0.0),
                "slowest_1pct_steps_with_gc": len(slow_steps & {i for i, *_ in self.events}),
                "slowest_1pct_steps": len(slow_steps)}


class Driver:
    """Plays the scheduler: keeps `batch` requests running, one decode token per step."""

    def __init__(self, cm: CacheManager, wl: Workload, batch: int) -> None:
        self.cm = cm
        self.wl = wl
        self.batch = batch
        self.running: list[Request] = []
        self.pending: deque[Request] = deque()
        self.step_no = 0
        self.admitted = 0
        self.preempted = 0

    def step(self, rec: Recorder | None) -> None:
        cm, clock = self.cm, time.perf_counter
        now = self.step_no * STEP_S
        self.step_no += 1
        t_step = 0.0
        t_alloc: list[float] = []
        t_append: list[float] = []
        t_free: list[float] = []

        # 1. decode: each running request needs KV for the token it sampled last step
        still: list[Request] = []
        for req in self.running:
            n = len(req.prompt) + req.generated
            t0 = clock()
            ok = cm.append(req.alloc, n, now)
            dt = clock() - t0
            t_append.append(dt)
            if ok:
                still.append(req)
                continue
            computed = req.prompt + req.response[:req.generated - 1]
            t0 = clock()
            cm.free(req.alloc, computed, now)  # preempt (recompute later)
            t_free.append(clock() - t0)
            self.preempted += 1
            req.alloc, req.generated = None, 0
            self.pending.appendleft(req)
        self.running = still

        # 2. admit: fill the batch (prefill samples the first token)
        while len(self.running) < self.batch:
            req = self.pending.popleft() if self.pending else self.wl.next_request()
            t0 = clock()
            alloc = cm.allocate(req.rid, req.session.adapter, req.prompt, now)
            t_alloc.append(clock() - t0)
            if alloc is None:
                self.pending.appendleft(req)
                if not self.running:
                    raise RuntimeError("bench: a request cannot be admitted into an idle cache")
                break
            req.alloc = alloc
            self.running.append(req)
            self.admitted += 1

        # 3. the model step: everyone samples one token; finished requests leave
        still = []
        for req in self.running:
            req.generated += 1
            if req.generated < len(req.response):
                still.append(req)
                continue
            computed = req.prompt + req.response[:-1]
            t0 = clock()
            cm.free(req.alloc, computed, now)
            t_free.append(clock() - t0)
            self.wl.finished(req)
        self.running = still

        # 4. between steps: the swapper plans moves
        t0 = clock()
        cm.tick(now)
        t_tick = clock() - t0

        if rec is not None:
            t_step = sum(t_alloc) + sum(t_append) + sum(t_free) + t_tick
            rec.calls["allocate"] += t_alloc
            rec.calls["append"] += t_append
            rec.calls["free"] += t_free
            rec.calls["tick"].append(t_tick)
            rec.steps.append(t_step)


# -- one policy -------------------------------------------------------------------------
def _cached_kv(cm: CacheManager) -> dict[str, int]:
    from fastlibra.cache.pool import BlockKind
    dev = sum(p.used(BlockKind.KV_CACHED) for p in cm.device_pools)
    host = cm.host_pool.used(BlockKind.KV_CACHED)
    return {"device": dev, "host": host, "total": dev + host}


def _tree_shape(cm: CacheManager) -> dict[str, float]:
    """KV nodes, the deepest chain and the mean depth of KV nodes, over all adapters."""
    depth_sum = max_depth = kv = 0
    for a in cm._all_adapters():
        stack = [(c, 1) for c in a.children.values()]
        while stack:
            n, d = stack.pop()
            kv += 1
            depth_sum += d
            max_depth = max(max_depth, d)
            stack.extend((c, d + 1) for c in n.children.values())
    return {"kv_nodes": kv, "max_depth": max_depth,
            "mean_depth": round(depth_sum / kv, 2) if kv else 0.0}


def _adapter_tiers(cm: CacheManager) -> dict[str, int]:
    out = {t.name.lower(): 0 for t in Tier}
    for a in cm.adapters.values():
        out[a.tier.name.lower()] += 1
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else 0.0


def _event_counts(cm: CacheManager, d: Driver) -> dict[str, int]:
    s = cm.stats
    return {"requests": s.requests, "deferred": s.deferred, "preempted": d.preempted,
            "swap_outs": s.swap_outs, "swap_ins": s.swap_ins, "drops": s.drops,
            "adapter_device_hits": s.adapter_device_hits,
            "adapter_host_hits": s.adapter_host_hits, "adapter_disk_loads": s.adapter_disk_loads,
            "prompt_tokens": s.prompt_tokens, "device_hit_tokens": s.device_hit_tokens,
            "host_hit_tokens": s.host_hit_tokens}


def run_policy(policy: str, sizes: BenchSizes, steps: int, seed: int,
               match_n: int = 0, log=print) -> dict:
    gc.collect()  # the previous policy's tree (parent <-> children cycles) goes now
    cfg = sizes.config()
    cm = CacheManager(cfg, get_policy(policy), CountingMover())
    names = [f"lora-{i:04d}" for i in range(sizes.adapters)]
    nbytes = LORA.nbytes(MODEL)
    for name in names:
        cm.register_adapter(name, nbytes)
    wl = Workload(names, seed)
    drv = Driver(cm, wl, sizes.batch)

    # Warm-up: fill until the last KV tier is full and drops (or forever-empty for a
    # policy that keeps no KV), then settle so the measured steps see a steady state.
    t0 = time.perf_counter()
    kv_room = cm.device_kv_pool.capacity + (cm.host_pool.capacity if cm.policy.host_kv else 0)
    cap = max(1, min(sizes.kv_blocks, kv_room))  # the bar's end: what this policy can cache
    max_fill = 200 + 2 * sizes.kv_blocks  # a safety net: filling takes ~kv_blocks / 25 steps
    with tqdm(total=cap, desc=f"warm-up {policy}: cached KV blocks", unit="blk",
              file=sys.stderr, mininterval=0.5, dynamic_ncols=True, leave=False) as bar:
        shown = 0
        while cm.stats.drops == 0 and cm.policy.reuse_kv and drv.step_no < max_fill:
            drv.step(None)
            if drv.step_no % 50 == 0:
                kv = min(cap, _cached_kv(cm)["total"])
                bar.update(kv - shown)
                shown = kv
                bar.set_postfix(nodes=cm.num_nodes, refresh=False)
        fill_steps = drv.step_no
        if fill_steps >= max_fill:
            log(f"warning: {policy} never filled its cache in {max_fill:,} steps; measuring anyway")
        settle = min(1000, max(50, steps))
        bar.set_description(f"warm-up {policy}: settling")
        for _ in range(settle):
            drv.step(None)
    warm_s = time.perf_counter() - t0
    kv = _cached_kv(cm)
    shape = _tree_shape(cm)
    at = _adapter_tiers(cm)
    warm_nodes, warm_kv = cm.num_nodes, kv
    log(f"warm-up {policy}: {drv.step_no:,} steps ({fill_steps:,} to fill, {settle:,} to "
        f"settle), {drv.admitted:,} requests, {warm_s:.1f} s -> {cm.num_nodes:,} nodes "
        f"({shape['kv_nodes']:,} KV, depth max {shape['max_depth']} mean "
        f"{shape['mean_depth']}), cached KV {kv['total']:,} blocks (device {kv['device']:,}"
        f" / host {kv['host']:,}), adapters device/host/disk "
        f"{at['device']}/{at['host']}/{at['disk']}")

    # Measured steps.
    before = _event_counts(cm, drv)
    rec = Recorder()
    gc.collect()  # start every policy from the same clean heap, GC left on as in a server
    with GCMonitor(rec) as gcm:
        for _ in tqdm(range(steps), desc=f"measure {policy}", unit="step", file=sys.stderr,
                      mininterval=0.5, dynamic_ncols=True, leave=False):
            drv.step(rec)
    cut = _pct(rec.steps, 99)
    slow = {i for i, t in enumerate(rec.steps) if t >= cut}
    after = _event_counts(cm, drv)
    events = {k: after[k] - before[k] for k in after}
    pt = events["prompt_tokens"] or 1

    # Match throughput over a prompt stream, on the steady-state tree.
    prompts, kinds = wl.match_prompts(match_n or min(20_000, max(1_000, 10 * steps)))
    hit_dev = hit_host = total = 0
    t0 = time.perf_counter()
    for adapter, tokens in prompts:
        cm.match(adapter, tokens)
    match_s = time.perf_counter() - t0
    for adapter, tokens in prompts:  # untimed: how much of the stream hit
        d, h, _ = cm.match(adapter, tokens)
        hit_dev += d
        hit_host += h
        total += len(tokens)

    ops = {}
    for op in OPS:
        xs = rec.calls[op]
        ops[op] = {"calls": len(xs), "per_step": round(len(xs) / max(1, steps), 2),
                   "mean_us": 1e6 * sum(xs) / len(xs) if xs else 0.0,
                   "p50_us": 1e6 * _pct(xs, 50), "p99_us": 1e6 * _pct(xs, 99),
                   "max_us": 1e6 * max(xs) if xs else 0.0,
                   "share_of_step": sum(xs) / max(1e-12, sum(rec.steps))}
    kv = _cached_kv(cm)
    return {
        "policy": policy,
        "step_ms": 1e3 * _pct(rec.steps, 50),
        "step_mean_ms": 1e3 * sum(rec.steps) / len(rec.steps) if rec.steps else 0.0,
        "step_p99_ms": 1e3 * _pct(rec.steps, 99),
        "step_max_ms": 1e3 * max(rec.steps) if rec.steps else 0.0,
        "match_per_s": len(prompts) / max(match_s, 1e-9),
        "match": {"prompts": len(prompts), "kinds": kinds,
                  "mean_prompt_tokens": total / max(1, len(prompts)),
                  "device_hit_frac": hit_dev / max(1, total),
                  "host_hit_frac": hit_host / max(1, total)},
        "ops": ops,
        "steps": steps,
        "nodes": cm.num_nodes,
        "tree": _tree_shape(cm),
        "blocks": {"cached_kv": kv, "pools": cm.usage(),
                   "capacity": {p.name: p.capacity for p in cm.pools}},
        "adapters": _adapter_tiers(cm),
        "events": events,
        "device_hit_rate": events["device_hit_tokens"] / pt,
        "host_hit_rate": events["host_hit_tokens"] / pt,
        "warmup": {"steps": drv.step_no - steps, "fill_steps": fill_steps, "seconds": warm_s,
                   "nodes": warm_nodes, "tree": shape, "cached_kv": warm_kv, "adapters": at},
        "gc": gcm.summary(slow),
        "heap_entries": {"evict": sum(len(h) for h in cm.swapper._evict.values()),
                         "prefetch": sum(len(h) for h in cm.swapper._prefetch.values())},
    }


# -- reporting --------------------------------------------------------------------------
def _table(runs: dict[str, dict], baseline: str | None) -> str:
    head = (f"{'policy':<16} {'step_ms':>8} {'p99_ms':>7} {'alloc_us':>9} {'append_us':>9} "
            f"{'free_us':>8} {'tick_us':>8} {'match/s':>9} {'nodes':>8} {'KV dev/host':>15} "
            f"{'vs ' + (baseline or '-'):>9}")
    lines = [head, "-" * len(head)]
    base = runs.get(baseline) if baseline else None
    for name, r in runs.items():
        o = r["ops"]
        kv = r["blocks"]["cached_kv"]
        rel = f"x{r['step_ms'] / base['step_ms']:.2f}" if base and base["step_ms"] > 0 else "-"
        lines.append(
            f"{name:<16} {r['step_ms']:>8.3f} {r['step_p99_ms']:>7.3f} "
            f"{o['allocate']['mean_us']:>9.1f} {o['append']['mean_us']:>9.2f} "
            f"{o['free']['mean_us']:>8.1f} {o['tick']['mean_us']:>8.1f} "
            f"{r['match_per_s']:>9,.0f} {r['nodes']:>8,} "
            f"{kv['device']:>7,}/{kv['host']:<7,} {rel:>9}")
    return "\n".join(lines)


def run_cache_bench(args) -> int:
    sizes = BenchSizes.build(args.adapters, args.kv_blocks, args.batch)
    if args.steps < 1:
        raise SystemExit("bench cache: --steps must be positive")
    policies = list(dict.fromkeys(args.policy))
    order = policies + ([BASELINE] if BASELINE not in policies else [])
    bb = sizes.config().block_bytes
    print(f"cache bookkeeping benchmark: {MODEL.name} ({bb >> 20} MiB/block of "
          f"{BLOCK_SIZE} tokens), {sizes.adapters:,} adapters of rank {LORA.rank} "
          f"({sizes.adapter_blocks} blocks each, {sizes.adapters * sizes.adapter_blocks:,} "
          f"in all), device {sizes.device_blocks:,} blocks, host {sizes.host_blocks:,} blocks, "
          f"KV target {sizes.kv_blocks:,}, batch {sizes.batch}, {args.steps:,} steps, "
          f"seed {args.seed}", flush=True)

    runs: dict[str, dict] = {}
    for p in order:
        r = run_policy(p, sizes, args.steps, args.seed)
        runs[p] = r
    first = runs[policies[0]]
    baseline = BASELINE if policies[0] != BASELINE else None
    print()
    print(_table(runs, baseline))
    for name, r in runs.items():
        e, g = r["events"], r["gc"]
        print(f"  {name}: per step {r['ops']['allocate']['per_step']} allocate, "
              f"{r['ops']['free']['per_step']} free; measured phase: {e['swap_outs']:,} "
              f"swap-outs, {e['swap_ins']:,} swap-ins, {e['drops']:,} drops, "
              f"{e['adapter_disk_loads']:,} adapter loads from disk, "
              f"{e['adapter_host_hits']:,} from host, {e['deferred']:,} deferred, "
              f"{e['preempted']:,} preempted; hit rate device {r['device_hit_rate']:.1%} "
              f"host {r['host_hit_rate']:.1%}; GC ran {sum(g['collections'].values())} times "
              f"({g['ms_total']:.0f} ms), in {g['slowest_1pct_steps_with_gc']} of the "
              f"{g['slowest_1pct_steps']} slowest steps")
    met = first["step_ms"] < TARGET_STEP_MS
    print(f"target: < {TARGET_STEP_MS:g} ms of bookkeeping per step -> "
          f"{'MET' if met else 'NOT MET'} ({policies[0]}: median {first['step_ms']:.3f} ms, "
          f"p99 {first['step_p99_ms']:.3f} ms)")

    out = {
        "benchmark": "cache",
        "policy": policies[0],
        "step_ms": first["step_ms"],
        "step_p99_ms": first["step_p99_ms"],
        "match_per_s": first["match_per_s"],
        "ops": first["ops"],
        "nodes": first["nodes"],
        "blocks": first["blocks"],
        "target_step_ms": TARGET_STEP_MS,
        "target_met": met,
        "baseline": baseline,
        "relative_to_baseline": {
            name: {"step_ms": r["step_ms"] / runs[baseline]["step_ms"],
                   "step_p99_ms": r["step_p99_ms"] / runs[baseline]["step_p99_ms"],
                   "match_per_s": r["match_per_s"] / runs[baseline]["match_per_s"]}
            for name, r in runs.items() if baseline and name != baseline
        },
        "runs": runs,
        "config": {"adapters": sizes.adapters, "kv_blocks": sizes.kv_blocks,
                   "batch": sizes.batch, "steps": args.steps, "seed": args.seed,
                   "policies": order, "model": MODEL.name, "block_size": BLOCK_SIZE,
                   "block_bytes": bb, "lora_rank": LORA.rank,
                   "lora_targets": list(LORA.target_modules),
                   "adapter_blocks": sizes.adapter_blocks,
                   "device_blocks": sizes.device_blocks, "host_blocks": sizes.host_blocks,
                   "step_s": STEP_S, "zipf_s": ZIPF_S, "max_context": MAX_CONTEXT},
        "machine": run_facts(),
    }
    if args.json:
        write_json(args.json, out)
    return 0
