"""What a run reports: latency percentiles, throughput, cache behaviour over time."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastlibra.cache import CacheManager
from fastlibra.engine.request import Request

COMPOSITION_KINDS = ("adapter", "kv_cached", "kv_running", "invalid_kv", "free")


@dataclass
class Timeline:
    """Device-pool composition sampled after steps, and invalid KV integrated over time."""

    min_interval_s: float = 1.0
    times: list[float] = field(default_factory=list)
    composition: dict[str, list[int]] = field(
        default_factory=lambda: {k: [] for k in COMPOSITION_KINDS})
    invalid_kv_block_s: float = 0.0
    used_block_s: float = 0.0
    _last: float = 0.0

    def observe(self, cache: CacheManager, now: float) -> None:
        invalid = cache.invalid_kv_blocks
        used = sum(p.num_used for p in cache.device_pools)
        dt = now - self._last
        self.invalid_kv_block_s += invalid * dt
        self.used_block_s += used * dt
        self._last = now
        if self.times and now - self.times[-1] < self.min_interval_s:
            return
        self.times.append(now)
        totals = dict.fromkeys(COMPOSITION_KINDS, 0)
        for pool in cache.device_pools:
            for k, v in pool.usage().items():
                totals[k] += v
        totals["kv_cached"] -= invalid
        totals["invalid_kv"] = invalid
        for k in COMPOSITION_KINDS:
            self.composition[k].append(totals[k])


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def latency_summary(finished: list[Request]) -> dict[str, float]:
    """TTFT percentiles, TPOT and the TTFT breakdown of finished requests."""
    ttft = [r.ttft for r in finished if r.ttft is not None]
    return {
        "ttft_mean": _mean(ttft),
        "ttft_p50": _pct(ttft, 50),
        "ttft_p90": _pct(ttft, 90),
        "ttft_p99": _pct(ttft, 99),
        "tpot_mean": _mean([r.tpot for r in finished if r.tpot is not None]),
        "ttft_queue": _mean([r.t_queue for r in finished]),
        "ttft_adapter": _mean([r.t_adapter_wait for r in finished]),
        "ttft_kv": _mean([r.t_kv_wait for r in finished]),
        "ttft_prefill": _mean([r.t_prefill for r in finished]),
    }


def summarize(finished: list[Request], rejected: list[Request], cache: CacheManager,
              timeline: Timeline, elapsed: float) -> dict[str, float]:
    """The numbers of one policy's run (keys are stable: the JSON and tables use them).
    A policy that ranks by the cost model also reports what the model learned."""
    st = cache.stats
    capacity = sum(p.capacity for p in cache.device_pools)
    out_tokens = sum(len(r.generated) for r in finished)
    return {
        "completed": len(finished),
        "rejected": len(rejected),
        **latency_summary(finished),
        "throughput_rps": len(finished) / elapsed if elapsed > 0 else 0.0,
        "throughput_tps": out_tokens / elapsed if elapsed > 0 else 0.0,
        "device_hit_rate": st.device_hit_rate,
        "host_hit_rate": st.host_hit_rate,
        "invalid_kv_block_s": timeline.invalid_kv_block_s,
        "swap_in_gib": st.bytes_moved["swap_in"] / 2**30,
        "swap_out_gib": st.bytes_moved["swap_out"] / 2**30,
        "adapter_load_gib": (st.bytes_moved["load"] + st.bytes_moved["load_host"]) / 2**30,
        "device_mem_util": timeline.used_block_s / (capacity * elapsed) if elapsed > 0 else 0.0,
        "preemptions": sum(r.num_preemptions for r in finished),
        **(cache.cost.learned() if cache.policy.ranks_by_decay else {}),
    }
