"""Run one workload through the engine on the simulated runner, once per policy.

Every policy sees the same requests (regenerated from the seed), the same scheduler, the
same step-time model and the same memory budget; only the cache policy differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from tqdm import tqdm

from fastlibra.cache import CacheManager, get_policy
from fastlibra.config import CacheConfig, ConfigError, SchedulerConfig
from fastlibra.engine.engine import Engine
from fastlibra.engine.metrics import Timeline, summarize
from fastlibra.engine.request import Request
from fastlibra.sim.profiles import GiB, SimProfile
from fastlibra.sim.runner import SimMover, SimRunner


@dataclass(frozen=True)
class SimSetup:
    """Hardware, memory and scheduler settings shared by every policy of a run."""

    profile: SimProfile
    device_memory: int | None = None
    """Bytes for the unified device pool; None = HBM minus weights and activations."""
    host_memory: int = 256 * GiB
    block_size: int = 16
    scheduler: SchedulerConfig = SchedulerConfig()
    adapter_share: float | None = None
    """Override of the static adapter share of `vllm`/`sglang` (vllm-oracle sweeps it)."""
    decay_half_life_s: float = CacheConfig.decay_half_life_s
    adapters_in_host: bool = True
    """Every policy's starting state: adapters in host memory, or all on disk."""
    adapter_bytes: Mapping[str, int] | None = None
    """Bytes each named adapter books (a real engine's sizes, ranks differing); adapters
    not named, or all when None, take the profile's adapter size."""

    def cache_config(self) -> CacheConfig:
        device = self.profile.free_hbm_bytes() if self.device_memory is None else self.device_memory
        block_bytes = self.block_size * self.profile.model.kv_bytes_per_token
        if device < block_bytes:
            raise ConfigError(f"device memory of {device} bytes holds no {block_bytes}-byte block")
        return CacheConfig(model=self.profile.model, block_size=self.block_size,
                           device_blocks=device // block_bytes,
                           host_blocks=self.host_memory // block_bytes,
                           hardware=self.profile.hardware_profile(),
                           decay_half_life_s=self.decay_half_life_s,
                           adapters_in_host=self.adapters_in_host)


def adapter_names(requests: list[Request]) -> list[str]:
    """Every adapter any request or follow-up turn uses, in first-use order."""
    seen: dict[str, None] = {}
    for r in requests:
        turn: Request | None = r
        while turn is not None:
            if turn.adapter:
                seen.setdefault(turn.adapter)
            turn = turn.next_turn
    return list(seen)


def count_requests(requests: list[Request]) -> int:
    n = 0
    for r in requests:
        turn: Request | None = r
        while turn is not None:
            n += 1
            turn = turn.next_turn
    return n


def build_cache(policy: str, setup: SimSetup, adapters: list[str]) -> CacheManager:
    """One engine's cache under `policy` on the simulated copy engine, `adapters` registered."""
    share = setup.adapter_share if get_policy(policy).adapter_share is not None else None
    cache = CacheManager(setup.cache_config(), get_policy(policy, share),
                         SimMover(setup.profile))
    uniform = setup.profile.lora.nbytes(setup.profile.model)
    sizes = setup.adapter_bytes or {}
    for name in adapters:
        cache.register_adapter(name, sizes.get(name, uniform))
    return cache


def simulate(policy: str, requests: list[Request], setup: SimSetup,
             progress: tqdm | None = None, timeline_interval_s: float = 1.0,
             records: list[dict] | None = None) -> dict:
    """One policy over (a fresh copy of) `requests`; returns the summary plus the timeline.
    `records`, if given, gets one entry per finished request (`bench fidelity` compares
    them with the real engine's, request by request)."""
    requests = [r.fresh_copy() for r in requests]
    cache = build_cache(policy, setup, adapter_names(requests))
    runner = SimRunner(setup.profile, cache.mover)
    timeline = Timeline(min_interval_s=timeline_interval_s)
    last_done = [0]

    def observe(engine: Engine) -> None:
        timeline.observe(engine.cache, engine.now)
        if progress is not None:
            n = len(engine.finished) + len(engine.scheduler.rejected)
            progress.update(n - last_done[0])
            last_done[0] = n

    engine = Engine(setup.scheduler, cache, runner, observer=observe)
    for r in requests:
        engine.add_request(r)
    start = min((r.arrival for r in requests), default=0.0)
    engine.now = start
    finished = engine.run()
    result = summarize(finished, engine.scheduler.rejected, cache, timeline, engine.now - start)
    result["rejections"] = sorted({r.reject_reason for r in engine.scheduler.rejected
                                   if r.reject_reason})[:5]
    result["timeline"] = {"t": timeline.times, **timeline.composition}
    result["ttfts"] = sorted(r.ttft for r in finished if r.ttft is not None)
    if records is not None:
        records += [{"id": r.request_id, "adapter": r.adapter, "arrival": r.arrival,
                     "prompt_tokens": len(r.prompt), "cached_tokens": r.cached_tokens,
                     "output_tokens": len(r.generated), "ttft": r.ttft,
                     "t_queue": r.t_queue, "t_adapter_wait": r.t_adapter_wait,
                     "t_kv_wait": r.t_kv_wait, "t_prefill": r.t_prefill}
                    for r in finished]
    return result


def with_unlimited_memory(setup: SimSetup) -> SimSetup:
    """The lower bound: a device pool large enough that nothing is ever evicted."""
    return replace(setup, device_memory=64 * 1024 * GiB)
