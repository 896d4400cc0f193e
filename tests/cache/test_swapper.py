"""The swapper: watermarks, leaves-first swap-out, root-first prefetch, and every byte
handed to the Mover."""

from conftest import (
    BLOCK_BYTES,
    RecordingMover,
    adapter_bytes,
    blocks,
    make_manager,
    run,
    tree,
)

from fastlibra.cache import CountingMover, Tier


def _four_leaves(recorder, **kw):
    """Device of 10 blocks (high watermark 7, low 5), adapter a and four 1-block leaves
    used at t = 0, 1, 2, 3, plus a running base-model request of 3 blocks:

        device  0 1 | 2   3   4   5   | 6 7 8 | 9
                a a | [1] [2] [3] [4] | big   | .        used 9 > 7
    """
    m = make_manager(device_blocks=10, host_blocks=8, high=0.7, low=0.5,
                     adapters={"a": 2}, mover=recorder, **kw)
    for i in range(4):
        run(m, f"r{i}", "a", blocks(i + 1), now=float(i))
    big = m.allocate("big", None, (1,) * 12, now=4.0)
    assert big.blocks == [6, 7, 8]
    assert tree(m, "a") == ["[1] DEVICE [2]", "[2] DEVICE [3]", "[3] DEVICE [4]", "[4] DEVICE [5]"]
    recorder.take()
    return m, big


def test_tick_above_the_high_watermark_swaps_the_coldest_leaves_out_down_to_it(recorder):
    m, big = _four_leaves(recorder)
    m.tick(now=10.0)
    m.check_invariants()
    # device a a | . . [3] [4] | big | .   used 7      host [1] [2]
    assert recorder.take() == [
        ("swap_out", "KV(a[0:4], HOST, ref=0)", [2], [0], BLOCK_BYTES),
        ("swap_out", "KV(a[0:4], HOST, ref=0)", [3], [1], BLOCK_BYTES),
    ]
    assert tree(m, "a") == ["[1] HOST [0]", "[2] HOST [1]", "[3] DEVICE [4]", "[4] DEVICE [5]"]
    assert m.device_kv_pool.num_used == 7
    assert big.blocks == [6, 7, 8]  # a running request's blocks never move
    assert (m.stats.swap_outs, m.stats.bytes_moved["swap_out"]) == (2, 2 * BLOCK_BYTES)

    m.tick(now=11.0)  # at the high watermark and above the low one: nothing to do
    assert recorder.take() == []


def test_host_nodes_worth_less_than_every_device_leaf_are_not_prefetched(recorder):
    m, big = _four_leaves(recorder)
    m.tick(now=10.0)
    m.free(big, (), now=11.0)  # caches nothing: used 4, below the low watermark (5)
    recorder.take()
    m.tick(now=12.0)
    # [1] and [2] (used at t=0, 1) would be the next victims of [3] and [4]: no churn
    assert recorder.take() == []
    assert tree(m, "a") == ["[1] HOST [0]", "[2] HOST [1]", "[3] DEVICE [4]", "[4] DEVICE [5]"]


def test_below_the_low_watermark_a_queued_requests_node_is_prefetched(recorder):
    m, big = _four_leaves(recorder)
    m.tick(now=10.0)
    m.free(big, (), now=11.0)
    m.add_demand("q", "a", blocks(2) + (99,))  # a queued request will reuse [2]
    recorder.take()
    m.tick(now=12.0)
    m.check_invariants()
    # device a a | . . [3] [4] | [2] . . | .   used 5 = low watermark: [1] stays on host
    # (the most recently freed block, 6 of big's, is reused first)
    assert recorder.take() == [("swap_in", "KV(a[0:4], DEVICE, ref=0)", [1], [6], BLOCK_BYTES)]
    assert tree(m, "a") == ["[1] HOST [0]", "[2] DEVICE [6]", "[3] DEVICE [4]", "[4] DEVICE [5]"]
    # the queued request now hits on device
    assert m.match("a", blocks(2) + (99,)) == (4, 0, Tier.DEVICE)


def test_a_request_that_hits_a_node_still_being_prefetched_waits_for_the_copy():
    recorder = RecordingMover(delay=1.0)
    m, big = _four_leaves(recorder)
    m.tick(now=10.0)
    m.free(big, (), now=11.0)
    m.add_demand("q", "a", blocks(2) + (99,))
    m.tick(now=12.0)  # [2] starts coming back; the copy ends at 13
    alloc = m.allocate("r", "a", blocks(2) + (99,), now=12.5)
    assert (alloc.device_hit_tokens, alloc.ready_at) == (4, 13.0)
    m.free(alloc, now=14.0)
    later = m.allocate("r2", "a", blocks(2) + (99,), now=14.0)
    assert later.ready_at == 14.0
    m.check_invariants()


def _host_chain(recorder, low, **kw):
    """Device of 16: adapter a, cold leaf Z on device; P ── C and Q on host.

        a(0 1) ─┬─ Z=[9]        device (2)       value 1
                ├─ P=[1][2][3]  host   (0 1 2)   value 20
                │    └─ C=[4]   host   (3)       value 100  (hottest, but P is on host)
                └─ Q=[5]        host   (4)       value 50
    """
    m = make_manager(device_blocks=16, host_blocks=8, low=low, adapters={"a": 2},
                     mover=recorder, **kw)
    run(m, "z", "a", blocks(9))
    run(m, "p", "a", blocks(1, 2, 3))
    run(m, "c", "a", blocks(1, 2, 3, 4) + (99,), computed=blocks(1, 2, 3, 4))
    run(m, "q", "a", blocks(5))
    a = m.adapters["a"]
    z, p, q = a.children[blocks(9)], a.children[blocks(1)], a.children[blocks(5)]
    c = p.children[blocks(4)]
    for node in (c, p, q):  # leaves first
        m.move(node, Tier.HOST, now=0.0)
    for node, freq in ((z, 1.0), (p, 20.0), (c, 100.0), (q, 50.0)):
        node.freq, node.t_last = freq, 0.0  # injected visit statistics
        m.swapper.touch(node)
    m.check_invariants()
    recorder.take()
    return m, {"Z": z, "P": p, "C": c, "Q": q}


def test_prefetch_never_takes_a_node_whose_parent_is_on_host(recorder):
    # low watermark 5 of 16: after Q (used 4) there is room for C (1 block) but not P (3)
    m, n = _host_chain(recorder, low=5 / 16)
    m.tick(now=1.0)
    m.check_invariants()
    assert [r[1] for r in recorder.take()] == ["KV(a[0:4], DEVICE, ref=0)"]
    assert (n["Q"].tier, n["P"].tier, n["C"].tier) == (Tier.DEVICE, Tier.HOST, Tier.HOST)


def test_prefetch_brings_a_child_once_its_parent_arrived(recorder):
    m, n = _host_chain(recorder, low=0.5)  # room up to 8 blocks
    m.tick(now=1.0)
    m.check_invariants()
    # Q (50) first, then P (20); P's arrival makes C (100) a candidate: used 2+1+1+3+1 = 8
    assert [(mv.node, mv.kind.value) for mv in recorder.log] == [
        (n["Q"], "swap_in"), (n["P"], "swap_in"), (n["C"], "swap_in")]
    assert [mv.nbytes for mv in recorder.log] == [64, 192, 64]
    assert m.device_kv_pool.num_used == 8


def test_prefetch_moves_at_most_max_prefetch_blocks_per_tick(recorder):
    # with room for all three (low watermark 14 of 16), a budget of one block per tick
    # brings Q alone; without the budget, Q, P and C come in one tick (test above)
    m, n = _host_chain(recorder, low=0.9, max_prefetch_blocks=1)
    m.tick(now=1.0)
    m.check_invariants()
    assert [mv.node for mv in recorder.take_log()] == [n["Q"]]


def test_a_node_larger_than_the_prefetch_budget_comes_alone_and_stalls_nothing(recorder):
    # budget 2: Q (1 block) fits; P (3 blocks) does not fit what is left of the tick: it
    # waits for the next one, which it takes alone (it could never fit a budget), and
    # C, ranked behind it, follows on the tick after.
    m, n = _host_chain(recorder, low=0.9, max_prefetch_blocks=2)
    ticks = []
    for now in (1.0, 1.1, 1.2):
        m.tick(now=now)
        m.check_invariants()
        ticks.append([mv.node for mv in recorder.take_log()])
    assert ticks == [[n["Q"]], [n["P"]], [n["C"]]]


# -- a device victim meets a full host -------------------------------------------------------

def _full_host(recorder, z_visits):
    """Device of 8, host of 2: X=[1][2] hot on device, Y=[3][4] on host, Z=[5][6] new.

        a(0 1) ─┬─ X (2 3)  device   6 visits at t=0
                ├─ Y (0 1)  host     1 visit at t=1, swapped out at t=2
                └─ Z (4 5)  device   z_visits at t=3
    """
    m = make_manager(device_blocks=8, host_blocks=2, adapters={"a": 2}, mover=recorder)
    for i in range(6):
        run(m, f"x{i}", "a", blocks(1, 2) + (99,) * (i > 0), now=0.0)
    run(m, "y", "a", blocks(3, 4), now=1.0)
    p = m.allocate("p", None, blocks(7, 8) + (1,), now=2.0)  # pushes Y out to host
    m.free(p, (), now=3.0)
    for i in range(z_visits):
        run(m, f"z{i}", "a", blocks(5, 6) + (99,) * (i > 0), now=3.0)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] HOST [0, 1]", "[5][6] DEVICE [4, 5]"]
    recorder.take()
    return m


def test_a_victim_worth_less_than_the_host_nodes_is_dropped(recorder):
    m = _full_host(recorder, z_visits=1)
    m.allocate("q", None, blocks(7, 8) + (1,), now=4.0)
    m.check_invariants()
    # Z (one visit) is the coldest on device, and colder than Y: it is dropped, Y stays
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[3][4] HOST [0, 1]"]
    assert recorder.take() == [] and m.stats.drops == 1


def test_a_victim_worth_more_than_a_host_node_takes_its_place(recorder):
    m = _full_host(recorder, z_visits=4)
    m.allocate("q", None, blocks(7, 8) + (1,), now=4.0)
    m.check_invariants()
    # Z (four visits) is still the coldest on device but beats Y: Y is dropped, Z hosted
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "[5][6] HOST [0, 1]"]
    assert recorder.take() == [("swap_out", "KV(a[0:8], HOST, ref=0)", [4, 5], [0, 1], 128)]
    assert m.stats.drops == 1


def test_a_victim_with_children_on_host_makes_room_there_whatever_the_values(recorder):
    # P=[1] is the device leaf to evict; its child C=[2] and H=[5] fill the host and are both
    # worth more than P. Dropping P would lose C too, so the colder host node H makes way.
    m = make_manager(device_blocks=8, host_blocks=2, adapters={"a": 2}, mover=recorder)
    run(m, "p", "a", blocks(1))
    run(m, "c", "a", blocks(1, 2) + (99,), computed=blocks(1, 2))
    run(m, "h", "a", blocks(5))
    a = m.adapters["a"]
    p, h = a.children[blocks(1)], a.children[blocks(5)]
    c = p.children[blocks(2)]
    m.move(c, Tier.HOST, now=0.0)
    m.move(h, Tier.HOST, now=0.0)
    for node, freq in ((p, 1.0), (c, 10.0), (h, 5.0)):
        node.freq, node.t_last = freq, 0.0  # injected visit statistics
        m.swapper.touch(node)
    # a(0 1) ─┬─ P (2) device ── C (0) host
    #         └─ H (1) host
    assert tree(m, "a") == ["[1] DEVICE [2]", "  [2] HOST [0]", "[5] HOST [1]"]
    recorder.take()
    m.allocate("big", None, (1,) * 24, now=1.0)  # 6 blocks, 5 free: P must leave
    m.check_invariants()
    assert tree(m, "a") == ["[1] HOST [1]", "  [2] HOST [0]"]
    assert recorder.take() == [("swap_out", "KV(a[0:4], HOST, ref=0)", [2], [1], 64)]
    assert m.stats.drops == 1


# -- the Mover -------------------------------------------------------------------------------

def test_every_copy_goes_through_the_mover_and_sets_when_the_request_is_ready():
    recorder = RecordingMover(delay=0.5)
    m = make_manager(device_blocks=8, host_blocks=8, mover=recorder)
    m.register_adapter("a", adapter_bytes(3) - 10)  # 182 bytes: its last block not full
    first = m.allocate("r1", "a", blocks(1, 2), now=1.0)
    # the adapter's file is read into device blocks 0 1 2; the request waits for it
    assert recorder.take() == [("load", "Adapter(a#0, DEVICE, 3b)", [], [0, 1, 2], 182)]
    assert first.ready_at == 1.5
    m.free(first, now=2.0)
    second = m.allocate("r2", "a", blocks(1, 2) + (9,), now=3.0)
    assert recorder.take() == [] and second.ready_at == 3.0  # nothing to wait for
    m.free(second, now=3.0)
    m.check_invariants()


def test_counting_mover_counts_bytes_per_direction():
    mover = CountingMover()
    m = make_manager(device_blocks=8, host_blocks=8, adapters={"a": 2}, mover=mover)
    run(m, "r1", "a", blocks(1, 2))
    kv = m.adapters["a"].children[blocks(1)]
    m.move(kv, Tier.HOST, now=1.0)
    m.move(kv, Tier.DEVICE, now=2.0)
    m.check_invariants()
    assert mover.bytes_by_kind == {"load": adapter_bytes(2), "load_host": 0,
                                   "swap_out": 2 * BLOCK_BYTES, "swap_in": 2 * BLOCK_BYTES}
    assert (mover.moves, mover.total_bytes) == (3, 6 * BLOCK_BYTES)
    assert m.stats.bytes_moved == mover.bytes_by_kind


def test_host_nodes_are_not_dropped_for_a_victim_that_cannot_get_in_anyway(recorder):
    # host (3): H1=[1] (0) value 1, H2=[2][3] (1 2) value 100; device victim V=[4][5][6]
    # value 10 needs 3 host blocks: only H1 is worth less, and H1 alone frees 1 block.
    m = make_manager(device_blocks=12, host_blocks=3, adapters={"a": 2}, mover=recorder)
    run(m, "h1", "a", blocks(1))
    run(m, "h2", "a", blocks(2, 3))
    run(m, "v", "a", blocks(4, 5, 6))
    a = m.adapters["a"]
    h1, h2, v = a.children[blocks(1)], a.children[blocks(2)], a.children[blocks(4)]
    m.move(h1, Tier.HOST, now=0.0)
    m.move(h2, Tier.HOST, now=0.0)
    for node, freq in ((h1, 1.0), (h2, 100.0), (v, 10.0)):
        node.freq, node.t_last = freq, 0.0  # injected visit statistics
        m.swapper.touch(node)
    m.allocate("big", None, (1,) * 40, now=1.0)  # 10 blocks, 7 free: V must leave
    m.check_invariants()
    # V is dropped (it cannot get a place on host); H1 should still be there
    assert tree(m, "a") == ["[1] HOST [0]", "[2][3] HOST [1, 2]"]
