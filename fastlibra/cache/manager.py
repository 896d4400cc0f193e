"""The cache manager: the one facade the scheduler talks to.

    scheduler ──allocate / append / free / tick──► CacheManager
                                                   ├── pools     (count blocks per tier)
                                                   ├── tree      (what is cached, per adapter)
                                                   ├── cost      (what a node is worth)
                                                   └── swapper   (what moves, via a Mover)

Contract:
* `allocate` either admits a request completely (adapter on device, cached prefix on
  device, blocks for the rest of the prompt) and pins what it uses, or changes nothing
  visible and returns None because the device cannot make room *now*. It raises
  `RequestTooLarge` when the request could not fit even in an empty pool.
* Pinned nodes are never evicted or moved (I2). `free` unpins, and for policies that reuse
  KV turns the request's full blocks into tree nodes without copying.
* Every tier change goes through `move` or `drop`, which keep the pools, the tree's
  per-tier child counts, the pin accounting and the swapper's heaps in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastlibra.cache import tree as T
from fastlibra.cache.cost import CostModel
from fastlibra.cache.policies import Policy, get_policy
from fastlibra.cache.pool import BlockKind, BlockPool, Tier
from fastlibra.cache.swapper import CountingMover, Move, MoveKind, Mover
from fastlibra.cache.tree import AdapterNode, KVNode, Node, chain_hashes, chain_root
from fastlibra.config import CacheConfig


class CacheError(Exception):
    """A request or adapter the cache cannot take; the message says what to change."""


class UnknownAdapter(CacheError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RequestTooLarge(CacheError):
    pass


class NotPinned(CacheError):
    pass


@dataclass(eq=False, slots=True)
class Allocation:
    """What one running request holds: a pinned cached prefix plus blocks of its own."""

    request_id: str
    adapter: AdapterNode
    tokens: tuple[int, ...]
    node: Node
    """Deepest pinned node: the last cached KV node used, or the adapter."""
    cached_tokens: int
    device_hit_tokens: int
    host_hit_tokens: int
    blocks: list[int]
    """Device blocks for tokens after the cached prefix (KV_RUNNING)."""
    ready_at: float
    """When every swap-in or adapter load this request needs has completed."""

    def block_table(self) -> list[int]:
        """Device block ids covering token positions 0, bs, 2*bs, ... in order."""
        chain: list[list[int]] = []
        n = self.node
        while isinstance(n, KVNode):
            chain.append(n.blocks)
            n = n.parent
        return [b for blocks in reversed(chain) for b in blocks] + self.blocks


@dataclass
class CacheStats:
    requests: int = 0
    deferred: int = 0
    prompt_tokens: int = 0
    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    adapter_device_hits: int = 0
    adapter_host_hits: int = 0
    adapter_disk_loads: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    drops: int = 0
    bytes_moved: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in MoveKind})

    @property
    def device_hit_rate(self) -> float:
        return self.device_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def host_hit_rate(self) -> float:
        return self.host_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class Residency:
    """What one engine tells routers about its cache (`CacheManager.residency`): where
    each adapter is, and which prompt prefixes it holds, as sets of chained block hashes
    (`tree.chain_hashes`, rooted at the adapter's name) per tier. A fresh snapshot: the
    receiver may amend it."""

    adapters: dict[str, Tier]
    device_prefixes: set[int]
    host_prefixes: set[int]


class CacheManager:
    def __init__(self, cfg: CacheConfig, policy: Policy | str, mover: Mover | None = None):
        self.cfg = cfg
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.bs = cfg.block_size
        share = self.policy.adapter_share
        if share is None:
            self.device_kv_pool = BlockPool("device", Tier.DEVICE, cfg.device_blocks)
            self.device_adapter_pool = self.device_kv_pool
        else:
            n_adapter = int(share * cfg.device_blocks)
            if n_adapter < 1 or n_adapter >= cfg.device_blocks:
                raise CacheError(
                    f"policy {self.policy.name}: an adapter share of {share} of "
                    f"{cfg.device_blocks} device blocks leaves no room for adapters or KV; "
                    "give the device more blocks")
            self.device_adapter_pool = BlockPool("device-adapters", Tier.DEVICE, n_adapter)
            self.device_kv_pool = BlockPool("device-kv", Tier.DEVICE, cfg.device_blocks - n_adapter)
        self.host_pool = BlockPool("host", Tier.HOST, cfg.host_blocks)
        if cfg.host_adapter_blocks is not None:  # `--max-cpu-loras`
            cap = cfg.host_adapter_blocks
        elif self.policy.host_adapters_as_slots:  # vLLM's default: as many as its slots
            cap = self.device_adapter_pool.capacity
        else:
            cap = cfg.host_blocks
        self.host_adapter_cap = min(cfg.host_blocks, cap)
        """Host blocks adapters may hold (vLLM's `max_cpu_loras`; else the whole host)."""
        self.blocked_on_adapter = False
        """The last `allocate` that returned None found no room for the request's adapter."""
        self.device_pools = list(dict.fromkeys([self.device_adapter_pool, self.device_kv_pool]))
        self.pools = self.device_pools + [self.host_pool]
        self._pinned = {id(p): 0 for p in self.pools}

        self.root = Node(parent=None, tier=Tier.DEVICE)
        self.base = AdapterNode(parent=self.root, tier=Tier.DEVICE, name="")
        self.adapters: dict[str, AdapterNode] = {}
        self._retired: list[AdapterNode] = []
        self._generations: dict[str, int] = {}
        self.num_nodes = 1
        self.running: dict[str, Allocation] = {}
        self._queued: dict[str, Node] = {}
        """Queued request -> the deepest node its queued demand counts on."""

        self.cost = CostModel(cfg, host_keeps_kv=self.policy.host_kv and cfg.host_blocks > 0,
                              without=self.policy.cost_without)
        self.swapper = self.policy.swapper_class(self, self.policy, self.cost, cfg.swapper)
        self.mover: Mover = mover if mover is not None else CountingMover()
        self.stats = CacheStats()

    # -- adapters -----------------------------------------------------------------------
    def register_adapter(self, name: str, nbytes: int) -> AdapterNode:
        """Make `name` servable. Re-registering a name is a new identity: the old one's KV
        can never be matched again and is freed as soon as no request uses it."""
        if not name:
            raise CacheError("adapter name must be a non-empty string")
        if nbytes <= 0:
            raise CacheError(f"adapter {name!r}: size must be positive, got {nbytes} bytes")
        nblocks = self.cfg.blocks_for_bytes(nbytes)
        if nblocks > self.device_adapter_pool.capacity:
            raise CacheError(
                f"adapter {name!r} needs {nblocks} blocks ({nbytes} bytes) but the "
                f"{self.device_adapter_pool.name} pool holds {self.device_adapter_pool.capacity}; "
                "give the device more memory or use a smaller rank")
        old = self.adapters.get(name)
        generation = self._generations.get(name, -1) + 1
        self._generations[name] = generation
        node = AdapterNode(parent=self.root, num_blocks=nblocks, name=name, nbytes=nbytes,
                           generation=generation)
        self.root.resident_children[Tier.DISK.value] += 1
        self.num_nodes += 1
        if old is not None:
            self._retire(old)
        self.adapters[name] = node
        if self.cfg.adapters_in_host and self.host_pool.num_free >= nblocks \
                and self.host_pool.used(BlockKind.ADAPTER) + nblocks <= self.host_adapter_cap:
            # Read at registration, before serving: a starting state, not a timed copy.
            node.blocks = self.host_pool.allocate(nblocks, BlockKind.ADAPTER)
            T.set_tier(node, Tier.HOST)
            self.swapper.touch(node)
        return node

    def unregister_adapter(self, name: str) -> None:
        """Stop serving `name`. Running requests finish; its cache goes when they do."""
        self._retire(self.adapter(name))
        del self.adapters[name]

    def adapter(self, name: str | None) -> AdapterNode:
        if not name:
            return self.base
        try:
            return self.adapters[name]
        except KeyError:  # the names of the others are not a stranger's business
            raise UnknownAdapter(f"unknown adapter {name!r}") from None

    def _retire(self, adapter: AdapterNode) -> None:
        adapter.retired = True
        self._retired.append(adapter)
        self._reap(adapter)

    def _reap(self, adapter: AdapterNode) -> None:
        """Free whatever of a retired adapter no running request uses."""
        for child in list(adapter.children.values()):
            if not child.pinned:
                self._drop_kv(child)
        if not adapter.pinned:
            assert not adapter.children
            self._release(adapter)
            self.root.resident_children[adapter.tier.value] -= 1
            self.num_nodes -= 1
            self._retired.remove(adapter)

    # -- lookups ------------------------------------------------------------------------
    def pool_for(self, node: Node, tier: Tier) -> BlockPool:
        if tier is Tier.HOST:
            return self.host_pool
        if isinstance(node, AdapterNode):
            return self.device_adapter_pool
        return self.device_kv_pool

    def host_accepts(self, node: Node) -> bool:
        if self.host_pool.capacity < node.num_blocks or (
                isinstance(node, AdapterNode) and node.num_blocks > self.host_adapter_cap):
            return False
        return isinstance(node, AdapterNode) or (self.policy.host_kv and
                                                 self.cost.worth_hosting(node))

    def match(self, adapter: str | None, tokens) -> tuple[int, int, Tier]:
        """(device-hit tokens, host-hit tokens, adapter tier) for a prompt; changes nothing."""
        node = self.adapter(adapter)
        tokens = tuple(tokens)
        if not self.policy.reuse_kv or len(tokens) <= self.bs:
            return 0, 0, node.tier
        m = T.walk(node, tokens, self.bs, (len(tokens) - 1) // self.bs)
        on = {Tier.DEVICE: 0, Tier.HOST: 0}
        for n in m.nodes:
            on[n.tier] += len(n.tokens)
        if m.partial is not None:
            on[m.partial.tier] += m.partial_blocks * self.bs
        return on[Tier.DEVICE], on[Tier.HOST], node.tier

    def _evictable(self, pool: BlockPool) -> int:
        return pool.num_used - pool.used(BlockKind.KV_RUNNING) - self._pinned[id(pool)]

    # -- requests -----------------------------------------------------------------------
    def check_fits(self, adapter: str | None, num_tokens: int) -> None:
        """Raise `RequestTooLarge` if `num_tokens` of KV plus the adapter exceed an empty pool."""
        node = self.adapter(adapter)
        need = self.cfg.blocks_for_tokens(num_tokens)
        if self.device_kv_pool is self.device_adapter_pool:
            need += node.num_blocks
        if need > self.device_kv_pool.capacity:
            raise RequestTooLarge(
                f"request needs {need} device blocks ({num_tokens} tokens of KV"
                f"{' + adapter' if node.num_blocks else ''}) but the pool holds "
                f"{self.device_kv_pool.capacity}; shorten the prompt or max tokens, or give "
                "the device more memory")

    def allocate(self, request_id: str, adapter: str | None, tokens, now: float,
                 reserve_tokens: int = 0) -> Allocation | None:
        """Admit a request: see the module docstring. `reserve_tokens` are extra KV slots
        (for example the first decode steps) allocated along with the prompt."""
        node = self.adapter(adapter)
        tokens = tuple(tokens)
        if not tokens:
            raise CacheError("a request needs at least one prompt token")
        if request_id in self.running:
            raise CacheError(f"request {request_id!r} is already running")
        self.check_fits(adapter, len(tokens) + reserve_tokens)

        chain: list[KVNode] = []
        if self.policy.reuse_kv and len(tokens) > self.bs:
            m = T.walk(node, tokens, self.bs, (len(tokens) - 1) // self.bs)
            chain = m.nodes
            if m.partial is not None:
                chain.append(self.split(m.partial, m.partial_blocks))
            else:  # the walk stopped at a node boundary: was a dropped node next?
                last: Node = chain[-1] if chain else node
                pos = last.end
                if pos // self.bs < (len(tokens) - 1) // self.bs:
                    self.cost.recall(last, tokens[pos:pos + self.bs], now)
        from_host = [n for n in chain if n.tier is Tier.HOST]
        if from_host and not self._swap_in_pays(from_host, now):
            chain = chain[:chain.index(from_host[0])]
            from_host = []
        cached = chain[-1].end if chain else 0
        host_tokens = sum(len(n.tokens) for n in from_host)
        own = self.cfg.blocks_for_tokens(len(tokens) + reserve_tokens) - cached // self.bs
        deepest: Node = chain[-1] if chain else node
        self.pin(deepest)

        need = dict.fromkeys(self.device_pools, 0)
        if node.tier is not Tier.DEVICE:
            need[self.device_adapter_pool] += node.num_blocks
        need[self.device_kv_pool] += sum(n.num_blocks for n in from_host) + own
        for pool, k in need.items():
            if k > pool.num_free + self._evictable(pool):
                self.unpin(deepest)
                self.stats.deferred += 1
                self.blocked_on_adapter = pool is self.device_adapter_pool \
                    and pool is not self.device_kv_pool
                return None

        ready = max([now, node.ready_at] + [n.ready_at for n in chain])
        st = self.stats
        if node.tier is Tier.DEVICE:
            st.adapter_device_hits += node.num_blocks > 0
        else:
            if node.tier is Tier.HOST:
                st.adapter_host_hits += 1
            else:
                st.adapter_disk_loads += 1
            self.swapper.make_room(self.device_adapter_pool, node.num_blocks, now)
            ready = max(ready, self.move(node, Tier.DEVICE, now))
        for n in from_host:
            self.swapper.make_room(self.device_kv_pool, n.num_blocks, now)
            ready = max(ready, self.move(n, Tier.DEVICE, now))
        self.swapper.make_room(self.device_kv_pool, own, now)
        blocks = self.device_kv_pool.allocate(own, BlockKind.KV_RUNNING)

        for n in [node, *chain]:
            self.cost.visit(n, now)
            self.swapper.touch(n)
        st.requests += 1
        st.prompt_tokens += len(tokens)
        st.device_hit_tokens += cached - host_tokens
        st.host_hit_tokens += host_tokens
        alloc = Allocation(request_id, node, tokens, deepest, cached, cached - host_tokens,
                           host_tokens, blocks, ready)
        self.running[request_id] = alloc
        return alloc

    def _swap_in_pays(self, nodes: list[KVNode], now: float) -> bool:
        """Is copying these host nodes in (behind whatever the copy queue already holds)
        faster than recomputing their tokens? Under heavy swap traffic it is not."""
        nbytes = sum(n.num_blocks for n in nodes) * self.cfg.block_bytes
        wait = self.mover.estimate(MoveKind.SWAP_IN, nbytes, now) - now
        tokens = sum(len(n.tokens) for n in nodes)
        return wait <= self.cost.hw.prefill_time(tokens, nodes[0].prefix_len)

    def append(self, alloc: Allocation, num_tokens: int, now: float) -> bool:
        """Grow a running request to hold `num_tokens` tokens of KV. False = preempt someone."""
        need = self.cfg.blocks_for_tokens(num_tokens) - alloc.cached_tokens // self.bs \
            - len(alloc.blocks)
        if need <= 0:
            return True
        pool = self.device_kv_pool
        if need > pool.num_free + self._evictable(pool):
            return False
        self.swapper.make_room(pool, need, now)
        alloc.blocks += pool.allocate(need, BlockKind.KV_RUNNING)
        return True

    def free(self, alloc: Allocation, computed_tokens=None, now: float = 0.0) -> None:
        """A request finished or was preempted. `computed_tokens` are the tokens whose KV
        is in its blocks (prompt + generated, minus the last sampled token); their full
        blocks join the tree when the policy reuses KV."""
        if self.running.get(alloc.request_id) is not alloc:
            raise NotPinned(f"request {alloc.request_id!r} is not running (freed twice?)")
        del self.running[alloc.request_id]
        adapter = alloc.adapter
        if self.policy.reuse_kv and not adapter.retired:
            computed = tuple(computed_tokens) if computed_tokens is not None else alloc.tokens
            self._insert(alloc, computed, now)
        else:
            self.device_kv_pool.free(alloc.blocks)
        alloc.blocks = []
        self.unpin(alloc.node)
        if adapter.retired:
            self._reap(adapter)

    def _insert(self, alloc: Allocation, tokens: tuple[int, ...], now: float) -> None:
        """Hand the request's full blocks to the tree, sharing what is already there."""
        bs = self.bs
        pos = alloc.cached_tokens
        assert tokens[:pos] == alloc.tokens[:pos], "computed tokens must extend the prompt"
        own = alloc.blocks
        end = min(len(tokens) // bs * bs, pos + len(own) * bs)
        parent: Node = alloc.node
        used = 0  # own blocks consumed (shared with an existing node or given to a new one)
        pool = self.device_kv_pool
        while pos < end:
            child = parent.children.get(tokens[pos:pos + bs])
            if child is None:
                blocks = own[used:used + (end - pos) // bs]
                pool.retag(blocks, BlockKind.KV_CACHED)
                new = T.attach(parent, alloc.adapter, tokens[pos:end], pos, blocks,
                               Tier.DEVICE, bs)
                self.num_nodes += 1
                alloc.adapter.device_kv_blocks += len(blocks)
                self.cost.inherit(new, now)
                self.swapper.touch(new)
                self.swapper.touch(parent)
                used += len(blocks)
                break
            if child.tier is not Tier.DEVICE:
                break  # a device child under a host node would break I1: keep the host copy
            k = 1
            while (k < child.num_blocks and pos + (k + 1) * bs <= end
                   and tokens[pos + k * bs:pos + (k + 1) * bs] == child.tokens[k * bs:(k + 1) * bs]):
                k += 1
            if k < child.num_blocks:
                child = self.split(child, k)
            pool.free(own[used:used + k])  # the tree already holds these tokens
            used += k
            pos += k * bs
            parent = child
        pool.free(own[used:])

    # -- pinning (I2) -------------------------------------------------------------------
    def pin(self, node: Node) -> None:
        """Protect `node` and its ancestors from eviction and moves."""
        n: Node | None = node
        while n is not None and n is not self.root:
            n.ref_count += 1
            if n.ref_count == 1 and n.tier is not Tier.DISK:
                self._pinned[id(self.pool_for(n, n.tier))] += n.num_blocks
            n = n.parent

    def unpin(self, node: Node) -> None:
        if node.ref_count <= 0:
            raise NotPinned(f"{node!r} is not pinned; every unpin needs an earlier pin")
        n: Node | None = node
        while n is not None and n is not self.root:
            n.ref_count -= 1
            if n.ref_count == 0:
                if n.tier is not Tier.DISK:
                    self._pinned[id(self.pool_for(n, n.tier))] -= n.num_blocks
                self.swapper.touch(n)
            n = n.parent

    # -- moving nodes -------------------------------------------------------------------
    def move(self, node: Node, dst: Tier, now: float) -> float:
        """Copy `node` to `dst` (room must be free there); returns when the copy is done."""
        src = node.tier
        assert src is not dst and dst is not Tier.DISK and not (node.pinned and src is Tier.DEVICE)
        kind = BlockKind.ADAPTER if isinstance(node, AdapterNode) else BlockKind.KV_CACHED
        dst_pool = self.pool_for(node, dst)
        new_blocks = dst_pool.allocate(node.num_blocks, kind)
        old_blocks = node.blocks
        if src is not Tier.DISK:
            self.pool_for(node, src).free(old_blocks)
        if node.pinned:
            if src is not Tier.DISK:
                self._pinned[id(self.pool_for(node, src))] -= node.num_blocks
            self._pinned[id(dst_pool)] += node.num_blocks
        if src is Tier.DISK:
            mk = MoveKind.LOAD if dst is Tier.DEVICE else MoveKind.LOAD_HOST
        else:
            mk = MoveKind.SWAP_IN if dst is Tier.DEVICE else MoveKind.SWAP_OUT
        nbytes = node.nbytes if isinstance(node, AdapterNode) else node.num_blocks * self.cfg.block_bytes
        if isinstance(node, KVNode):
            delta = node.num_blocks if dst is Tier.DEVICE else -node.num_blocks
            node.adapter.device_kv_blocks += delta
        node.blocks = new_blocks
        T.set_tier(node, dst)
        self.stats.swap_ins += mk is MoveKind.SWAP_IN
        self.stats.swap_outs += mk is MoveKind.SWAP_OUT
        self.stats.bytes_moved[mk.value] += nbytes
        through = mk is MoveKind.SWAP_OUT and self.policy.write_through
        node.ready_at = self.mover.submit(
            Move(mk, node, old_blocks, new_blocks, nbytes, written_through=through), now)
        self._touch_around(node)
        return node.ready_at

    def drop(self, node: Node, now: float | None = None) -> None:
        """Remove `node` from every pool. KV loses its subtree; an adapter goes back to its
        file (with the dependency rule its KV goes too; without it, that KV stays: invalid).
        `now` is when the swapper chose to drop it; without a time the drop teaches the
        cost model nothing about reuse."""
        assert not node.pinned
        self.stats.drops += 1
        if isinstance(node, KVNode):
            self._drop_kv(node, now)
            return
        assert isinstance(node, AdapterNode)
        if self.policy.dependency_aware:
            for child in list(node.children.values()):
                self._drop_kv(child, now)
        self._release(node)

    def _release(self, adapter: AdapterNode) -> None:
        if adapter.tier is not Tier.DISK:
            self.pool_for(adapter, adapter.tier).free(adapter.blocks)
            adapter.blocks = []
            T.set_tier(adapter, Tier.DISK)
            self._touch_around(adapter)

    def _drop_kv(self, node: KVNode, now: float | None = None) -> None:
        """Drop `node` and its subtree; at a time `now`, the cost model learns which of its
        new leaves were never reused (a cleared cache or a retired adapter teaches nothing
        about the workload)."""
        if now is not None:
            self.cost.bury(node)
        for n in reversed([node, *T.subtree(node)]):  # children before parents
            assert not n.pinned
            self.pool_for(n, n.tier).free(n.blocks)
            if n.tier is Tier.DEVICE:
                n.adapter.device_kv_blocks -= n.num_blocks
            n.blocks = []
            if now is not None:
                self.cost.forget(n, now)
            T.detach(n, self.bs)
            self.num_nodes -= 1
            n.heap_version = -1
        self.swapper.touch(node.parent)

    def split(self, node: KVNode, keep_blocks: int) -> KVNode:
        """Cut a KV node at a block boundary; `node` keeps the tail, the new upper is returned."""
        upper = T.split(node, keep_blocks, self.bs)
        self.num_nodes += 1
        self.swapper.touch(upper)
        self.swapper.touch(node)
        return upper

    def _touch_around(self, node: Node) -> None:
        """After a tier change: the node, its parent (leaf status) and, on arrival on
        device, its host children (now prefetchable) need fresh heap entries."""
        self.swapper.touch(node)
        if node.parent is not None:
            self.swapper.touch(node.parent)
        if node.tier is Tier.DEVICE:
            for child in node.children.values():
                if child.tier is Tier.HOST:
                    self.swapper.touch(child)

    # -- swapper ------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Between steps: swap out when busy, prefetch when idle."""
        self.swapper.tick(now)

    def add_demand(self, request_id: str, adapter: str | None, tokens) -> None:
        """A request joined the queue: the nodes it will need gain priority, so that neither
        eviction nor prefetch works against it, until `remove_demand`."""
        if request_id in self._queued:
            raise CacheError(f"request {request_id!r} is already queued")
        node: Node = self.adapter(adapter)
        tokens = tuple(tokens)
        if self.policy.reuse_kv and len(tokens) > self.bs:
            node = ([node] + T.walk(node, tokens, self.bs, (len(tokens) - 1) // self.bs).nodes)[-1]
        self._queued[request_id] = node
        self._add_demand_along(node, +1)

    def remove_demand(self, request_id: str) -> None:
        """The request left the queue (admitted, rejected or aborted). Exactly the nodes it
        counted on lose its demand: its deepest node and that node's ancestors, which
        include any node split off above it since. Nodes that appeared later under the
        same prefix were never counted, so they keep other requests' demand."""
        self._add_demand_along(self._queued.pop(request_id), -1)

    def _add_demand_along(self, node: Node, delta: int) -> None:
        n: Node | None = node
        while n is not None and n is not self.root:
            n.demand += delta
            self.swapper.touch(n)
            n = n.parent

    # -- reporting ----------------------------------------------------------------------
    @property
    def invalid_kv_blocks(self) -> int:
        """Device KV blocks whose adapter is not on device: never hit until it returns."""
        return sum(a.device_kv_blocks for a in self._all_adapters() if a.tier is not Tier.DEVICE)

    def _all_adapters(self) -> list[AdapterNode]:
        return [self.base, *self.adapters.values(), *self._retired]

    def usage(self) -> dict[str, dict[str, int]]:
        """Blocks by kind per pool, plus invalid KV on device: the composition plot's data."""
        out = {p.name: p.usage() for p in self.pools}
        out[self.device_kv_pool.name]["invalid_kv"] = self.invalid_kv_blocks
        return out

    def residency(self) -> Residency:
        """Adapter tiers and the cached prefixes' block hashes, for a router. Each node's
        hashes are computed once and kept (its tokens never change; a split slices them),
        so a snapshot costs one pass over the nodes and a set insert per block."""
        device: set[int] = set()
        host: set[int] = set()
        if self.policy.reuse_kv:
            for a in [self.base, *self.adapters.values()]:
                start = chain_root(a.name)
                stack = [(child, start) for child in a.children.values()]
                while stack:
                    n, start = stack.pop()
                    if len(n.hashes) != n.num_blocks:
                        n.hashes = tuple(chain_hashes(start, n.tokens, self.bs))
                    (device if n.tier is Tier.DEVICE else host).update(n.hashes)
                    stack += [(c, n.hashes[-1]) for c in n.children.values()]
        return Residency({name: a.tier for name, a in self.adapters.items()}, device, host)

    def nodes(self) -> list[Node]:
        """Every adapter and KV node (not the root)."""
        out: list[Node] = []
        for a in self._all_adapters():
            out.append(a)
            out += T.subtree(a)
        return out

    def clear(self) -> None:
        """Drop every unpinned cached node from every tier."""
        for a in self._all_adapters():
            for child in list(a.children.values()):
                if not child.pinned:
                    self._drop_kv(child)
            if not a.pinned and a.num_blocks:
                self._release(a)

    def check_invariants(self) -> None:
        """I1-I3 and the bookkeeping behind them; raises AssertionError on any breach."""
        for p in self.pools:
            p.check()
        owned = {id(p): set() for p in self.pools}
        resident = {id(p): 0 for p in self.pools}
        pinned = {id(p): 0 for p in self.pools}
        refs: dict[int, int] = {}
        for alloc in self.running.values():
            n: Node | None = alloc.node
            while n is not None and n is not self.root:
                refs[id(n)] = refs.get(id(n), 0) + 1
                n = n.parent
        demand: dict[int, int] = {}  # recounted from the queue
        for deepest in self._queued.values():
            n = deepest
            while n is not None and n is not self.root:
                demand[id(n)] = demand.get(id(n), 0) + 1
                n = n.parent
        running_blocks = {id(p): 0 for p in self.pools}
        for alloc in self.running.values():
            running_blocks[id(self.device_kv_pool)] += len(alloc.blocks)
            for b in alloc.blocks:
                assert b not in owned[id(self.device_kv_pool)], f"block {b} owned twice"
                owned[id(self.device_kv_pool)].add(b)
                assert self.device_kv_pool.owner(b) is BlockKind.KV_RUNNING
        order = {Tier.DEVICE: 0, Tier.HOST: 1, Tier.DISK: 2}
        for a in self._all_adapters():
            assert a.device_kv_blocks == sum(k.num_blocks for k in T.subtree(a)
                                             if k.tier is Tier.DEVICE), f"{a}: device KV count"
        for n in self.nodes():
            assert n.ref_count == refs.get(id(n), 0), f"{n}: ref_count {n.ref_count} (I2)"
            assert n.demand == demand.get(id(n), 0), f"{n}: queued demand {n.demand}"
            assert n.ref_count == 0 or all(
                c.ref_count <= n.ref_count for c in n.children.values())
            counts = [0, 0, 0]
            for c in n.children.values():
                counts[c.tier.value] += 1
                assert c.parent is n
            assert counts == n.resident_children, f"{n}: resident children {counts}"
            if n.tier is Tier.DISK:
                assert isinstance(n, AdapterNode) and not n.blocks
                continue
            assert len(n.blocks) == n.num_blocks, f"{n}: {len(n.blocks)} blocks"
            pool = self.pool_for(n, n.tier)
            kind = BlockKind.ADAPTER if isinstance(n, AdapterNode) else BlockKind.KV_CACHED
            for b in n.blocks:
                assert b not in owned[id(pool)], f"block {b} of {pool.name} owned twice"
                owned[id(pool)].add(b)
                assert pool.owner(b) is kind, f"{n}: block {b} tagged {pool.owner(b)}"
            resident[id(pool)] += n.num_blocks
            if n.pinned:
                pinned[id(pool)] += n.num_blocks
            parent = n.parent
            if isinstance(n, KVNode):
                assert n.tier is not Tier.HOST or self.policy.host_kv, f"{n}: KV on host"
                dependent = isinstance(parent, KVNode) or self.policy.dependency_aware
                if dependent:  # I1
                    assert order[parent.tier] <= order[n.tier], f"{n} under {parent} (I1)"
        for p in self.pools:
            held = p.used(BlockKind.ADAPTER) + p.used(BlockKind.KV_CACHED)
            assert held == resident[id(p)], f"{p.name}: {held} cached blocks, nodes hold {resident[id(p)]} (I3)"
            assert p.used(BlockKind.KV_RUNNING) == running_blocks[id(p)], f"{p.name}: running (I3)"
            assert pinned[id(p)] == self._pinned[id(p)], f"{p.name}: pinned blocks"
