"""`fastlibra.router`'s routers inside Ray Serve, as its custom request routers.

    ingress handle call, kwargs["route"] = {id, adapter, tokens[, target]}
        │
        ▼
    ReplicaRouter.choose_replicas ──► pure Router.choose over the live replicas
        ranks: [[the choice], [the rest]]      (Ray takes the first rank with room)
    on_request_routed    ──► Router.note       (the request's load, adapter and KV there)
    on_request_completed ──► Router.finish
    replica.routing_stats ─► Router.publish    (each replica's `record_routing_stats`)

Ray Serve builds one router per deployment handle, in the process that holds the handle
(the ingress); `live_router` finds it there, so the ingress can report first tokens and
list the replicas for calls that must reach every one. A call whose `route` names a
`target` replica goes there (adapter loads, metrics); a call with no `route` goes to the
less loaded of two (Ray's default rule).

`least-loaded` is Ray Serve's default, power of two choices: two replicas at random, and
Ray's own queue-length probe picks the shorter. Its FIFO and locality mixins are left out
(they may hand a replica chosen for one request to another, which a `target` forbids; one
node has no locality to prefer).
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections import OrderedDict
from dataclasses import fields

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from fastlibra.cache import Residency, Tier
from fastlibra.config import HardwareProfile
from fastlibra.router import ROUTERS, RouteCosts, Router, RouteRequest, make_router

log = logging.getLogger("fastlibra.cluster")
PENDING_CAP = 10_000
ROUTE = "route"
"""The handle-call keyword that carries what a router needs of a request."""

_LIVE: dict[str, ReplicaRouter] = {}
"""deployment name -> the router this process's handle to it uses."""


def live_router(deployment: str) -> ReplicaRouter | None:
    return _LIVE.get(deployment)


def routing_stats(residency: Residency, costs: RouteCosts, stamp: int) -> dict:
    """What a replica publishes (plain types: Ray ships it through its controller)."""
    return {"stamp": stamp,
            "adapters": {name: tier.name for name, tier in residency.adapters.items()},
            "device": list(residency.device_prefixes), "host": list(residency.host_prefixes),
            "costs": {"hardware": {f.name: getattr(costs.hardware, f.name)
                                   for f in fields(costs.hardware)},
                      "block_size": costs.block_size, "block_bytes": costs.block_bytes,
                      "adapter_bytes": costs.adapter_bytes, "kv_read_s": costs.kv_read_s}}


def _residency(stats: dict) -> Residency:
    return Residency({name: Tier[t] for name, t in stats["adapters"].items()},
                     set(stats["device"]), set(stats["host"]))


def _costs(stats: dict) -> RouteCosts:
    c = dict(stats["costs"])
    return RouteCosts(HardwareProfile(**c.pop("hardware")), **c)


class ReplicaRouter(RequestRouter):
    """One of `fastlibra.router.ROUTERS` (by name, `request_router_kwargs["policy"]`)
    choosing among Ray Serve's live replicas."""

    def initialize_state(self, policy: str = "fastlibra", block_size: int = 16,
                         seed: int = 0) -> None:
        if policy not in ROUTERS:
            raise ValueError(f"unknown router {policy!r}; choose from {', '.join(ROUTERS)}")
        self.policy, self.block_size, self.seed = policy, block_size, seed
        self.router: Router | None = None
        """Made when the first replicas are known (a router needs at least one)."""
        self.index: dict[ReplicaID, int] = {}
        """Each replica's view in `router`; a restarted replica is a new id, a new view."""
        self.stamps: dict[ReplicaID, int] = {}
        """The last routing stats read from each replica."""
        self.pending: OrderedDict[str, RouteRequest] = OrderedDict()
        """Ray's internal request id -> the request, from choice to placement (the oldest
        dropped past PENDING_CAP: a request cancelled before placement never comes back)."""
        self.placed: dict[tuple[ReplicaID, str], str] = {}
        """(replica, Ray's internal request id) -> our request id, from placement to
        completion."""
        self.costed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop Ray runs this router on (other threads post their notices to it)."""
        self.rng = random.Random(seed)
        # Ray ships this class by value, with a copy of this module's globals; the
        # ingress reads the real module's registry, so register there.
        sys.modules[__name__]._LIVE[self._deployment_id.name] = self

    # -- what the ingress asks ------------------------------------------------------------
    def replica_ids(self) -> list[str]:
        """The live replicas' ids (what a `target` names)."""
        return [r.replica_id.unique_id for r in self._replicas_list]

    def first_token(self, request_id: str) -> None:
        """Called from the ingress's thread: the views change on the router's own loop."""
        if self.router is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.router.first_token, request_id)

    def finished(self, request_id: str) -> None:
        """The ingress has the whole response: the request no longer loads its replica.
        Ray's own completion callback comes later, sometimes after the next request is
        routed; `finish` ignores the second notice."""
        if self.router is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.router.finish, request_id)

    # -- Ray's calls ----------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        for r in replicas:
            if r.replica_id in self.index:
                continue
            if self.router is None:
                self.router = make_router(self.policy, 1, RouteCosts(
                    HardwareProfile(), self.block_size, 1, 1), self.seed)
                self.index[r.replica_id] = 0
            else:
                self.index[r.replica_id] = self.router.add_replica()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        self.loop = asyncio.get_running_loop()
        route = pending_request.kwargs.get(ROUTE) if pending_request is not None else None
        if not candidate_replicas:
            return []
        target = route.get("target") if route is not None else None
        if target is not None:
            there = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [there or candidate_replicas]
        if route is None or self.router is None or self.policy == "least-loaded":
            # Ray's own rule: two at random; its probe of their queues picks the shorter
            return [self.rng.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        self._read_stats(candidate_replicas)
        known = [r for r in candidate_replicas if r.replica_id in self.index]
        if not known:
            return [candidate_replicas]
        try:
            req = RouteRequest(route["id"], route.get("adapter"), route.get("tokens", ()),
                               self.block_size)
            i = self.router.choose(req, [self.index[r.replica_id] for r in known])
        except Exception:  # a bug here must not stall Ray's routing loop: route anyway
            log.exception("router %s failed; placing the request at random", self.policy)
            return [self.rng.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        self.pending[pending_request.metadata.internal_request_id] = req
        if len(self.pending) > PENDING_CAP:
            self.pending.popitem(last=False)
        if log.isEnabledFor(logging.DEBUG):
            est = self.router.estimates(req)
            log.debug("route %s adapter %s, %d tokens: %s -> %s", req.request_id, req.adapter,
                      len(req.tokens), ", ".join(
                          f"{r.replica_id.unique_id} {1e3 * est[self.index[r.replica_id]]:.2f} ms"
                          f" {self.router.views[self.index[r.replica_id]].cached_blocks(req)}"
                          for r in known), i)
        best = [r for r in known if self.index[r.replica_id] == i]
        return [best, [r for r in candidate_replicas if r not in best]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        internal = pending_request.metadata.internal_request_id
        req = self.pending.pop(internal, None)
        if req is None or self.router is None or replica_id not in self.index:
            return
        self.router.finish(req.request_id)  # a retried placement replaces the first
        self.router.note(self.index[replica_id], req)
        self.placed[replica_id, internal] = req.request_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self.placed.pop((replica_id, internal_request_id), None)
        if rid is not None and self.router is not None:
            self.router.finish(rid)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.stamps.pop(replica_id, None)

    def _read_stats(self, replicas: list[RunningReplica]) -> None:
        """Each replica's newest published residency replaces the router's guesses."""
        for r in replicas:
            stats = r.routing_stats
            stamp = stats.get("stamp") if stats else None
            if stamp is None or self.stamps.get(r.replica_id) == stamp \
                    or r.replica_id not in self.index:
                continue
            self.stamps[r.replica_id] = stamp
            if not self.costed:
                self.router.costs, self.costed = _costs(stats), True
            self.router.publish(self.index[r.replica_id], _residency(stats))
