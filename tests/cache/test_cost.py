"""The cost model: each term (frequency, recency, miss penalty, queued demand) changes
which node leaves the device, and the time-invariant key ranks nodes as `value` does."""

import math
from dataclasses import replace

import pytest
from conftest import BLOCK_BYTES, adapter_bytes, blocks, make_cfg, make_manager, run, tree
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlibra.cache import Tier
from fastlibra.cache.cost import LEAF_CHANCE, MIN_HALF_LIFE_S, REKEY_RATIO, CostModel, lru_key
from fastlibra.cache.tree import AdapterNode, KVNode
from fastlibra.config import HardwareProfile

X, Y = blocks(1, 2), blocks(3, 4)


def _two_leaves(policy="fastlibra", x_visits=(0.0,), y_visits=(1.0,), **kw):
    """Adapter a (2 blocks) with two 2-block KV leaves X=[1][2] and Y=[3][4] on a device of 8:

        a(0 1) ─┬─ X (2 3)   visited at x_visits
                └─ Y (4 5)   visited at y_visits          free: 6 7
    """
    m = make_manager(policy, device_blocks=8, adapters={"a": 2}, **kw)
    visits = sorted([(t, "x", X) for t in x_visits] + [(t, "y", Y) for t in y_visits])
    seen = set()
    for i, (t, name, prompt) in enumerate(visits):
        run(m, f"{name}{i}", "a", prompt if name not in seen else prompt + (99,), now=t)
        seen.add(name)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] DEVICE [4, 5]"]
    return m


def _pressure(m, now):
    """A base-model request of 3 blocks: one 2-block leaf of `a` must leave the device."""
    alloc = m.allocate("p", None, blocks(7, 8) + (1,), now=now)
    m.check_invariants()
    assert alloc is not None
    return alloc


# -- each term changes a decision ------------------------------------------------------------

def test_frequency_the_more_visited_leaf_survives_where_lru_keeps_the_newer():
    # X used three times at t=0, Y once at t=1; at t=2 one of them must go to host.
    m = _two_leaves("fastlibra", x_visits=(0.0, 0.0, 0.0), y_visits=(1.0,))
    _pressure(m, now=2.0)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] HOST [0, 1]"]  # Y went to host

    m = _two_leaves("fastlibra-lru", x_visits=(0.0, 0.0, 0.0), y_visits=(1.0,))
    _pressure(m, now=2.0)
    assert tree(m, "a") == ["[1][2] HOST [0, 1]", "[3][4] DEVICE [4, 5]"]  # X went to host


def test_recency_decay_makes_an_old_frequent_leaf_lose_to_a_new_one():
    # X used twice at t=0, Y once at t=100. With a 10 s half-life X's two visits are worth
    # 2 / 2**10 now and X leaves; with an (almost) endless half-life X's 2 beat Y's 1.
    m = _two_leaves(x_visits=(0.0, 0.0), y_visits=(100.0,), half_life=10.0)
    _pressure(m, now=101.0)
    assert tree(m, "a") == ["[1][2] HOST [0, 1]", "[3][4] DEVICE [4, 5]"]

    m = _two_leaves(x_visits=(0.0, 0.0), y_visits=(100.0,), half_life=1e9)
    _pressure(m, now=101.0)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] HOST [0, 1]"]


def test_kv_cheaper_to_recompute_than_to_copy_back_is_dropped_not_kept_on_host(recorder):
    # PCIe at 100 B/s: bringing back 2 blocks (128 B) takes 1.28 s, recomputing 8 tokens
    # takes 0.8 ms. The evicted leaf is dropped; nothing is copied to host.
    slow = HardwareProfile(h2d_bandwidth=100.0, d2h_bandwidth=100.0)
    m = _two_leaves(x_visits=(0.0, 0.0), y_visits=(1.0,), hardware=slow, mover=recorder)
    recorder.take()
    _pressure(m, now=2.0)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]"]
    assert m.host_pool.num_free == 8
    assert recorder.take() == [] and m.stats.drops == 1

    # default PCIe (25 GB/s): the same leaf is worth keeping on host
    m = _two_leaves(x_visits=(0.0, 0.0), y_visits=(1.0,), mover=recorder)
    recorder.take()
    _pressure(m, now=2.0)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] HOST [0, 1]"]
    assert recorder.take() == [("swap_out", "KV(a[0:8], HOST, ref=0)", [4, 5], [0, 1],
                                2 * BLOCK_BYTES)]


def _host_of_b_and_kv(b_used=0.0, kv_made=0.0, **kw):
    """Host (3 blocks), full: adapter b (0 1), last used at `b_used`, read from its file,
    and KV [1] (2) of adapter a, made at `kv_made`."""
    m = make_manager(device_blocks=8, host_blocks=3, adapters={"a": 1, "b": 2}, **kw)
    run(m, "rb", "b", (7,), computed=(7,), now=b_used)  # loads b, caches no KV
    run(m, "ra", "a", blocks(1), now=kv_made)
    kv = m.adapters["a"].children[blocks(1)]
    m.move(m.adapters["b"], Tier.HOST, now=kv_made)
    m.move(kv, Tier.HOST, now=kv_made)
    m.check_invariants()
    assert m.host_pool.num_free == 0
    return m


HOST_AFTER = {"kv": ([], Tier.HOST), "adapter": (["[1] HOST [2]"], Tier.DISK)}
"""(KV of a, tier of b) once one block of `_host_of_b_and_kv`'s host was freed by dropping
the KV (host = b (0 1), free 2) or the adapter (host = [1] (2), free 0 1; b is back to its
file)."""


def _host_state(m):
    m.check_invariants()
    return tree(m, "a"), m.adapters["b"].tier


@pytest.mark.parametrize("hardware, dropped", [
    # disk load of the adapter (5 ms parse) costs more than recomputing 4 tokens (0.4 ms)
    (HardwareProfile(), "kv"),
    # a free, instant disk but an expensive prefill: the adapter is the cheaper loss
    (HardwareProfile(adapter_parse_s=0.0, disk_bandwidth=25e9, prefill_per_token=1.0), "adapter"),
])
def test_host_keeps_whichever_of_adapter_and_kv_costs_more_to_rebuild(hardware, dropped):
    m = _host_of_b_and_kv(hardware=hardware)
    assert m.swapper.make_room(m.host_pool, 1, now=1.0)
    assert _host_state(m) == HOST_AFTER[dropped]


def test_queued_demand_protects_a_cold_leaf_until_the_request_leaves_the_queue():
    # X used three times, Y once: without demand Y would leave (see the frequency test).
    m = _two_leaves(x_visits=(0.0, 0.0, 0.0), y_visits=(1.0,))
    m.add_demand("q", "a", Y + (99,))  # a queued request will reuse Y
    assert (m.adapters["a"].demand, m.adapters["a"].children[Y[:4]].demand) == (1, 1)
    _pressure(m, now=2.0)
    assert tree(m, "a") == ["[1][2] HOST [0, 1]", "[3][4] DEVICE [4, 5]"]  # X went instead

    m = _two_leaves(x_visits=(0.0, 0.0, 0.0), y_visits=(1.0,))
    m.add_demand("q", "a", Y + (99,))
    m.remove_demand("q")  # it left the queue: no protection any more
    assert m.adapters["a"].children[Y[:4]].demand == 0
    _pressure(m, now=2.0)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] HOST [0, 1]"]


# -- the numbers behind the terms ------------------------------------------------------------

def _kv(adapter, ntokens, prefix_len=0, freq=1.0, t_last=0.0, demand=0):
    return KVNode(parent=adapter, num_blocks=ntokens // 4, tier=Tier.DEVICE, adapter=adapter,
                  tokens=tuple(range(ntokens)), prefix_len=prefix_len, freq=freq,
                  t_last=t_last, demand=demand)


def test_visits_decay_by_half_per_half_life():
    cost = CostModel(make_cfg(half_life=10.0), host_keeps_kv=True)
    node = AdapterNode(parent=None, name="a")
    cost.visit(node, now=0.0)
    cost.visit(node, now=0.0)
    assert cost.reuse_rate(node, 10.0) == pytest.approx(1.0)
    assert cost.reuse_rate(node, 20.0) == pytest.approx(0.5)
    cost.visit(node, now=20.0)
    assert (node.freq, node.t_last) == (pytest.approx(1.5), 20.0)


def test_a_new_leaf_inherits_its_share_of_the_parents_visits():
    cost = CostModel(make_cfg(), host_keeps_kv=True)
    a = AdapterNode(parent=None, name="a", freq=6.0, t_last=5.0)
    leaf = _kv(a, 4)
    a.children = {(0,): leaf, (1,): _kv(a, 4)}
    cost.inherit(leaf, now=5.0)
    assert (leaf.freq, leaf.t_last) == (3.0, 5.0)
    a.freq = 1.0
    cost.inherit(leaf, now=5.0)
    assert leaf.freq == 1.0  # until the run shows otherwise, a floor of one visit


def test_the_floor_of_a_new_leaf_is_the_learned_fraction_of_such_leaves_reused():
    cost = CostModel(make_cfg(), host_keeps_kv=True)
    a = AdapterNode(parent=None, name="a", freq=1.0, t_last=0.0)
    leaves = [_kv(a, 4) for _ in range(4)]
    a.children = {(i,): leaf for i, leaf in enumerate(leaves)}
    for leaf in leaves:
        cost.inherit(leaf, now=0.0)  # share 1/4 < 1: each rests on the floor
        assert leaf.speculative and leaf.freq == 1.0
    cost.visit(leaves[0], now=1.0)  # one is reused ...
    cost.visit(leaves[0], now=2.0)  # ... (its outcome counts once)
    young = _kv(a, 4)
    a.children[(8,)] = young
    cost.inherit(young, now=0.0)
    cost.forget(young, now=LEAF_CHANCE * cost.half_life.value - 1)  # pushed out young: no verdict
    for leaf in leaves[1:]:
        cost.forget(leaf, now=LEAF_CHANCE * cost.half_life.value)  # three had their chance, unused
    assert cost.leaf_reuse == pytest.approx(0.25) and cost.leaves_seen == 4
    new = _kv(a, 4)
    a.children[(9,)] = new
    cost.inherit(new, now=0.0)
    assert new.freq == pytest.approx(0.25)  # max(floor, share 1/6)
    a.freq = 12.0
    cost.inherit(new, now=0.0)
    assert new.freq == pytest.approx(2.0) and not new.speculative  # a share of 2 is evidence


def test_suffixes_never_reused_lower_the_floor_and_chat_turns_keep_it():
    # Translation: one shared instruction prefix, each request its own suffix; the
    # suffixes are pushed out and dropped without a second visit.
    m = make_manager("fastlibra", device_blocks=16, host_blocks=8, adapters={"a": 2})
    for i in range(40):
        run(m, f"t{i}", "a", blocks(1, 2, 100 + i) + (7,), now=float(i))
    assert m.cost.leaves_seen >= 10 and m.cost.leaf_reuse < 0.1
    seen = m.cost.leaves_seen
    assert any(getattr(n, "speculative", False) for n in m.nodes())  # some still undecided
    m.clear()  # emptying the cache is not evidence that the leaves were useless
    assert m.cost.leaves_seen == seen
    # Chat: four conversations under one adapter; each turn extends the last one's KV.
    m = make_manager("fastlibra", device_blocks=16, host_blocks=8, adapters={"a": 2})
    convs = {c: blocks(200 + 10 * c) for c in range(4)}
    for turn in range(6):
        for c in convs:
            run(m, f"c{c}-{turn}", "a", convs[c] + (7,), now=4.0 * turn + c)
            convs[c] += blocks(300 + 10 * c + turn)
    assert m.cost.leaves_seen >= 3 and m.cost.leaf_reuse == 1.0


def test_a_split_leaf_reports_one_outcome():
    m = make_manager("fastlibra", device_blocks=16, adapters={"a": 2})
    run(m, "r0", "a", blocks(1, 2) + (7,), now=0.0)  # share 1/1: no floor, nothing to learn
    run(m, "r1", "a", blocks(5, 6) + (7,), now=5.0)  # share (decayed 2) / 2 < 1: on the floor
    run(m, "r2", "a", blocks(5, 8) + (7,), now=10.0)  # reuses [5] of it: a split, one outcome
    assert m.cost.leaves_seen == 1 and m.cost.leaf_reuse == 1.0
    m.drop(m.adapter("a"), now=100.0)  # [6] split off, no second outcome; [8] never reused
    assert m.cost.leaves_seen == 2 and m.cost.leaf_reuse == pytest.approx(0.5)


def test_miss_penalties_in_seconds():
    hw = HardwareProfile(h2d_bandwidth=64.0, disk_bandwidth=32.0, adapter_parse_s=1.0,
                         prefill_base=0.5, prefill_per_token=0.25, prefill_per_token_pair=0.0)
    a = AdapterNode(parent=None, name="a", num_blocks=2, nbytes=adapter_bytes(2))
    kv = _kv(a, 8, prefix_len=4)  # 2 blocks = 128 bytes
    cost = CostModel(make_cfg(hardware=hw), host_keeps_kv=True)
    # copy back 128 B at 64 B/s = 2 s; recompute 8 tokens = 2 s (the 0.5 s launch cost is
    # paid once per request, not per node): copying is not cheaper, so no host copy
    assert (cost.transfer_time(kv), cost.recompute_time(kv)) == (2.0, 2.0)
    assert not cost.worth_hosting(kv)
    assert cost.miss_penalty(kv, Tier.DEVICE) == 2.0  # a recompute
    assert cost.miss_penalty(kv, Tier.HOST) == 0.0  # a host copy saves nothing
    # adapter: 2 s to copy back from host; 1 s parse + 4 s read from disk
    assert cost.miss_penalty(a, Tier.DEVICE) == 2.0
    assert cost.miss_penalty(a, Tier.HOST) == 5.0 - 2.0
    assert cost.value(a, Tier.HOST, now=0.0) == 0.0  # never visited

    # twice the PCIe bandwidth: a host copy (1 s) beats recomputing (2 s)
    fast = CostModel(make_cfg(hardware=replace(hw, h2d_bandwidth=128.0)), host_keeps_kv=True)
    assert fast.worth_hosting(kv)
    assert fast.miss_penalty(kv, Tier.DEVICE) == 1.0
    assert fast.miss_penalty(kv, Tier.HOST) == 2.0 - 1.0
    # ... unless the policy keeps no KV on host: then leaving the device means a recompute
    no_host = CostModel(make_cfg(hardware=replace(hw, h2d_bandwidth=128.0)), host_keeps_kv=False)
    assert not no_host.worth_hosting(kv)
    assert no_host.miss_penalty(kv, Tier.DEVICE) == 2.0


def test_recompute_penalty_grows_with_the_prefix_a_node_attends_to():
    hw = HardwareProfile(prefill_base=0.0, prefill_per_token=0.0, prefill_per_token_pair=1.0)
    cost = CostModel(make_cfg(hardware=hw), host_keeps_kv=False)
    a = AdapterNode(parent=None, name="a")
    # 4 tokens after p cached ones: 4 * (p + 2) token pairs
    assert cost.miss_penalty(_kv(a, 4, prefix_len=0), Tier.DEVICE) == 8.0
    assert cost.miss_penalty(_kv(a, 4, prefix_len=100), Tier.DEVICE) == 408.0


def test_lru_key_is_last_use_only():
    a = AdapterNode(parent=None, name="a", freq=100.0, t_last=3.0, demand=5)
    assert lru_key(a, Tier.DEVICE) == (0, 3.0)


def test_demand_outranks_any_history_in_the_key():
    cost = CostModel(make_cfg(), host_keeps_kv=True)
    a = AdapterNode(parent=None, name="a")
    hot = _kv(a, 4, freq=1e6, t_last=1e3)
    queued = _kv(a, 4, freq=1.0, t_last=0.0, demand=1)
    assert cost.key(queued, Tier.DEVICE) > cost.key(hot, Tier.DEVICE)


# -- the time-invariant key ------------------------------------------------------------------

_node = st.fixed_dictionaries({
    "adapter": st.booleans(),
    "blocks": st.integers(1, 6),
    "prefix_blocks": st.integers(0, 20),
    "freq": st.floats(0.01, 1e4),
    "t_last": st.floats(0.0, 1000.0),
})


def _build(spec, root: AdapterNode):
    if spec["adapter"]:
        nbytes = spec["blocks"] * BLOCK_BYTES - 7
        return AdapterNode(parent=None, name="x", num_blocks=spec["blocks"], nbytes=nbytes,
                           freq=spec["freq"], t_last=spec["t_last"])
    n = spec["blocks"] * 4
    return KVNode(parent=root, num_blocks=spec["blocks"], adapter=root, tokens=tuple(range(n)),
                  prefix_len=spec["prefix_blocks"] * 4, freq=spec["freq"], t_last=spec["t_last"])


@settings(max_examples=200, deadline=None)
@given(specs=st.lists(_node, min_size=2, max_size=6),
       tier=st.sampled_from([Tier.DEVICE, Tier.HOST]),
       host_keeps_kv=st.booleans(),
       later=st.lists(st.floats(0.0, 5000.0), min_size=3, max_size=3),
       slow_pcie=st.booleans())
def test_key_orders_nodes_as_value_does_at_any_later_time(specs, tier, host_keeps_kv, later,
                                                          slow_pcie):
    # The keys themselves keep the order of values at any time, and `at` gives the log of
    # the value at the time of the comparison.
    hw = HardwareProfile(h2d_bandwidth=1e3) if slow_pcie else HardwareProfile()
    cost = CostModel(make_cfg(hardware=hw), host_keeps_kv=host_keeps_kv)
    root = AdapterNode(parent=None, name="r")
    nodes = [_build(s, root) for s in specs]
    keys = [cost.key(n, tier) for n in nodes]
    start = max(n.t_last for n in nodes)
    for dt in later:
        now = start + dt
        values = [cost.value(n, tier, now) for n in nodes]
        at = [cost.at(n, k, now) for n, k in zip(nodes, keys, strict=True)]
        for i in range(len(nodes)):
            for j in range(len(nodes)):
                # clearly ordered keys must give the same order of values (log-space gap
                # above float noise); equal keys of one kind give equal values
                assert not (at[j][1] - at[i][1] > 1e-6 and values[i] >= values[j])
                if type(nodes[i]) is type(nodes[j]):
                    assert not (keys[j][1] - keys[i][1] > 1e-9 and values[i] >= values[j])
                    assert not (keys[i] == keys[j] and
                                not math.isclose(values[i], values[j], rel_tol=1e-9))


# -- the half-life follows the workload ------------------------------------------------------

def test_half_life_follows_the_mean_gap_between_visits_of_a_kv_node():
    cost = CostModel(make_cfg(half_life=15.0), host_keeps_kv=True)
    rekeys = []
    cost.on_rekey = lambda: rekeys.append(cost.half_life.value)
    root = AdapterNode(parent=None, tier=Tier.DEVICE, name="a", num_blocks=2)
    node = _kv(root, 8)
    cost.visit(node, now=0.0)  # no earlier use: nothing learned, the prior stands
    cost.visit(node, now=0.0)  # two uses at one instant: not a gap either
    assert cost.half_life.value == 15.0 and rekeys == []
    for t in (3.0, 6.0, 9.0):  # reused every 3 s: H becomes 3 s, keys rebuilt once
        cost.visit(node, now=t)
    assert cost.half_life.value == pytest.approx(3.0) and rekeys == [pytest.approx(3.0)]
    cost.visit(root, now=60.0)  # an adapter's gaps measure its popularity, not KV reuse
    assert cost.half_life.value == pytest.approx(3.0)
    for k in range(1, 100):  # never below the floor, however hot the node
        cost.visit(node, now=9.0 + 0.1 * k)
    assert cost.half_life.mean < 0.2
    assert MIN_HALF_LIFE_S <= cost.half_life.value <= REKEY_RATIO * MIN_HALF_LIFE_S


def test_a_dropped_node_asked_for_again_still_reports_its_gap():
    # X is used at t=0 and dropped (no host) for Y, Z; at t=30 a request wants X again. Only
    # surviving nodes were timed before ghosts, so a short H evicted long-gap nodes before
    # their gaps were seen. The 30 s gap now counts; a prefix never cached (W) reports none.
    m = make_manager("fastlibra", device_blocks=8, host_blocks=0, adapters={"a": 2})
    run(m, "x", "a", X + (9,), now=0.0)
    run(m, "y", "a", Y + (9,), now=1.0)
    assert m.cost.half_life.seen == 0
    run(m, "z", "a", blocks(5, 6) + (9,), now=2.0)  # X (the least valued) is dropped
    assert tree(m, "a") == ["[3][4] DEVICE [4, 5]", "[5][6] DEVICE [2, 3]"]
    run(m, "w", "a", blocks(7) + (9,), now=3.0)  # never cached before: no gap
    assert m.cost.half_life.seen == 0
    run(m, "x2", "a", X + (9,), now=30.0)
    assert m.cost.half_life.seen == 1 and m.cost.half_life.mean == pytest.approx(30.0)


def test_a_finished_burst_leaves_before_the_live_one_with_the_learned_half_life():
    # Agent-like: X was reused every 2 s until t=6 (a burst that ended), Y began at t=19.
    # Learned H = 2 s: X's four visits are worth ~2 / 2**7 at t=20, Y's one ~0.7: X leaves,
    # as LRU would have it. With a fixed 60 s H, X's visits still outweigh Y's and the live
    # burst is pushed out instead.
    m = _two_leaves(x_visits=(0.0, 2.0, 4.0, 6.0), y_visits=(19.0,))
    assert m.cost.half_life.value == pytest.approx(2.0)
    _pressure(m, now=20.0)
    assert tree(m, "a") == ["[1][2] HOST [0, 1]", "[3][4] DEVICE [4, 5]"]

    m = _two_leaves(x_visits=(0.0, 2.0, 4.0, 6.0), y_visits=(19.0,))
    m.cost.set_half_life(60.0)
    _pressure(m, now=20.0)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] HOST [0, 1]"]


def test_lru_keys_are_not_rebuilt_when_the_half_life_moves():
    m = _two_leaves("fastlibra-lru", x_visits=(0.0, 2.0, 4.0), y_visits=(5.0,))
    assert m.cost.on_rekey is None
    m = _two_leaves("fastlibra-nodep", x_visits=(0.0, 2.0, 4.0), y_visits=(5.0,))
    assert m.cost.on_rekey is not None  # same ranking as fastlibra: same learned H


def test_queued_demand_stays_with_the_requests_still_waiting():
    """A queues before Y's child Z exists, B after: when A leaves, Z keeps B's demand
    (recounting from A's prompt would take B's count away from Z)."""
    m = _two_leaves(x_visits=(0.0, 0.0, 0.0), y_visits=(1.0,))
    Z = Y + blocks(5)
    m.add_demand("A", "a", Z + (99,))  # counts on a and Y: Z does not exist yet
    run(m, "z", "a", Z, now=1.5)  # Z is cached under Y
    m.add_demand("B", "a", Z + (99,))  # counts on a, Y and Z
    z = m.adapters["a"].children[Y[:4]].children[blocks(5)]
    assert z.demand == 1
    m.remove_demand("A")
    assert z.demand == 1 and m.adapters["a"].children[Y[:4]].demand == 1
    m.check_invariants()  # queued demand equals a recount from the queue
    m.remove_demand("B")
    assert z.demand == 0 and m.adapters["a"].demand == 0
    m.check_invariants()


# -- each mechanism can be switched off (held-out validation in bench mechanisms) ----------

def test_without_the_leaf_floor_a_new_leaf_starts_at_one_visit():
    cost = CostModel(make_cfg(), host_keeps_kv=True, without=frozenset({"leaf-floor"}))
    a = AdapterNode(parent=None, name="a", freq=1.0, t_last=0.0)
    cost.leaf_reuse = 0.25  # as learned in the test above
    leaf = _kv(a, 4)
    a.children = {(i,): _kv(a, 4) for i in range(5)} | {(9,): leaf}
    cost.inherit(leaf, now=0.0)
    assert leaf.freq == 1.0  # with the floor: 0.25


def test_without_ghosts_a_dropped_node_reports_no_gap():
    m = make_manager("fastlibra~ghosts", device_blocks=8, host_blocks=0, adapters={"a": 2})
    run(m, "x", "a", X + (9,), now=0.0)
    run(m, "y", "a", Y + (9,), now=1.0)
    run(m, "z", "a", blocks(5, 6) + (9,), now=2.0)  # X is dropped
    run(m, "x2", "a", X + (9,), now=30.0)
    assert m.cost.half_life.seen == 0  # with ghosts: the 30 s gap


def test_without_queued_demand_the_key_is_history_only():
    m = make_manager("fastlibra~queued-demand", adapters={"a": 2})
    m.add_demand("q", "a", (1, 2))
    a = m.adapter("a")
    assert a.demand == 1 and m.cost.key(a, Tier.HOST)[0] == 0


def test_mechanism_names_are_checked():
    from fastlibra.cache import get_policy
    assert get_policy("fastlibra~ghosts~leaf-floor").cost_without == {"ghosts", "leaf-floor"}
    with pytest.raises(ValueError, match=r"unknown cost-model mechanism\(s\) \['ghost'\]"):
        get_policy("fastlibra~ghost")
    with pytest.raises(ValueError, match="does not rank by the cost model"):
        get_policy("vllm~ghosts")
