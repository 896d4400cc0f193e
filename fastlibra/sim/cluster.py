"""N simulated engines behind one router: a cluster on a laptop.

    arrivals (first turns, and follow-up turns as their previous turn finishes)
        │ in time order
        ▼
    Router.route ──► replica i: Engine(Scheduler, CacheManager) on a SimRunner
        ▲                 │ first token / finish; every publish_interval_s: Residency
        └─────────────────┘

Every replica is the production engine on the simulated runner with its own copy queues,
and every request, follow-up turns included, is placed by a router of `fastlibra.router`
at its arrival time. The replica with the earliest clock steps next unless an arrival is
due first; a step is atomic (and fuses no decode steps past the next arrival), so a
request may reach a replica up to one step after it arrived and waits that long, as it
would behind a running step.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from fastlibra.config import ConfigError
from fastlibra.engine.engine import Engine
from fastlibra.engine.metrics import latency_summary
from fastlibra.engine.request import Request, RequestState
from fastlibra.router import RouteCosts, RouteRequest, make_router
from fastlibra.sim.runner import SimRunner
from fastlibra.sim.simulate import SimSetup, adapter_names, build_cache


@dataclass(frozen=True)
class ClusterSetup:
    """Replicas alike (each one `replica`), how often they publish, what is sampled."""

    replica: SimSetup
    num_replicas: int
    publish_interval_s: float = 10.0
    """Seconds between a replica's residency reports (Ray Serve's routing-stats period)."""
    sample_interval_s: float = 5.0
    """Length of the intervals over which the replicas serving each hot adapter are
    counted."""
    tracked_adapters: int = 8
    """The most requested adapters whose replica count is recorded over time."""

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ConfigError(f"a cluster needs >= 1 replica, got {self.num_replicas}")
        for f in ("publish_interval_s", "sample_interval_s"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"ClusterSetup.{f} must be > 0, got {getattr(self, f)}")


def _turns(requests: list[Request]):
    for r in requests:
        while r is not None:
            yield r
            r = r.next_turn


def simulate_cluster(router_name: str, policy: str, requests: list[Request],
                     cluster: ClusterSetup, seed: int = 0,
                     progress: tqdm | None = None) -> dict:
    """`requests` (a fresh copy) through `cluster.num_replicas` engines under `policy`,
    placed by the router `router_name`; returns latency, cache and routing numbers, and
    for each tracked adapter how many replicas the router sent it to in each interval (at
    the interval's end time): a hot adapter spreads, and shrinks back when it cools."""
    setup = cluster.replica
    requests = [r.fresh_copy() for r in requests]
    names = adapter_names(requests)
    arrivals: list[tuple[float, int, Request]] = []
    order = itertools.count()

    def arrive(req: Request) -> None:
        heapq.heappush(arrivals, (req.arrival, next(order), req))

    caches = [build_cache(policy, setup, names) for _ in range(cluster.num_replicas)]
    engines = [Engine(setup.scheduler, c, SimRunner(setup.profile, c.mover), next_turns=arrive)
               for c in caches]
    cfg = engines[0].cache.cfg
    router = make_router(router_name, cluster.num_replicas,
                         RouteCosts.of(cfg, setup.profile.lora.nbytes(setup.profile.model),
                                       setup.profile.kv_read_time()),
                         seed)
    for r in requests:
        arrive(r)
    popular = Counter(r.adapter for r in _turns(requests) if r.adapter)
    tracked = [a for a, _ in popular.most_common(cluster.tracked_adapters)]
    samples: dict[str, list] = {"t": [], **{a: [] for a in tracked}}
    serving: dict[str, set[int]] = {a: set() for a in tracked}
    next_sample = min((r.arrival for r in requests), default=0.0)

    n = cluster.num_replicas
    ready: list[tuple[float, int]] = []  # (clock, replica) of replicas with work
    queued = [False] * n
    no_token: list[list[Request]] = [[] for _ in range(n)]
    rejected = [0] * n
    next_publish = [cluster.publish_interval_s * (i + 1) / n for i in range(n)]
    routed = [0] * n
    decisions: list[float] = []
    finished: list[Request] = []

    def wake(i: int) -> None:
        if not queued[i] and engines[i].has_work:
            heapq.heappush(ready, (engines[i].now, i))
            queued[i] = True

    while arrivals or ready:
        if ready and (not arrivals or ready[0][0] < arrivals[0][0]):
            _, i = heapq.heappop(ready)
            queued[i] = False
            e = engines[i]
            done = e.step(until=arrivals[0][0] if arrivals else None)
            ended = done + e.scheduler.rejected[rejected[i]:]
            rejected[i] = len(e.scheduler.rejected)
            waiting = []
            for r in no_token[i]:
                if r.t_first_token is not None:
                    router.first_token(r.request_id)
                elif r.state is not RequestState.REJECTED:
                    waiting.append(r)
            no_token[i] = waiting
            for r in ended:
                router.finish(r.request_id)
            finished += done
            if progress is not None:
                progress.update(len(done))
            if e.now >= next_publish[i]:
                router.publish(i, e.cache.residency())
                next_publish[i] = e.now + cluster.publish_interval_s
            wake(i)
            continue
        t, _, req = heapq.heappop(arrivals)
        while t >= next_sample + cluster.sample_interval_s:
            next_sample += cluster.sample_interval_s
            samples["t"].append(next_sample)
            for a in tracked:
                samples[a].append(len(serving[a]))
                serving[a].clear()
        start = time.perf_counter()
        i = router.route(RouteRequest(req.request_id, req.adapter, req.prompt, cfg.block_size))
        decisions.append(time.perf_counter() - start)
        routed[i] += 1
        if req.adapter in serving:
            serving[req.adapter].add(i)
        engines[i].add_request(req)
        no_token[i].append(req)
        wake(i)

    if any(serving.values()):  # the last interval, cut short by the last arrival
        samples["t"].append(next_sample + cluster.sample_interval_s)
        for a in tracked:
            samples[a].append(len(serving[a]))
    stats = [e.cache.stats for e in engines]
    prompt = sum(s.prompt_tokens for s in stats)
    moved = {k: sum(s.bytes_moved[k] for s in stats) / 2**30 for k in stats[0].bytes_moved}
    decisions.sort()
    return {
        "completed": len(finished),
        "rejected": sum(rejected),
        **latency_summary(finished),
        "device_hit_rate": sum(s.device_hit_tokens for s in stats) / prompt if prompt else 0.0,
        "host_hit_rate": sum(s.host_hit_tokens for s in stats) / prompt if prompt else 0.0,
        "adapter_load_gib": moved["load"] + moved["load_host"],
        "swap_in_gib": moved["swap_in"],
        "load_imbalance": max(routed) * n / max(1, sum(routed)),
        "decision_us_mean": 1e6 * sum(decisions) / max(1, len(decisions)),
        "decision_us_p99": 1e6 * decisions[int(0.99 * (len(decisions) - 1))] if decisions else 0.0,
        "replicas_per_adapter": samples,
        "ttfts": sorted(r.ttft for r in finished if r.ttft is not None),
    }
