"""The paper's own cost model (FASTLIBRA/ELORA, HPCA version §VI; DESIGN.md §2.2), term by term.

    Eval_i        = LoRA_Eval_i x Retain_Eval_i                        higher = keep on device
    Retain_Eval_i = transfer_i x visit_i x (1 - sigmoid(t_i / RECENCY_SCALE_S))
    LoRA_Eval_i   = Low_lora / N_dev   for an adapter while N_dev < Low_lora, else 1
    Low_lora      = sum over adapters of 1 - (1 - p_i)^BS

* transfer_i: bytes / host-to-device bandwidth, for KV and adapters alike (the paper
  charges every node a PCIe copy, even KV that would be dropped and recomputed);
* visit_i: the node's visit-frequency probability, visits / all requests; the denominator
  is shared by every node, so the ranking uses the count (`Node.visits`, undecayed; a new
  KV leaf counts the request that made it, a registered adapter never used counts one);
* t_i: seconds since the node's last use, divided by RECENCY_SCALE_S;
* N_dev: adapters resident on device now; p_i: adapter i's share of the adapter visits
  of the last WINDOW_S seconds; BS: the mean number of running requests over the same
  window (sampled at each re-scoring). Low_lora is the expected number of distinct
  adapters in a batch of BS requests: while fewer are resident, every adapter is worth
  Low_lora / N_dev times its Retain_Eval, so KV makes way for adapters.

The paper gives no scale for t. A public fork of old vLLM multiplies times by 1e-13,
which pins the sigmoid at 1/2 and silently turns recency off. We scale by 10 s: a node
idle for 10 s keeps 27 % of its value, 30 s 5 %, a minute 0.25 %, which spans agent steps
(seconds apart) and chat turns (tens of seconds) without ranking either kind as dead.
The tests check that each of the four terms changes a decision.

Retain_Eval changes with time in a way no fixed key can follow (a product of a decaying
sigmoid and a size that differs per node), so, as the paper does, the candidates are
re-scored every RESCORE_S of the cache's clock: between re-scorings, the heaps of
`Swapper` order nodes by their Eval as of the last re-scoring (a node touched since then
is scored as of that time too). A heap is rebuilt when a decision first reads it after a
re-scoring, so one that no decision reads (prefetch while the device is busy, the host's
while it has room) costs nothing; a rebuild is O(its candidates). LoRA_Eval is one factor shared by every adapter, applied
when candidates of the two kinds are compared, so it follows N_dev after every adapter
that moves, as the paper re-scores after each adapter swap. The device is busy above the
high watermark (or when an allocation needs room), idle below IDLE_WATERMARK; eviction
takes device leaves in increasing Eval, to host, dropping the host's coldest leaves when
it is full; prefetch takes host nodes whose parent is on device (the roots of host
subtrees) in decreasing Eval.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from fastlibra.cache.pool import BlockPool, Tier
from fastlibra.cache.swapper import Swapper, SwapTarget
from fastlibra.cache.tree import AdapterNode, Node
from fastlibra.config import SwapperConfig

if TYPE_CHECKING:
    from fastlibra.cache.cost import CostModel
    from fastlibra.cache.policies import Policy

RECENCY_SCALE_S = 10.0
"""Seconds of idleness per unit of the sigmoid's argument (see the module docstring)."""
RESCORE_S = 0.1
"""The paper re-scores every 100 ms."""
WINDOW_S = 5.0
"""Recent batch size and adapter popularity are measured over the last 5 s."""
LOG2 = math.log(2)
IDLE_WATERMARK = 0.70
"""Below this device usage the paper swaps in (or below `SwapperConfig.low_watermark`,
if that is lower)."""


@dataclass(frozen=True)
class EvalTerms:
    """Which of Eval's four factors count; a factor that is off is 1 for every node."""

    lora: bool = True
    transfer: bool = True
    visit: bool = True
    recency: bool = True


class PaperTarget(SwapTarget, Protocol):
    """The cache as the paper's swapper sees it: also its adapters, the root whose
    per-tier child counts say how many adapters are resident, and the running requests."""

    root: Node
    adapters: dict[str, AdapterNode]
    running: dict


def low_lora(shares: list[float], batch_size: float) -> float:
    """Expected number of distinct adapters in a batch of `batch_size` requests, each using
    adapter i with probability shares[i]."""
    return sum(1.0 - (1.0 - p) ** batch_size for p in shares)


class PaperSwapper(Swapper):
    """`Swapper` ranking by the paper's Eval, re-scored every RESCORE_S."""

    def __init__(self, cache: PaperTarget, policy: Policy, cost: CostModel,
                 cfg: SwapperConfig) -> None:
        idle = min(IDLE_WATERMARK, cfg.low_watermark)  # a lower configured mark still binds
        super().__init__(cache, policy, cost, replace(cfg, low_watermark=idle))
        assert policy.eval_terms is not None and policy.dependency_aware  # `_next_victim`
        self.terms: EvalTerms = policy.eval_terms
        self.paper_cache = cache
        self.scored_at = -math.inf
        """Time of the last re-scoring: every key in the heaps is Eval as of then."""
        self.low_lora = 0.0
        self._stale: set[int] = set()
        """Heaps (by id) whose keys predate `scored_at`."""
        self._samples: deque[tuple[float, dict[int, int], int]] = deque([(-math.inf, {}, 0)])
        """(time, adapter id -> visits, running requests) at each re-scoring; the first
        entry at or before the window's start is the base the window's visits count from."""

    # -- Eval ---------------------------------------------------------------------------
    def log_retain(self, node: Node) -> float:
        """log Retain_Eval of `node` as of the last re-scoring: the one formula every
        decision reads (a term that is off adds 0, a factor of 1)."""
        t = self.terms
        out = 0.0
        if t.transfer:
            out += math.log(self.cost.transfer_time(node))
        if t.visit and node.visits > 1:
            out += math.log(node.visits)
        if t.recency:
            x = (self.scored_at - node.t_last) / RECENCY_SCALE_S
            if x > 0:  # log(1 - sigmoid(x)) = -softplus(x), without overflow
                out -= x + math.log1p(math.exp(-x))
            else:
                out -= LOG2
        return out

    def _key(self, node: Node, tier: Tier) -> tuple:
        """(0, log Retain_Eval as of the last re-scoring); the same in every tier."""
        return (0, self.log_retain(node))

    def lora_eval(self) -> float:
        """The factor every adapter's Eval gets now."""
        resident = self.paper_cache.root.children_in(Tier.DEVICE)
        if not self.terms.lora or resident >= self.low_lora:
            return 1.0
        return max(1.0, self.low_lora / max(1, resident))

    def _at(self, node: Node, key: tuple, now: float) -> tuple:
        if isinstance(node, AdapterNode):
            return (key[0], key[1] + math.log(self.lora_eval()))
        return key

    # -- re-scoring ---------------------------------------------------------------------
    def rescore(self, now: float) -> None:
        """Start a new scoring time: sample the window and update Low_lora; each heap is
        rebuilt with Eval as of `now` when a decision next reads it (`_fresh`)."""
        self.scored_at = now
        cache = self.paper_cache
        samples = self._samples
        samples.append((now, {a.id: a.visits for a in cache.adapters.values()},
                        len(cache.running)))
        while len(samples) > 1 and samples[1][0] <= now - WINDOW_S:
            samples.popleft()
        base = samples[0][1]
        recent = [a.visits - base.get(a.id, 0) for a in cache.adapters.values()]
        total = sum(recent)
        batch = [s[2] for s in samples if s[0] > now - WINDOW_S]
        self.low_lora = 0.0 if not total else low_lora(
            [v / total for v in recent if v], sum(batch) / len(batch))
        self._stale = {id(h) for h in [*self._evict.values(), *self._prefetch.values()]}

    def _fresh(self, heap: list, candidate: Callable[[Node], bool], sign: int) -> None:
        """Rebuild a stale `heap` from its live candidates (non-candidates are pushed again
        by `touch` when they become candidates), lowest Eval first (highest if `sign` is
        -1); entries keep their versions, so later touches still supersede them."""
        if id(heap) not in self._stale:
            return
        self._stale.discard(id(heap))
        log_retain = self.log_retain
        live = [e for e in heap if e[2] == e[3].heap_version and candidate(e[3])]
        for e in live:
            e[0] = (0, sign * log_retain(e[3]))
        heap[:] = live
        heapq.heapify(heap)
        self._compacted[id(heap)] = len(heap)

    def _push(self, heap: list, entry: tuple) -> None:
        """Entries are lists here, so that re-scoring rewrites their keys in place instead
        of allocating thousands of entries every 100 ms (the garbage collector's work)."""
        super()._push(heap, list(entry))

    def _next_victim(self, pool: BlockPool, now: float) -> tuple[tuple, list] | None:
        # `is_evictable`, inlined for a live entry (its version current), which is still in
        # this pool: only pins and resident children may have changed since its push.
        if pool.tier is Tier.DEVICE:
            def leaf(n: Node) -> bool:
                return not n.ref_count and not n.resident_children[0]
        else:
            def leaf(n: Node) -> bool:
                return not n.ref_count and not n.resident_children[0] \
                    and not n.resident_children[1]
        for kind in (False, True):
            self._fresh(self._evict[(id(pool), kind)], leaf, 1)
        return super()._next_victim(pool, now)

    def _next_prefetch(self, now: float) -> tuple[tuple, list] | None:
        idle = self.cfg.low_watermark
        if all(p.num_used >= int(idle * p.capacity) for p in self.cache.device_pools):
            return None  # nothing fits below the idle mark: `tick` would stop anyway
        for heap in self._prefetch.values():
            self._fresh(heap, self.prefetchable, -1)
        return super()._next_prefetch(now)

    def _rescore_due(self, now: float) -> None:
        if now >= self.scored_at + RESCORE_S:
            self.rescore(now)

    def make_room(self, pool: BlockPool, nblocks: int, now: float) -> bool:
        """Busy: re-score first if due (only here and in `tick`, so that one eviction's
        victim and the host leaves making way for it are scored at the same time)."""
        if pool.num_free < nblocks:
            self._rescore_due(now)
        return super().make_room(pool, nblocks, now)

    def tick(self, now: float) -> None:
        self._rescore_due(now)
        super().tick(now)
