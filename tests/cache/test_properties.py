"""Property tests: random request streams against every policy, invariants after each step.

Each run draws a small cache (so the pools are under pressure), then a sequence of
operations: register / re-register / unregister adapters, allocate requests whose prompts
come from a three-block alphabet (so prefixes collide), append decode tokens, free with
generated tokens, queue and dequeue demand, tick with advancing time, clear. After every
step `check_invariants()` (I1 for dependency-aware policies, I2, I3) runs, plus checks made
here from the outside:

* invalid KV (device KV whose adapter is not on device) recounted from `nodes()` equals
  `invalid_kv_blocks`, and is zero for dependency-aware policies;
* a running request's block table never changes except by appending (I2: pinned nodes
  never move), and its adapter and prefix stay on device;
* `match` predicts the hits `allocate` then reports;
* an allocation is only deferred while other requests run (with nothing pinned, a
  request that fits an empty pool must be admitted);
* at the end, after every request is freed and the cache cleared, every pool is free (I3).
"""

import pytest
from conftest import adapter_bytes, blocks, make_cfg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fastlibra.cache import (
    POLICIES,
    BlockKind,
    CacheError,
    CacheManager,
    RequestTooLarge,
    Tier,
    UnknownAdapter,
)
from fastlibra.cache.tree import KVNode

NAMES = ("a", "b", "c")
adapters = st.sampled_from((None, *NAMES) * 3 + ("zzz",))  # now and then an unknown name
prompts = st.builds(
    lambda ids, tail: blocks(*ids) + tuple(tail),
    st.lists(st.integers(1, 3), max_size=4),
    st.lists(st.sampled_from([10, 11, 12, 13, 99]), max_size=4),
).filter(len)
decoded = st.lists(st.sampled_from([10, 11, 20, 21, 99]), min_size=1, max_size=6)
steps = st.floats(0.0, 20.0)
WATERMARKS = [(0.95, 0.8), (0.7, 0.5), (1.0, 1.0), (0.5, 0.3)]


def recount_invalid_kv(m: CacheManager) -> int:
    return sum(n.num_blocks for n in m.nodes()
               if isinstance(n, KVNode) and n.tier is Tier.DEVICE
               and n.adapter.tier is not Tier.DEVICE)


class Running:
    def __init__(self, alloc, table):
        self.alloc = alloc
        self.table = table
        self.generated: list[int] = []

    @property
    def computed(self) -> tuple[int, ...]:
        return self.alloc.tokens + tuple(self.generated)


class CacheMachine(RuleBasedStateMachine):
    policy = "fastlibra"

    def __init__(self):
        super().__init__()
        self.m: CacheManager | None = None
        self.now = 0.0
        self.running: dict[str, Running] = {}
        self.queued: list[str] = []  # request ids with queued demand
        self.ids = 0

    # -- setup -------------------------------------------------------------------------------
    @initialize(device=st.integers(5, 24), host=st.integers(0, 12),
                half_life=st.sampled_from([1.0, 60.0]), marks=st.sampled_from(WATERMARKS),
                prefetch=st.sampled_from([1, 256]),
                sizes=st.lists(st.integers(1, 2), min_size=len(NAMES), max_size=len(NAMES)))
    def setup(self, device, host, half_life, marks, prefetch, sizes):
        cfg = make_cfg(device, host, high=marks[0], low=marks[1], half_life=half_life,
                       max_prefetch_blocks=prefetch)
        self.m = CacheManager(cfg, self.policy)
        for name, nblocks in zip(NAMES, sizes, strict=True):
            self.register(name, nblocks)

    def _tick_clock(self, dt: float) -> float:
        self.now += dt
        return self.now

    def _registered(self, name):
        return name is None or name in self.m.adapters

    # -- adapters ----------------------------------------------------------------------------
    def register(self, name, nblocks):
        m = self.m
        old = m.adapters.get(name)
        if nblocks > m.device_adapter_pool.capacity:
            with pytest.raises(CacheError, match="give the device more memory"):
                m.register_adapter(name, adapter_bytes(nblocks))
            assert m.adapters.get(name) is old
            return
        new = m.register_adapter(name, adapter_bytes(nblocks))
        assert m.adapters[name] is new
        if m.cfg.adapters_in_host:  # read into host unless the host had no room for it
            assert new.tier is Tier.HOST or m.host_pool.num_free < nblocks \
                or m.host_pool.used(BlockKind.ADAPTER) + nblocks > m.host_adapter_cap
        else:
            assert new.tier is Tier.DISK
        if old is not None:
            assert old.retired and new.generation == old.generation + 1
            assert (old in m.nodes()) == old.pinned  # kept only while in use

    def unregister(self, name):
        m = self.m
        if name not in m.adapters:
            with pytest.raises(UnknownAdapter):
                m.unregister_adapter(name)
            return
        m.unregister_adapter(name)
        assert name not in m.adapters

    @rule(register=st.sampled_from([True, True, False]), name=st.sampled_from(NAMES),
          nblocks=st.integers(1, 3))
    def adapter_churn(self, register, name, nblocks):
        """Register a new adapter or a new generation of one, or unregister one."""
        if register:
            self.register(name, nblocks)
        else:
            self.unregister(name)

    # -- requests ----------------------------------------------------------------------------
    @rule(adapter=adapters, prompt=prompts, reserve=st.integers(0, 4), dt=steps)
    def allocate(self, adapter, prompt, reserve, dt):
        m, now = self.m, self._tick_clock(dt)
        rid = f"r{self.ids}"
        self.ids += 1
        usage = m.usage()
        if not self._registered(adapter):
            with pytest.raises(UnknownAdapter):
                m.allocate(rid, adapter, prompt, now, reserve)
            assert m.usage() == usage
            return
        need = m.cfg.blocks_for_tokens(len(prompt) + reserve)
        if m.device_kv_pool is m.device_adapter_pool:
            need += m.adapter(adapter).num_blocks
        if need > m.device_kv_pool.capacity:
            with pytest.raises(RequestTooLarge, match=f"needs {need} device blocks"):
                m.allocate(rid, adapter, prompt, now, reserve)
            assert m.usage() == usage
            return
        device_hit, host_hit, _ = m.match(adapter, prompt)
        deferred = m.stats.deferred
        alloc = m.allocate(rid, adapter, prompt, now, reserve)
        if alloc is None:
            assert self.running, "deferred with nothing running: a fitting request must fit"
            assert m.usage() == usage and m.stats.deferred == deferred + 1
            return
        assert (alloc.device_hit_tokens, alloc.host_hit_tokens) == (device_hit, host_hit)
        table = alloc.block_table()
        assert len(table) == m.cfg.blocks_for_tokens(len(prompt) + reserve)
        assert len(set(table)) == len(table)
        assert alloc.adapter.tier is Tier.DEVICE and alloc.ready_at >= now
        self.running[rid] = Running(alloc, table)

    @rule(adapter=adapters, prompt=prompts, dt=steps)
    def allocate_more(self, adapter, prompt, dt):
        """Requests are the main event: a second rule doubles their share of the steps."""
        self.allocate(adapter, prompt, 0, dt)

    def _pick(self, i) -> Running:
        return self.running[sorted(self.running)[i % len(self.running)]]

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 50), tokens=decoded, dt=steps)
    def append(self, i, tokens, dt):
        r = self._pick(i)
        now = self._tick_clock(dt)
        length = len(r.computed) + len(tokens)
        if self.m.append(r.alloc, length, now):
            r.generated += tokens
            assert len(r.alloc.block_table()) >= self.m.cfg.blocks_for_tokens(length)
            r.table = r.alloc.block_table()
            return
        self._free(r, len(r.computed), now)  # no room: preempt it (its KV is kept if useful)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 50), keep=st.integers(0, 40), dt=steps)
    def free(self, i, keep, dt):
        r = self._pick(i)
        # a prefix of prompt + generated, never shorter than the cached prefix it reused
        n = max(r.alloc.cached_tokens, min(keep, len(r.computed)))
        self._free(r, n, self._tick_clock(dt))

    def _free(self, r: Running, n: int, now: float):
        del self.running[r.alloc.request_id]
        self.m.free(r.alloc, r.computed[:n], now)
        assert r.alloc.request_id not in self.m.running

    # -- queue and clock ---------------------------------------------------------------------
    @rule(adapter=st.sampled_from((None, *NAMES)), prompt=prompts, i=st.integers(0, 50))
    def demand(self, adapter, prompt, i):
        """A request joins the queue (+1), or one that joined earlier leaves it (-1)."""
        if self.queued and i % 2:
            self.m.remove_demand(self.queued.pop(i % len(self.queued)))
            return
        rid = f"q{self.ids}"
        self.ids += 1
        if not self._registered(adapter):
            with pytest.raises(UnknownAdapter):
                self.m.add_demand(rid, adapter, prompt)
            return
        self.m.add_demand(rid, adapter, prompt)
        self.queued.append(rid)

    @rule(dt=steps, clear=st.integers(0, 15))
    def tick(self, dt, clear):
        """The swapper between steps; now and then the whole cache is cleared."""
        m = self.m
        usage, swap_ins = m.usage(), m.stats.swap_ins
        m.tick(self._tick_clock(dt))
        assert m.policy.swapper or m.usage() == usage  # baselines do nothing between steps
        marks = m.cfg.swapper
        for pool in m.device_pools:
            held = pool.used(BlockKind.KV_RUNNING) + sum(
                n.num_blocks for n in m.nodes()
                if n.pinned and n.tier is Tier.DEVICE and m.pool_for(n, Tier.DEVICE) is pool)
            # busy: down to the high watermark, unless only pinned and running blocks remain
            high = int(marks.high_watermark * pool.capacity)
            assert not m.policy.swapper or pool.num_used <= high or pool.num_used == held, (
                f"{pool.name}: {pool.usage()} after tick")
            # idle: prefetch never fills past the low watermark
            assert (m.stats.swap_ins == swap_ins
                    or pool.num_used <= int(marks.low_watermark * pool.capacity))
        if clear == 0:
            self.m.clear()
            for r in self.running.values():  # what running requests use is still there
                assert r.alloc.block_table() == r.table

    # -- checks after every step -------------------------------------------------------------
    @invariant()
    def consistent(self):
        m = self.m
        if m is None:
            return
        m.check_invariants()
        invalid = recount_invalid_kv(m)
        assert m.invalid_kv_blocks == invalid
        assert invalid == 0 or not m.policy.dependency_aware  # I1 leaves no invalid KV
        assert set(m.running) == set(self.running)
        for r in self.running.values():
            assert r.alloc.block_table() == r.table, "a pinned block moved (I2)"
            node = r.alloc.node
            while node is not None and node is not m.root:
                assert node.tier is Tier.DEVICE and node.pinned
                node = node.parent

    def teardown(self):
        m = self.m
        if m is None:
            return
        for r in list(self.running.values()):
            self._free(r, len(r.computed), self._tick_clock(1.0))
        m.clear()
        m.check_invariants()
        for p in m.pools:
            assert p.num_free == p.capacity, f"{p.name}: {p.usage()} after clear (I3 leak)"
        assert recount_invalid_kv(m) == m.invalid_kv_blocks == 0
        assert all(n.tier is Tier.DISK or n.num_blocks == 0 for n in m.nodes())


@pytest.mark.parametrize("policy", list(POLICIES))
def test_random_operations_keep_every_invariant(policy):
    machine = type(f"CacheMachine_{policy}", (CacheMachine,), {"policy": policy})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=80, stateful_step_count=100, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
