"""The unified cost model: every node's worth in expected TTFT seconds saved per block.

    value(n) = reuse_rate(n) x miss_penalty(n) / blocks(n)

reuse_rate is a visit count decayed with a half-life H (recency and frequency in one
number); nodes that requests already waiting in the queue will need rank above all others.
H follows the workload: it is the running mean of the gaps between consecutive visits of a
KV node (agent steps come seconds apart, chat turns tens of seconds), so a node unvisited for
one typical reuse gap has lost half its evidence. A KV node dropped in between counts too
(its position is remembered as a ghost), or H would only see the gaps short enough to
survive. A fixed H ranks by the wrong time scale on one workload or another: with 15 s, a
finished agent burst (five visits, 14 s ago) outranks a live burst that started a second
ago, which LRU keeps. (Adapters once had their own, length-biased H, and disk reads a
learned queueing factor; neither paid on held-out data, `bench mechanisms`, so both went.)

miss_penalty is what the next visit pays if `n` is not where it is now:

    leaving the device, KV      -> min(bytes / h2d bandwidth if the host keeps it,
                                       prefill of its tokens after its prefix)
    leaving the device, adapter -> bytes / h2d if the host keeps it, else a disk load
    leaving the host, KV        -> prefill time - h2d time   (what the host copy saved)
    leaving the host, adapter   -> disk load - h2d time

Every node decays at one rate r, so `log(value)` at time t equals
`log(freq at t_last) + t_last * r + log(penalty/blocks) - t * r`: the last term is shared
by all nodes, so ordering by the rest (`key`) is ordering by value at *any* time. The
swapper keeps nodes in heaps whose keys change only when the node itself is visited or
moved, instead of re-scoring every node every tick (`at` turns a key back into the log of
the value at a given time). When H moves by more than
`REKEY_RATIO` the keys are rebuilt once (`on_rekey`, O(nodes)); the means are steady after
the first few hundred revisits, so that happens a handful of times per run.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fastlibra.cache.pool import Tier
from fastlibra.cache.tree import AdapterNode, KVNode, Node
from fastlibra.config import CacheConfig, HardwareProfile

MEAN_WEIGHT = 1 / 256
"""Weight of one observation in each running mean the model learns (KV re-reference gaps,
speculative leaves' outcomes, disk waits) after the first 256, which are averaged plainly
so that the prior is forgotten at once."""
REKEY_RATIO = 1.5
"""A learned quantity that keys read (H, the disk wait) is re-set, and every key rebuilt,
once its running mean strays this far from the value in use."""
LEAF_CHANCE = 4.0
"""Half-lives a new leaf is given to be reused before its drop counts against the floor
(its own evidence has decayed to 1/16 by then)."""
MAX_GHOSTS = 65536
"""Dropped KV nodes remembered (by position only, no blocks) to time their re-reference."""
MECHANISMS = ("leaf-floor", "ghosts", "queued-demand")
"""What the model learns or adds beyond decayed visits x miss penalty; each can be switched
off (policy `fastlibra~ghosts` is fastlibra without ghosts) to measure what it pays:
* leaf-floor: a new leaf's count starts at the learned reuse fraction of such leaves
  (off: at one visit, like every other new node);
* ghosts: dropped KV is remembered to time its re-reference gap (off: only survivors);
* queued-demand: nodes a queued request needs rank above all others (off: history only)."""
MIN_HALF_LIFE_S = 1.0
"""Floor of H: a prefix shared by many short requests is revisited every few steps, and
an H that short would forget within a second how popular a node is."""


def _running_mean(mean: float, x: float, seen: int) -> float:
    """`mean` after its `seen`-th observation `x` (see MEAN_WEIGHT)."""
    return mean + max(MEAN_WEIGHT, 1 / seen) * (x - mean)


def _strayed(target: float, in_use: float) -> bool:
    return not 1 / REKEY_RATIO <= target / in_use <= REKEY_RATIO


@dataclass
class HalfLife:
    """The decay half-life of visit counts, learned from the gaps between visits."""

    value: float
    mean: float = 0.0
    seen: int = 0
    rate: float = field(init=False)
    """ln 2 / H: a count's decay per second."""

    def __post_init__(self) -> None:
        self.set(self.value)

    def set(self, value: float) -> None:
        self.value = value
        self.rate = math.log(2) / value

    def observe(self, gap: float) -> bool:
        """Count one gap; True if H moved, so that every key built with it is stale."""
        self.seen += 1
        self.mean = _running_mean(self.mean, gap, self.seen)
        target = max(MIN_HALF_LIFE_S, self.mean)
        if _strayed(target, self.value):
            self.set(target)
            return True
        return False


class CostModel:
    """Miss penalties from the hardware profile, and time-invariant ranking keys."""

    def __init__(self, cfg: CacheConfig, host_keeps_kv: bool,
                 without: frozenset[str] = frozenset()) -> None:
        unknown = set(without) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"unknown cost-model mechanism(s) {sorted(unknown)}; "
                             f"choose from {', '.join(MECHANISMS)}")
        self.without = without
        self.cfg = cfg
        self.hw = cfg.hardware
        self.host_keeps_kv = host_keeps_kv
        self.block_h2d_s = self.hw.h2d_time(cfg.block_bytes)
        self.half_life = HalfLife(cfg.decay_half_life_s)
        """Starts at `decay_half_life_s` and follows the reuse gaps from the first."""
        self.on_rekey: Callable[[], None] | None = None
        """Called after H changed: every key built with it is stale."""
        self.leaf_reuse = 1.0
        """Fraction of speculative leaves reused rather than dropped after their chance:
        the floor of a new leaf's count. Starts at one visit, as if every leaf were reused."""
        self.leaves_seen = 0
        self._ghosts: OrderedDict[tuple[int, tuple[int, ...]], float] = OrderedDict()
        """(parent id, first block) of dropped KV nodes -> their last use."""

    def set_hardware(self, hw: HardwareProfile) -> None:
        """Price misses with a re-measured profile from now on (every key is rebuilt)."""
        self.hw = hw
        self.block_h2d_s = hw.h2d_time(self.cfg.block_bytes)
        self._rekey()

    def learned(self) -> dict[str, float]:
        """What this run taught the model, for reports (`fastlibra simulate` prints it)."""
        return {"learned_half_life_s": self.half_life.value,
                "learned_leaf_reuse": self.leaf_reuse}

    def set_half_life(self, value: float) -> None:
        """Rank by a new H from now on (keys are rebuilt); the next revisits may move it."""
        self.half_life.set(value)
        self._rekey()

    def _rekey(self) -> None:
        if self.on_rekey is not None:
            self.on_rekey()

    # -- statistics ---------------------------------------------------------------------
    def visit(self, node: Node, now: float) -> None:
        """One more use of `node` at `now`: decay the old count, add one. H is learned from
        KV reuse gaps only: an adapter's gaps measure its popularity, not how long reused
        context stays worth keeping."""
        gap = max(0.0, now - node.t_last)
        timed = isinstance(node, KVNode)
        node.freq = node.freq * math.exp(-self.half_life.rate * gap) + 1.0
        node.t_last = now
        node.visits += 1
        if isinstance(node, KVNode) and node.speculative:
            self._observe_leaf(node, reused=True)
        if timed and gap > 0:
            self._observe_gap(gap)

    def forget(self, node: KVNode, now: float) -> None:
        """`node` leaves the last tier at `now` without having been reused. Only a leaf
        that had its chance counts as unused: one dropped younger than `LEAF_CHANCE`
        half-lives was pushed out by us, not passed over by the workload, and counting it
        would feed back (a lower floor drops new leaves sooner, which lowers it again)."""
        if node.speculative and now - node.t_last >= LEAF_CHANCE * self.half_life.value:
            self._observe_leaf(node, reused=False)

    def bury(self, node: KVNode) -> None:
        """`node` (and its subtree) was dropped: remember where it hung and when it was last
        used, so that a request that would have reused it still reports its gap. Without
        ghosts only nodes that survived are timed, and a short H evicts every node with a
        longer gap before its gap can be seen: H would learn its own bias."""
        assert node.parent is not None
        if "ghosts" in self.without:
            return
        self._ghosts[(node.parent.id, node.tokens[:self.cfg.block_size])] = node.t_last
        if len(self._ghosts) > MAX_GHOSTS:
            self._ghosts.popitem(last=False)

    def recall(self, parent: Node, block: tuple[int, ...], now: float) -> None:
        """A request's cached prefix ends at `parent` and continues with `block`: if a
        dropped node started there, its re-reference gap is observed now."""
        t_last = self._ghosts.pop((parent.id, block), None)
        if t_last is not None and now > t_last:
            self._observe_gap(now - t_last)

    def _observe_leaf(self, node: KVNode, reused: bool) -> None:
        node.speculative = False
        self.leaves_seen += 1
        self.leaf_reuse = _running_mean(self.leaf_reuse, float(reused), self.leaves_seen)

    def _observe_gap(self, gap: float) -> None:
        """A node was reused `gap` seconds after its last use (a KV node: or its creation).
        Two visits at one instant (requests admitted together) needed no keeping: not a gap."""
        if self.half_life.observe(gap):
            self._rekey()

    def inherit(self, node: Node, now: float) -> None:
        """A new KV leaf starts with its share of its parent's visits, not with one.

        Whoever reaches the leaf passes through its parent, so the parent's rate split
        over its children is the best guess of the leaf's. With a count of one, the newest
        turn of a conversation (the node the next turn needs) would rank below every
        older, more visited node: the classic LFU failure on multi-turn chat.

        Under a parent with many children (a shared instruction prefix, a system prompt)
        the share is small, and the leaf starts at a floor instead: the fraction of such
        leaves that were reused before being dropped, learned from this run. Chat turns
        and agent steps are mostly reused (floor near one visit); a translation request's
        own suffix almost never is, and a floor of one would let it push a cold adapter
        out of a small host.
        """
        parent = node.parent
        assert parent is not None
        share = self.reuse_rate(parent, now) / max(1, len(parent.children))
        node.speculative = share < 1.0  # learn from every such leaf, whatever the floor
        node.freq = max(1.0 if "leaf-floor" in self.without else self.leaf_reuse, share)
        node.t_last = now
        node.visits = 1

    def reuse_rate(self, node: Node, now: float) -> float:
        return node.freq * math.exp(-self.half_life.rate * max(0.0, now - node.t_last))

    # -- penalties (seconds) ------------------------------------------------------------
    def recompute_time(self, node: KVNode) -> float:
        """Marginal prefill time of the node's tokens: the fixed launch cost is paid once
        per request whatever it misses, so charging it per node would favour tiny nodes."""
        return self.hw.prefill_time(len(node.tokens), node.prefix_len) - self.hw.prefill_base

    def transfer_time(self, node: Node) -> float:
        if isinstance(node, AdapterNode):
            return self.hw.h2d_time(node.nbytes)
        return node.num_blocks * self.block_h2d_s

    def disk_time(self, node: AdapterNode) -> float:
        return self.hw.disk_load_time(node.nbytes)

    def worth_hosting(self, node: Node) -> bool:
        """Is a host copy cheaper to bring back than rebuilding the node?"""
        if isinstance(node, AdapterNode):
            return True
        return self.host_keeps_kv and self.transfer_time(node) < self.recompute_time(node)

    def miss_penalty(self, node: Node, tier: Tier) -> float:
        """Seconds the next visit loses if `node` leaves `tier`."""
        if isinstance(node, AdapterNode):
            if tier is Tier.DEVICE:
                return self.transfer_time(node)
            return max(0.0, self.disk_time(node) - self.transfer_time(node))
        assert isinstance(node, KVNode)
        recompute = self.recompute_time(node)
        if tier is Tier.DEVICE:
            if self.worth_hosting(node):
                return self.transfer_time(node)
            return recompute
        return max(0.0, recompute - self.transfer_time(node))

    def value(self, node: Node, tier: Tier, now: float) -> float:
        """Expected TTFT seconds saved per block by keeping `node` in `tier`, from history.

        Queued demand is not a term here: `key` ranks any node a waiting request needs
        above every node none does, whatever their values."""
        return self.reuse_rate(node, now) * self.miss_penalty(node, tier) / max(1, node.num_blocks)

    # -- ranking ------------------------------------------------------------------------
    def key(self, node: Node, tier: Tier) -> tuple[int, float]:
        """(queued demand, log of `value` plus a term that grows with time at the node's
        kind's rate): lower = evict first. Time-invariant within a kind; `at` compares
        across kinds."""
        penalty = self.miss_penalty(node, tier) / max(1, node.num_blocks)
        demand = 0 if "queued-demand" in self.without else node.demand
        if node.freq <= 0 or penalty <= 0:
            return (demand, -math.inf)
        return (demand,
                math.log(node.freq) + self.half_life.rate * node.t_last + math.log(penalty))

    def at(self, node: Node, key: tuple[int, float], now: float) -> tuple[int, float]:
        """`node`'s `key` as (queued demand, log of `value` at `now`): what a key means.
        Ranking needs no conversion (every node decays at one rate)."""
        return (key[0], key[1] - self.half_life.rate * now)


def lru_key(node: Node, tier: Tier) -> tuple[int, float]:
    """Least recently used first; the baselines' and the LRU ablation's ranking."""
    return (0, node.t_last)
