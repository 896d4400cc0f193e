"""`fastlibra demo`: replay a small multi-adapter, multi-turn chat through every policy.

Until the engine exists this drives the cache directly with a minimal step loop: each
step admits waiting requests in arrival order while the cache can place them, grows every
running request by one decoded token, finishes those that are done (their KV joins the
tree) and lets the swapper tick. Only cache decisions differ between policies, so the
table isolates what the cache does: hit rates, invalid KV held on device, bytes moved.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from tqdm import tqdm

from fastlibra.cache import CacheManager, Tier, get_policy
from fastlibra.config import CacheConfig, HardwareProfile, LoraShape, ModelShape

GiB = 1 << 30

LLAMA2_7B = ModelShape("llama-2-7b", num_layers=32, hidden_size=4096, num_heads=32,
                       num_kv_heads=32, intermediate_size=11008)
A100_PCIE4 = HardwareProfile(name="a100-80g", h2d_bandwidth=25e9, d2h_bandwidth=25e9,
                             disk_bandwidth=2e9, adapter_parse_s=0.01, prefill_base=0.01,
                             prefill_per_token=6e-5, prefill_per_token_pair=2e-10)
"""Round numbers for an A100 with PCIe 4; later issues replace them with measurements."""

STEP_S = 0.05
"""Simulated seconds per scheduler step (one decode token for every running request)."""


@dataclass
class DemoRequest:
    rid: str
    session: int
    adapter: str
    arrival: float
    prompt: list[int]
    output: list[int]


@dataclass
class DemoWorkload:
    """Chat sessions over Zipf-popular adapters; each turn extends the last conversation."""

    num_adapters: int = 16
    num_sessions: int = 48
    turns: tuple[int, int] = (2, 6)
    think_s: float = 8.0
    session_rate: float = 0.6
    """New sessions per second."""
    system_prompt: int = 96
    user_tokens: tuple[int, int] = (32, 160)
    output_tokens: tuple[int, int] = (16, 96)
    zipf: float = 1.0
    adapter_rank: int = 32
    seed: int = 0
    requests: list[DemoRequest] = field(default_factory=list)

    def generate(self) -> list[DemoRequest]:
        """Deterministic for a seed: turn k+1's prompt = turn k's prompt + answer + new text."""
        rng = random.Random(self.seed)
        weights = [1 / (i + 1) ** self.zipf for i in range(self.num_adapters)]
        out: list[DemoRequest] = []
        start = 0.0
        vocab = 32000
        for s in range(self.num_sessions):
            start += rng.expovariate(self.session_rate)
            a = rng.choices(range(self.num_adapters), weights)[0]
            sys_rng = random.Random(10_000 + a)  # every session of an adapter shares its prompt
            history = [sys_rng.randrange(vocab) for _ in range(self.system_prompt)]
            t = start
            for k in range(rng.randint(*self.turns)):
                history = history + [rng.randrange(vocab) for _ in range(rng.randint(*self.user_tokens))]
                answer = [rng.randrange(vocab) for _ in range(rng.randint(*self.output_tokens))]
                out.append(DemoRequest(f"s{s}t{k}", s, f"lora-{a}", t, history, answer))
                history = history + answer
                t += rng.expovariate(1 / self.think_s) + len(answer) * STEP_S
        out.sort(key=lambda r: r.arrival)
        return out


def replay(policy: str, workload: DemoWorkload, cfg: CacheConfig,
           progress: tqdm | None = None) -> dict[str, float]:
    """Run the workload through one policy; return the table row."""
    cache = CacheManager(cfg, get_policy(policy))
    lora_bytes = LoraShape(workload.adapter_rank).nbytes(cfg.model)
    for i in range(workload.num_adapters):
        cache.register_adapter(f"lora-{i}", lora_bytes)
    pending = list(workload.generate())
    pending.reverse()
    waiting: list[DemoRequest] = []
    running: list[tuple[DemoRequest, object, int]] = []
    now, invalid_sum, invalid_peak, steps, cost_s = 0.0, 0, 0, 0, 0.0
    while pending or waiting or running:
        while pending and pending[-1].arrival <= now:
            waiting.append(pending.pop())
        while waiting:
            req = waiting[0]
            adapter_tier = cache.adapter(req.adapter).tier
            alloc = cache.allocate(req.rid, req.adapter, req.prompt, now, reserve_tokens=1)
            if alloc is None:
                break
            waiting.pop(0)
            running.append((req, alloc, 0))
            cost_s += miss_cost(cache, alloc, adapter_tier)
        still = []
        for req, alloc, done in running:
            done += 1
            if done >= len(req.output):
                cache.free(alloc, req.prompt + req.output[:-1], now)
                if progress is not None:
                    progress.update(1)
            elif cache.append(alloc, len(req.prompt) + done + 1, now):
                still.append((req, alloc, done))
            else:  # no room to grow: give the blocks back and retry later (recompute)
                cache.free(alloc, req.prompt + req.output[:done - 1], now)
                waiting.insert(0, req)
        running = still
        cache.tick(now)
        invalid = cache.invalid_kv_blocks
        invalid_sum += invalid
        invalid_peak = max(invalid_peak, invalid)
        steps += 1
        now += STEP_S
    st = cache.stats
    return {
        "device_hit_rate": st.device_hit_rate,
        "host_hit_rate": st.host_hit_rate,
        "invalid_kv_blocks_mean": invalid_sum / max(1, steps),
        "invalid_kv_blocks_peak": invalid_peak,
        "moved_gib": sum(st.bytes_moved.values()) / GiB,
        "adapter_loads": st.adapter_disk_loads + st.adapter_host_hits,
        "est_cost_s": cost_s,
        "requests": st.requests,
    }


def miss_cost(cache: CacheManager, alloc, adapter_tier: Tier) -> float:
    """Seconds this admission costs on the hardware profile: prefill of the missed suffix,
    copying host hits back, loading the adapter. A TTFT proxy without queueing."""
    hw = cache.cfg.hardware
    cost = hw.prefill_time(len(alloc.tokens) - alloc.cached_tokens, alloc.cached_tokens)
    cost += hw.h2d_time(cache.cfg.blocks_for_tokens(alloc.host_hit_tokens) * cache.cfg.block_bytes)
    if adapter_tier is Tier.HOST:
        cost += hw.h2d_time(alloc.adapter.nbytes)
    elif adapter_tier is Tier.DISK:
        cost += hw.disk_load_time(alloc.adapter.nbytes)
    return cost


def demo_config(device_gib: float = 3.0, host_gib: float = 8.0) -> CacheConfig:
    block_bytes = 16 * LLAMA2_7B.kv_bytes_per_token
    return CacheConfig(model=LLAMA2_7B, block_size=16, hardware=A100_PCIE4,
                       device_blocks=int(device_gib * GiB // block_bytes),
                       host_blocks=int(host_gib * GiB // block_bytes))


def run_demo(args) -> int:
    workload = DemoWorkload(seed=args.seed)
    cfg = demo_config()
    n = len(workload.generate())
    print(f"{n} requests in {workload.num_sessions} chat sessions over {workload.num_adapters} "
          f"rank-{workload.adapter_rank} adapters (Zipf {workload.zipf}), {cfg.model.name} "
          f"shapes; device pool {cfg.device_blocks} blocks, host pool {cfg.host_blocks} blocks "
          f"of {cfg.block_bytes >> 20} MiB")
    rows = {}
    with tqdm(total=n * len(args.policy), desc="replaying", unit="req", leave=False) as bar:
        for name in args.policy:
            rows[name] = replay(name, workload, cfg, bar)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"policies": rows}, f, indent=2)
    return 0


def format_table(rows: dict[str, dict[str, float]]) -> str:
    head = (f"{'policy':16s} {'device hit':>10s} {'host hit':>9s} {'invalid KV':>11s} "
            f"{'(peak)':>7s} {'moved GiB':>10s} {'adapter loads':>14s} {'est. cost s':>12s}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:16s} {r['device_hit_rate']:10.1%} {r['host_hit_rate']:9.1%} "
                     f"{r['invalid_kv_blocks_mean']:11.1f} {r['invalid_kv_blocks_peak']:7d} "
                     f"{r['moved_gib']:10.2f} {r['adapter_loads']:14d} {r['est_cost_s']:12.2f}")
    lines.append("hit rates: share of prompt tokens served from cache; invalid KV: device "
                 "blocks of KV whose adapter is not on device (mean over steps); est. cost: prefill of\n"
                 "missed tokens + host-hit copies + adapter loads on the hardware profile, summed "
                 "over requests (a TTFT proxy without queueing)")
    return "\n".join(lines)
