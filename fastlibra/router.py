"""Which replica serves a request: five routers side by side, as pure code.

    request ──► Router.route ──► replica i    choose(), then note the request in the
                  ▲    ▲                       router's own view of replica i
    replica i ────┘    └──── publish(i, Residency)   adapter tiers + prefix-block hashes,
    first_token / finish                             every few seconds

The router tracks each replica's load itself (it sent every request there and sees each
first token and finish), and between publications it amends its view as it routes: the
adapter it sent is on device there, and so is the prompt's KV. Nothing here imports Ray
or the server, so the cluster simulator (`sim/cluster.py`) runs the very routers that
serve.

`fastlibra` estimates the request's TTFT on every replica in the currency of the cache's
cost model, and takes the lowest:

    queue wait        prefill seconds of the requests ahead that have no first token
                      yet + in the step it shares, one token per running request and
                      the read of their contexts' KV
    + adapter miss    device 0 | host: bytes / h2d | disk or absent: a file load
    + prefill         of the prompt tokens not cached there for this adapter, after the
                      cached prefix; cached blocks on host add their copy in

A hot adapter therefore spreads once the queue on the replicas holding it costs more
than loading it elsewhere, and shrinks back as it cools (the others evict it), and a
session stays with its KV until the queue there outweighs recomputing its prefix. The
baselines keep their systems' documented rules: `round-robin`; `least-loaded` (power of
two choices, Ray Serve's default); `multiplex` (Ray Serve model multiplexing: the
replicas that hold the model id, an LRU set per replica); `prefix` (SGLang's cache-aware
router: adapter-blind prefix match unless the load is imbalanced).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

from fastlibra.cache import Residency, Tier
from fastlibra.cache.tree import chain_hashes, chain_root
from fastlibra.config import CacheConfig, ConfigError, HardwareProfile


@dataclass(frozen=True)
class RouteCosts:
    """What the estimates cost in seconds: the replicas' hardware, block size, adapter
    size and batch limit (every replica alike)."""

    hardware: HardwareProfile
    block_size: int
    block_bytes: int
    adapter_bytes: int
    kv_read_s: float = 0.0
    """Seconds a decode step spends reading one context token's KV (KV bytes per token /
    HBM bandwidth): every running request's context is read in every step a prefill
    shares, which is what makes a replica with long conversations running slow."""

    def __post_init__(self) -> None:
        for f in ("block_size", "block_bytes", "adapter_bytes"):
            if getattr(self, f) < 1:
                raise ConfigError(f"RouteCosts.{f} must be >= 1, got {getattr(self, f)}")
        if not self.kv_read_s >= 0:
            raise ConfigError(f"RouteCosts.kv_read_s must be >= 0, got {self.kv_read_s}")

    @classmethod
    def of(cls, cfg: CacheConfig, adapter_bytes: int, kv_read_s: float = 0.0) -> RouteCosts:
        """The costs of replicas built from `cfg`."""
        return cls(cfg.hardware, cfg.block_size, cfg.block_bytes, adapter_bytes, kv_read_s)

    def adapter_miss(self, tier: Tier | None) -> float:
        """Seconds to bring the adapter to the device from `tier` (None: not there at all,
        read from its file like DISK)."""
        if tier is Tier.DEVICE:
            return 0.0
        if tier is Tier.HOST:
            return self.hardware.h2d_time(self.adapter_bytes)
        return self.hardware.disk_load_time(self.adapter_bytes)


class RouteRequest:
    """What a router sees of a request: its adapter and prompt; the prompt's chained block
    hashes are computed once, on first use, for whichever router asks."""

    def __init__(self, request_id: str, adapter: str | None, prompt, block_size: int) -> None:
        self.request_id = request_id
        self.adapter = adapter or None
        self.tokens = tuple(prompt)
        self.block_size = block_size
        self.usable_blocks = max(0, len(self.tokens) - 1) // block_size
        """Blocks a replica can serve from cache (its last token is always computed)."""

    @cached_property
    def hashes(self) -> list[int]:
        """Chained per adapter: the same tokens under another adapter never match."""
        return chain_hashes(chain_root(self.adapter or ""), self.tokens, self.block_size)

    @cached_property
    def blind_hashes(self) -> list[int]:
        """Chained over the tokens alone, as an adapter-blind prefix router sees them."""
        return chain_hashes(0, self.tokens, self.block_size)


def _prefix_in(hashes: list[int], start: int, limit: int, first: set[int],
               second: set[int] | None = None) -> int:
    """Largest m in [start, limit] with hashes[start:m] all in `first` or `second` (given
    that hashes[:start] are). Chained hashes make a cached prefix's blocks all present, so
    membership is monotone along the chain and a binary search finds its end."""
    lo, hi = start, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        h = hashes[mid - 1]
        if h in first or (second is not None and h in second):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class ReplicaView:
    """A router's picture of one replica."""

    inflight: int = 0
    """Requests routed there and not finished."""
    queued_prefill_s: float = 0.0
    """Estimated prefill seconds of its requests that have no first token yet."""
    context_tokens: int = 0
    """Prompt tokens of its requests in flight: the KV each step reads."""
    adapters: dict[str, Tier] = field(default_factory=dict)
    device_prefixes: set[int] = field(default_factory=set)
    host_prefixes: set[int] = field(default_factory=set)

    def cached_blocks(self, req: RouteRequest) -> tuple[int, int]:
        """(device, host) blocks of the request's prompt cached here for its adapter."""
        hashes = req.hashes
        dev = _prefix_in(hashes, 0, req.usable_blocks, self.device_prefixes)
        both = _prefix_in(hashes, dev, req.usable_blocks, self.host_prefixes,
                          self.device_prefixes)
        return dev, both - dev


class Router:
    """Chooses a replica per request and keeps the views; subclasses only `choose` (and
    may note what they learn in `_routed`)."""

    name = ""

    def __init__(self, num_replicas: int, costs: RouteCosts, seed: int = 0) -> None:
        if num_replicas < 1:
            raise ConfigError(f"a router needs >= 1 replica, got {num_replicas}")
        self.costs = costs
        self.views = [ReplicaView() for _ in range(num_replicas)]
        self.rng = random.Random(seed)
        self._open: dict[str, list] = {}
        """request id -> [replica, prefill seconds still queued there, the request]"""

    # -- the estimates every router can read ---------------------------------------------
    def prefill_s(self, req: RouteRequest, view: ReplicaView) -> float:
        """Prefill of the uncached part on that replica, plus the copy of its host hits."""
        dev, host = view.cached_blocks(req)
        c = self.costs
        cached = (dev + host) * c.block_size
        return c.hardware.prefill_time(len(req.tokens) - cached, cached) \
            + c.hardware.h2d_time(host * c.block_bytes)

    def estimates(self, req: RouteRequest) -> list[float]:
        """Expected TTFT of `req` on each replica (seconds): queue wait (prefill work
        queued ahead, and in the step it shares one token per running request and the
        read of their contexts' KV) + adapter miss + prefill. A replica that holds no
        block of the prompt skips the prefix search: one set lookup, so a decision over
        128 replicas stays well under a millisecond."""
        c = self.costs
        per_running, per_context = c.hardware.prefill_per_token, c.kv_read_s
        miss = {tier: c.adapter_miss(tier) for tier in (Tier.DEVICE, Tier.HOST, Tier.DISK)}
        absent = c.adapter_miss(None)
        adapter = req.adapter
        cold = c.hardware.prefill_time(len(req.tokens))
        first = req.hashes[0] if req.usable_blocks else None
        out = []
        for v in self.views:
            est = v.queued_prefill_s + v.inflight * per_running + v.context_tokens * per_context
            if adapter is not None:
                est += miss.get(v.adapters.get(adapter), absent)
            if first is not None and (first in v.device_prefixes or first in v.host_prefixes):
                est += self.prefill_s(req, v)
            else:
                est += cold
            out.append(est)
        return out

    # -- events ---------------------------------------------------------------------------
    def route(self, req: RouteRequest, candidates: list[int] | None = None) -> int:
        """Pick the replica for `req` among `candidates` (default: all) and note it there."""
        if req.request_id in self._open:
            raise ValueError(f"request {req.request_id!r} is already routed")
        i = self.choose(req, candidates if candidates is not None else self.all_replicas)
        self.note(i, req)
        return i

    @property
    def all_replicas(self) -> list[int]:
        return list(range(len(self.views)))

    def add_replica(self) -> int:
        """A new replica (Ray Serve started or restarted one): its index, with an empty
        view, since a fresh replica's cache is empty."""
        self.views.append(ReplicaView())
        return len(self.views) - 1

    def note(self, i: int, req: RouteRequest) -> None:
        """`req` went to replica i (chosen here, or by whoever placed it): count its load
        there, and expect its adapter and prompt's KV there from now on."""
        if req.request_id in self._open:
            raise ValueError(f"request {req.request_id!r} is already routed")
        v = self.views[i]
        queued = self.prefill_s(req, v)
        v.inflight += 1
        v.queued_prefill_s += queued
        v.context_tokens += len(req.tokens)
        self._open[req.request_id] = [i, queued, req]
        if req.adapter is not None:
            v.adapters[req.adapter] = Tier.DEVICE
        v.device_prefixes.update(req.hashes)
        self._routed(i, req)

    def first_token(self, request_id: str) -> None:
        entry = self._open.get(request_id)
        if entry is None:  # already finished (a first token and a finish may race)
            return
        self.views[entry[0]].queued_prefill_s -= entry[1]
        entry[1] = 0.0

    def finish(self, request_id: str) -> None:
        """The request ended (finished, failed or aborted); unknown ids are ignored."""
        self.first_token(request_id)
        entry = self._open.pop(request_id, None)
        if entry is None:
            return
        i, _, req = entry
        self.views[i].inflight -= 1
        self.views[i].context_tokens -= len(req.tokens)

    def publish(self, i: int, residency: Residency) -> None:
        """Replica i's own account of its cache replaces the router's guesses, except for
        the requests still running there: their KV joins the cache when they finish, and
        their next turns should find it."""
        v = self.views[i]
        v.adapters = residency.adapters
        v.device_prefixes = residency.device_prefixes
        v.host_prefixes = residency.host_prefixes
        for j, _, req in self._open.values():
            if j == i:
                v.device_prefixes.update(req.hashes)
                if req.adapter is not None:
                    v.adapters[req.adapter] = Tier.DEVICE

    # -- strategy -------------------------------------------------------------------------
    def choose(self, req: RouteRequest, candidates: list[int]) -> int:
        """The replica for `req`, one of `candidates` (a non-empty list of indices)."""
        raise NotImplementedError

    def _routed(self, i: int, req: RouteRequest) -> None:
        """What a strategy learns from sending `req` to replica i (nothing by default)."""

    def _two_choices(self, candidates: list[int]) -> int:
        """Power of two choices: the less loaded of two distinct random candidates."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return a if self.views[a].inflight <= self.views[b].inflight else b


class RoundRobin(Router):
    name = "round-robin"

    def __init__(self, num_replicas: int, costs: RouteCosts, seed: int = 0) -> None:
        super().__init__(num_replicas, costs, seed)
        self._next = 0

    def choose(self, req: RouteRequest, candidates: list[int]) -> int:
        later = [i for i in candidates if i >= self._next]
        i = min(later) if later else min(candidates)
        self._next = i + 1
        return i


class LeastLoaded(Router):
    """Ray Serve's default: power of two choices on requests in flight."""

    name = "least-loaded"

    def choose(self, req: RouteRequest, candidates: list[int]) -> int:
        return self._two_choices(candidates)


class Multiplex(Router):
    """Ray Serve model multiplexing: a request goes to a replica that holds its model id
    (two choices among them, skipping full ones); if none can take it, to those holding
    the fewest models. Each replica keeps an LRU set of `max_models` ids, exactly the
    ids routed to it, since it loads what it is sent."""

    name = "multiplex"

    def __init__(self, num_replicas: int, costs: RouteCosts, seed: int = 0,
                 max_models: int = 16, max_ongoing: int = 64) -> None:
        super().__init__(num_replicas, costs, seed)
        self.max_models = max_models
        self.max_ongoing = max_ongoing
        self.models: list[OrderedDict[str, None]] = [OrderedDict() for _ in self.views]

    def add_replica(self) -> int:
        self.models.append(OrderedDict())
        return super().add_replica()

    def choose(self, req: RouteRequest, candidates: list[int]) -> int:
        free = [i for i in candidates if self.views[i].inflight < self.max_ongoing]
        free = free or candidates
        if req.adapter is not None:
            holders = [i for i in free if req.adapter in self.models[i]]
            if holders:
                return self._two_choices(holders)
            fewest = min(len(self.models[i]) for i in free)
            free = [i for i in free if len(self.models[i]) == fewest]
        return self._two_choices(free)

    def _routed(self, i: int, req: RouteRequest) -> None:
        if req.adapter is None:
            return
        lru = self.models[i]
        lru[req.adapter] = None
        lru.move_to_end(req.adapter)
        if len(lru) > self.max_models:
            lru.popitem(last=False)


class PrefixAware(Router):
    """SGLang's cache-aware router, adapter-blind: while the load is balanced, the replica
    whose (router-side, approximate) tree matches most of the prompt if it matches more
    than `cache_threshold` of it, else the one with the smallest tree; when imbalanced
    (max - min > abs and max > rel x min requests), the least loaded. Defaults are
    sglang_router's."""

    name = "prefix"

    def __init__(self, num_replicas: int, costs: RouteCosts, seed: int = 0,
                 cache_threshold: float = 0.3, balance_abs: int = 64,
                 balance_rel: float = 1.5) -> None:
        super().__init__(num_replicas, costs, seed)
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.trees: list[set[int]] = [set() for _ in self.views]

    def add_replica(self) -> int:
        self.trees.append(set())
        return super().add_replica()

    def choose(self, req: RouteRequest, candidates: list[int]) -> int:
        loads = {i: self.views[i].inflight for i in candidates}
        lo, hi = min(loads.values()), max(loads.values())
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return min(candidates, key=lambda i: (loads[i], i))
        hashes = req.blind_hashes
        n = len(hashes)
        matched = {i: _prefix_in(hashes, 0, n, self.trees[i]) for i in candidates}
        best = max(candidates, key=lambda i: (matched[i], -loads[i], -i))
        if n and matched[best] / n > self.cache_threshold:
            return best
        return min(candidates, key=lambda i: (len(self.trees[i]), loads[i], i))

    def _routed(self, i: int, req: RouteRequest) -> None:
        self.trees[i].update(req.blind_hashes)


class FastLibra(Router):
    """The lowest estimated TTFT (`Router.estimates`); ties go to the less loaded, then
    the lower index."""

    name = "fastlibra"

    def choose(self, req: RouteRequest, candidates: list[int]) -> int:
        est, views = self.estimates(req), self.views
        return min(candidates, key=lambda i: (est[i], views[i].inflight, i))


ROUTERS: dict[str, type[Router]] = {
    r.name: r for r in (RoundRobin, LeastLoaded, Multiplex, PrefixAware, FastLibra)}


def make_router(name: str, num_replicas: int, costs: RouteCosts, seed: int = 0) -> Router:
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ConfigError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}") from None
    return cls(num_replicas, costs, seed)
