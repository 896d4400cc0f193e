"""The performance-driven swapper: chooses what leaves a tier and what comes back.

Eviction candidates of a pool are its *leaves* (no resident children in that tier, or for
a policy without the dependency rule, any adapter), never pinned. Prefetch candidates are
host nodes whose parent is already on device (without the dependency rule, KV right below
an adapter wherever the adapter is). Both are kept in heaps ordered by the
policy's key (time-invariant, see `cost.py`), one heap per kind of node so that the least
valuable adapter alone can be found (vLLM's capped CPU adapter cache), with lazy deletion:
any change to a node bumps its version and pushes a fresh entry; stale entries are
skipped when popped. A choice takes the better of the two kinds' tops.

Every byte that moves is described by a `Move` and handed to a `Mover`: the simulator
charges copy time for it, the model runner copies real blocks, the demo counts bytes.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from fastlibra.cache.pool import BlockKind, BlockPool, Tier
from fastlibra.cache.tree import AdapterNode, KVNode, Node
from fastlibra.config import SwapperConfig

if TYPE_CHECKING:
    from fastlibra.cache.cost import CostModel
    from fastlibra.cache.policies import Policy


class MoveKind(Enum):
    SWAP_OUT = "swap_out"  # device -> host
    SWAP_IN = "swap_in"  # host -> device
    LOAD = "load"  # adapter file -> device
    LOAD_HOST = "load_host"  # adapter file -> host


@dataclass(slots=True)
class Move:
    """One node's bytes copied between tiers.

    The cache frees `src_blocks` in its books at once; a mover that copies real bytes must
    finish the copy before compute writes into those blocks again (the model runner orders
    its copy stream before the next step)."""

    kind: MoveKind
    node: Node
    src_blocks: list[int]
    dst_blocks: list[int]
    nbytes: int
    written_through: bool = False
    """A swap-out whose bytes were already copied when the KV was written (SGLang
    HiCache's write-through): its source blocks may be reused at once."""


class Mover(Protocol):
    """Carries out moves. `submit` returns the time at which the copy will be done;
    `estimate` says when a copy of `nbytes` submitted now would be, without queueing it."""

    def submit(self, move: Move, now: float) -> float: ...

    def estimate(self, kind: MoveKind, nbytes: int, now: float) -> float: ...


@dataclass
class CountingMover:
    """Moves nothing, counts bytes per direction: for the demo, tests and benchmarks."""

    bytes_by_kind: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in MoveKind})
    moves: int = 0

    def submit(self, move: Move, now: float) -> float:
        self.bytes_by_kind[move.kind.value] += move.nbytes
        self.moves += 1
        return now

    def estimate(self, kind: MoveKind, nbytes: int, now: float) -> float:
        return now

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())


class SwapTarget(Protocol):
    """What the swapper needs from the cache it serves (the `CacheManager`): its pools,
    its nodes, and the three tier changes that keep pools, tree and pins in step."""

    pools: list[BlockPool]
    device_pools: list[BlockPool]
    host_adapter_cap: int
    """Host blocks adapters may hold (vLLM's `max_cpu_loras`)."""

    def pool_for(self, node: Node, tier: Tier) -> BlockPool: ...

    def nodes(self) -> list[Node]: ...

    def host_accepts(self, node: Node) -> bool: ...

    def move(self, node: Node, dst: Tier, now: float) -> float: ...

    def drop(self, node: Node, now: float | None = None) -> None: ...

    def split(self, node: KVNode, keep_blocks: int) -> KVNode: ...


class Swapper:
    """Ranks nodes and frees room; the cache calls `touch` whenever a node changes."""

    def __init__(self, cache: SwapTarget, policy: Policy, cost: CostModel,
                 cfg: SwapperConfig) -> None:
        self.cache = cache
        self.policy = policy
        self.cost = cost
        self.cfg = cfg
        self._evict: dict[tuple[int, bool], list] = {
            (id(p), kind): [] for p in cache.pools for kind in (False, True)}
        """(pool id, is adapter) -> heap of (key, seq, version, node)."""
        self._prefetch: dict[bool, list] = {False: [], True: []}
        """is adapter -> heap of (negated device key, seq, version, node)."""
        self._seq = itertools.count()
        self._compacted: dict[int, int] = {}
        self._versions = itertools.count(1)
        if self.policy.ranks_by_decay:
            cost.on_rekey = self.rekey

    # -- ranking ------------------------------------------------------------------------
    def touch(self, node: Node) -> None:
        """`node`'s key or candidacy may have changed: push fresh heap entries."""
        if node.num_blocks == 0 or node.tier is Tier.DISK or node.heap_version < 0:
            return  # nothing to rank, or dropped (a queued request may still point at it)
        node.heap_version = v = next(self._versions)
        key = self._key(node, node.tier)
        kind = isinstance(node, AdapterNode)
        heap = self._evict[(id(self.cache.pool_for(node, node.tier)), kind)]
        if self.policy.swapper and self.prefetchable(node):
            dkey = self._key(node, Tier.DEVICE)
            neg = (-dkey[0], -dkey[1])
            self._push(self._prefetch[kind], (neg, next(self._seq), v, node))
        self._push(heap, (key, next(self._seq), v, node))

    def _key(self, node: Node, tier: Tier) -> tuple:
        """`node`'s heap key in `tier`: lower = evicted first, higher = prefetched first."""
        return self.policy.rank(self.cost, node, tier)

    def rekey(self) -> None:
        """The decay rate changed, so every key is stale: rebuild the heaps from the tree."""
        for heap in [*self._evict.values(), *self._prefetch.values()]:
            heap.clear()
        self._compacted.clear()
        for node in self.cache.nodes():
            self.touch(node)

    def _push(self, heap: list, entry: tuple) -> None:
        """Push, and compact the heap when stale entries have come to outnumber live ones."""
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self._compacted.get(id(heap), 0) + 1024:
            heap[:] = [e for e in heap if e[2] == e[3].heap_version]
            heapq.heapify(heap)
            self._compacted[id(heap)] = len(heap)

    def is_evictable(self, node: Node, pool: BlockPool) -> bool:
        if node.pinned or node.tier is not pool.tier or self.cache.pool_for(node, node.tier) is not pool:
            return False
        if isinstance(node, AdapterNode) and not self.policy.dependency_aware:
            return True
        # Leaf of this tier: nothing resident in this tier or a faster one hangs below.
        below = node.resident_children
        return below[0] == 0 and (pool.tier is Tier.DEVICE or below[1] == 0)

    def prefetchable(self, node: Node) -> bool:
        """On host with its parent on device. Without the dependency rule the swapper does
        not know which adapter a KV node needs, so KV right below an adapter qualifies
        wherever that adapter is: the invalid KV the paper's ablation swaps in."""
        parent = node.parent
        if node.tier is not Tier.HOST or parent is None:
            return False
        return parent.tier is Tier.DEVICE or (
            isinstance(parent, AdapterNode) and not self.policy.dependency_aware)

    def _at(self, node: Node, key: tuple, now: float) -> tuple:
        """`key` as compared with other nodes' at `now`. Every node decays at one rate, so
        keys compare as they are; the paper's Eval (`paper_eval.py`) weighs adapters by
        how many are resident, which changes as they move."""
        return key

    def _next_victim(self, pool: BlockPool, now: float) -> tuple[tuple, list] | None:
        """(key at `now`, heap) of the next victim of `pool`, dropping stale entries."""
        best = None
        for kind in (False, True):
            heap = self._evict[(id(pool), kind)]
            while heap:
                key, _, version, node = heap[0]
                if version == node.heap_version and self.is_evictable(node, pool):
                    key = self._at(node, key, now)
                    if best is None or key < best[0]:
                        best = (key, heap)
                    break
                heapq.heappop(heap)
        return best

    def _peek_victim(self, pool: BlockPool, now: float) -> tuple | None:
        best = self._next_victim(pool, now)
        return None if best is None else best[0]

    def _pop_victim(self, pool: BlockPool, now: float, below: tuple | None = None) -> Node | None:
        best = self._next_victim(pool, now)
        if best is None or (below is not None and best[0] >= below):
            return None
        return heapq.heappop(best[1])[3]

    def _next_prefetch(self, now: float) -> tuple[tuple, list] | None:
        """(device key at `now`, heap) of the most valuable prefetch candidate."""
        best = None
        for heap in self._prefetch.values():
            while heap:
                neg_key, _, version, node = heap[0]
                if version == node.heap_version and self.prefetchable(node):
                    key = self._at(node, (-neg_key[0], -neg_key[1]), now)
                    if best is None or key > best[0]:
                        best = (key, heap)
                    break
                heapq.heappop(heap)  # stale; re-pushed by `touch` when its parent arrives
        return best

    # -- freeing room -------------------------------------------------------------------
    def make_room(self, pool: BlockPool, nblocks: int, now: float) -> bool:
        """Evict from `pool` until `nblocks` are free. False if unpinned nodes ran out."""
        while pool.num_free < nblocks:
            victim = self._pop_victim(pool, now)
            if victim is None:
                return False
            short = nblocks - pool.num_free
            if self.policy.evict_blocks and isinstance(victim, KVNode) \
                    and victim.num_blocks > short:
                self.cache.split(victim, victim.num_blocks - short)  # victim keeps the tail
            self.evict(victim, now)
        return True

    def evict(self, node: Node, now: float) -> None:
        """Move `node` one tier down: device -> host if worth it and room is found, else drop."""
        m = self.cache
        if node.tier is Tier.DEVICE and m.host_accepts(node):
            host = m.pool_for(node, Tier.HOST)
            if isinstance(node, AdapterNode):
                self._cap_host_adapters(host, node.num_blocks, now)
            if host.num_free < node.num_blocks:
                # Only host nodes worth less than this one make way for it, unless host
                # nodes hang below it: dropping it would lose that whole subtree.
                limit = None if node.children_in(Tier.HOST) else \
                    self._at(node, self._key(node, Tier.HOST), now)
                self._clear_host_room(host, node.num_blocks - host.num_free, limit, now)
            if host.num_free >= node.num_blocks:
                m.move(node, Tier.HOST, now)
                return
        m.drop(node, now)

    def _cap_host_adapters(self, host: BlockPool, nblocks: int, now: float) -> None:
        """Make the host's adapters fit its adapter cap with `nblocks` more (vLLM's
        `max_cpu_loras`): the lowest-ranked host adapters go back to their files."""
        heap = self._evict[(id(host), True)]
        while host.used(BlockKind.ADAPTER) + nblocks > self.cache.host_adapter_cap and heap:
            _, _, version, victim = heapq.heappop(heap)
            if version == victim.heap_version and self.is_evictable(victim, host):
                self.cache.drop(victim, now)

    def _clear_host_room(self, host: BlockPool, nblocks: int, limit: tuple | None,
                         now: float) -> None:
        """Drop host leaves ranked below `limit` for `nblocks`, or none if they are too few:
        host nodes are never lost for a victim that cannot get in anyway."""
        chosen: list[Node] = []
        found = 0
        while found < nblocks:
            victim = self._pop_victim(host, now, below=limit)
            if victim is None:
                break
            chosen.append(victim)
            found += victim.num_blocks
        if found < nblocks:
            for victim in chosen:
                self.touch(victim)
            return
        for victim in chosen:
            self.cache.drop(victim, now)

    # -- between steps ------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Busy: swap out down to the high watermark. Idle: prefetch up to the low one."""
        if not self.policy.swapper:
            return
        cfg = self.cfg
        for pool in self.cache.device_pools:
            high = int(cfg.high_watermark * pool.capacity)
            if pool.num_used > high:
                self.make_room(pool, pool.capacity - high, now)
        budget = cfg.max_prefetch_blocks
        while budget > 0:
            best = self._next_prefetch(now)
            if best is None:
                break
            key, heap = best
            node = heap[0][3]
            pool = self.cache.pool_for(node, Tier.DEVICE)
            if pool.num_used + node.num_blocks > int(cfg.low_watermark * pool.capacity):
                break  # the most valuable candidate does not fit: leave the rest too
            floor = self._peek_victim(pool, now)
            if floor is not None and key <= floor:
                break  # it would be the next thing evicted: moving it is churn, not gain
            if node.num_blocks > budget and budget < cfg.max_prefetch_blocks:
                break  # next tick; a node larger than a whole budget comes alone, or it
                # would never come and would block every node ranked behind it
            heapq.heappop(heap)
            self.cache.move(node, Tier.DEVICE, now)
            budget -= node.num_blocks
