"""CacheManager: admitting and finishing requests, pins, moves between tiers, adapter
generations, and clear errors for bad input that leave the cache consistent."""

import pytest
from conftest import (
    BLOCK_BYTES,
    RecordingMover,
    adapter_bytes,
    blocks,
    make_manager,
    run,
    tree,
)

from fastlibra.cache import (
    CacheError,
    CacheManager,
    NotPinned,
    RequestTooLarge,
    Tier,
    UnknownAdapter,
)
from fastlibra.config import ConfigError

# -- admitting and finishing requests --------------------------------------------------------


def test_first_request_loads_the_adapter_from_disk_and_later_ones_hit_it(recorder):
    m = make_manager(adapters={"a": 2}, mover=recorder)
    assert m.adapters["a"].tier is Tier.DISK
    r1 = m.allocate("r1", "a", blocks(1, 2) + (5,), now=0.0)
    # device  0 1 | 2 3 4 | . . .
    #         a a | r1    |
    assert r1.blocks == [2, 3, 4] and r1.block_table() == [2, 3, 4]
    assert recorder.take() == [("load", "Adapter(a#0, DEVICE, 2b)", [], [0, 1], 2 * BLOCK_BYTES)]
    m.free(r1, now=1.0)
    run(m, "r2", "a", blocks(9) + (5,), now=2.0)
    assert (m.stats.adapter_disk_loads, m.stats.adapter_device_hits) == (1, 1)
    assert m.stats.requests == 2 and m.stats.prompt_tokens == 14
    m.check_invariants()


def test_reserve_tokens_are_allocated_with_the_prompt():
    m = make_manager(adapters={"a": 2})
    alloc = m.allocate("r1", "a", blocks(1) + (5,), now=0.0, reserve_tokens=4)
    assert alloc.blocks == [2, 3, 4]  # 5 prompt + 4 reserved tokens = 3 blocks
    m.check_invariants()


def test_free_caches_the_generated_tokens_too():
    m = make_manager(adapters={"a": 2})
    alloc = m.allocate("r1", "a", blocks(1) + (20, 21), now=0.0)
    assert m.append(alloc, 10, now=1.0)  # 6 prompt + 4 decoded tokens -> 3 blocks
    assert alloc.blocks == [2, 3, 4]
    m.free(alloc, blocks(1, 2) + (30,), now=2.0)  # prompt + generated, last one not computed
    m.check_invariants()
    # a ── [1][2] (2 3); the partial third block (4) is freed
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]"]
    assert m.match("a", blocks(1, 2) + (30,)) == (8, 0, Tier.DEVICE)


def test_append_evicts_cached_kv_and_reports_when_the_device_is_full():
    m = make_manager(device_blocks=6, host_blocks=0, adapters={"a": 2})
    run(m, "r0", "a", blocks(7))
    alloc = m.allocate("r1", "a", blocks(1) + (5,), now=1.0)
    # device  a a | [7] | r1 r1 | .
    assert alloc.blocks == [3, 4]
    assert m.append(alloc, 12, now=2.0) and alloc.blocks == [3, 4, 5]
    assert m.append(alloc, 16, now=3.0) and alloc.blocks == [3, 4, 5, 2]  # [7] dropped
    assert tree(m, "a") == []
    m.check_invariants()
    assert not m.append(alloc, 17, now=4.0)  # nothing left to evict: preempt someone
    assert alloc.blocks == [3, 4, 5, 2]
    assert m.append(alloc, 16, now=4.0)  # already has room: no change
    m.check_invariants()


# -- pins (I2) -------------------------------------------------------------------------------

def test_pinning_a_node_pins_its_ancestors_and_unpin_releases_them():
    m = make_manager(adapters={"a": 2})
    run(m, "r0", "a", blocks(1, 2, 3))
    r1 = m.allocate("r1", "a", blocks(1, 2, 9), now=1.0)  # splits [1][2][3] at [1][2]
    r2 = m.allocate("r2", "a", blocks(1, 2, 3) + (9,), now=1.0)
    # a (pin 2) ── [1][2] (pin 2) ── [3] (pin 1, by r2 only)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3] pin=2", "  [3] DEVICE [4] pin=1"]
    assert m.adapters["a"].ref_count == 2
    m.check_invariants()
    m.free(r2, now=2.0)  # its 13th token's block (6) held nothing whole: freed
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3] pin=1", "  [3] DEVICE [4]"]
    m.free(r1, now=2.0)  # its own block 5 now caches [9]
    assert m.adapters["a"].ref_count == 0
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "  [3] DEVICE [4]", "  [9] DEVICE [5]"]
    m.check_invariants()


def test_direct_pin_and_unpin_count_per_pin():
    m = make_manager(adapters={"a": 2})
    run(m, "r0", "a", blocks(1, 2))
    node = m.adapters["a"].children[blocks(1)]
    m.pin(node)
    m.pin(node)
    assert (node.ref_count, m.adapters["a"].ref_count) == (2, 2)
    m.unpin(node)
    m.unpin(node)
    assert (node.ref_count, m.adapters["a"].ref_count) == (0, 0)
    with pytest.raises(NotPinned, match=r"KV\(a\[0:8\].* is not pinned"):
        m.unpin(node)
    assert (node.ref_count, m.adapters["a"].ref_count) == (0, 0)
    m.check_invariants()


def test_a_pinned_node_is_never_evicted_allocate_waits_instead():
    m = make_manager(device_blocks=8, adapters={"a": 2})
    r1 = m.allocate("r1", "a", blocks(1, 2, 3), now=0.0)
    run(m, "x", "a", blocks(5))
    r2 = m.allocate("r2", "a", blocks(5) + (99,), now=1.0)
    # device  a a | r1 r1 r1 | [5] | r2 | .      a and [5] pinned by r2
    before = (tree(m, "a"), m.device_kv_pool.usage(), m.host_pool.usage())
    assert before[0] == ["[5] DEVICE [5] pin=1"]
    assert m.allocate("r3", None, blocks(7, 8), now=2.0) is None  # needs 2, 1 free
    assert (tree(m, "a"), m.device_kv_pool.usage(), m.host_pool.usage()) == before
    assert m.stats.deferred == 1 and "r3" not in m.running
    m.check_invariants()

    m.free(r1, now=3.0)  # [1][2][3] is cached and unpinned: now it can make way
    r3 = m.allocate("r3", None, blocks(7, 8), now=3.0)
    assert r3.blocks == [2, 3]
    assert tree(m, "a") == ["[1][2][3] HOST [0, 1, 2]", "[5] DEVICE [5] pin=1"]
    m.free(r2, now=4.0)
    m.free(r3, now=4.0)
    m.check_invariants()


# -- moves between tiers ---------------------------------------------------------------------

def test_a_host_hit_is_swapped_back_in_and_reported(recorder):
    m = make_manager(device_blocks=8, adapters={"a": 2}, mover=recorder)
    run(m, "r1", "a", blocks(1, 2), now=0.0)
    kv = m.adapters["a"].children[blocks(1)]
    m.move(kv, Tier.HOST, now=1.0)
    assert tree(m, "a") == ["[1][2] HOST [0, 1]"]
    assert m.match("a", blocks(1, 2, 3)) == (0, 8, Tier.DEVICE)
    recorder.take()
    recorder.delay = 0.25
    alloc = m.allocate("r2", "a", blocks(1, 2, 3), now=2.0)
    m.check_invariants()
    assert (alloc.device_hit_tokens, alloc.host_hit_tokens, alloc.cached_tokens) == (0, 8, 8)
    assert recorder.take() == [("swap_in", "KV(a[0:8], DEVICE, ref=1)", [0, 1], [2, 3], 128)]
    # device a a | [1][2] | r2 | . . . .    host free again
    assert alloc.block_table() == [2, 3, 4]
    assert alloc.ready_at == 2.25  # the request waits for its swap-in
    assert (m.stats.host_hit_tokens, m.stats.swap_ins, m.host_pool.num_free) == (8, 1, 8)
    m.free(alloc, now=3.0)
    m.check_invariants()


def test_a_host_hit_behind_a_congested_copy_queue_is_recomputed_instead(recorder):
    m = make_manager(device_blocks=8, adapters={"a": 2}, mover=recorder)
    run(m, "r1", "a", blocks(1, 2), now=0.0)
    kv = m.adapters["a"].children[blocks(1)]
    m.move(kv, Tier.HOST, now=1.0)
    recorder.take()
    # recomputing 8 tokens takes well under a second; the queue says one second
    recorder.quoted_delay = 1.0
    alloc = m.allocate("r2", "a", blocks(1, 2, 3), now=2.0)
    m.check_invariants()
    assert (alloc.host_hit_tokens, alloc.cached_tokens, alloc.ready_at) == (0, 0, 2.0)
    assert recorder.take() == []  # nothing copied; the host copy stays for later
    assert kv.tier is Tier.HOST
    m.free(alloc, now=3.0)
    m.check_invariants()
    assert tree(m, "a") == ["[1][2] HOST [0, 1]"]


def test_a_returning_conversation_brings_its_adapter_back_before_its_kv():
    recorder = RecordingMover(delay=0.5)
    m = make_manager(device_blocks=8, adapters={"a": 2}, mover=recorder)
    run(m, "r1", "a", blocks(1, 2), now=0.0)
    m.move(m.adapters["a"].children[blocks(1)], Tier.HOST, now=1.0)  # leaves first (I1)
    m.move(m.adapters["a"], Tier.HOST, now=1.0)
    m.check_invariants()
    # host: [1][2] (0 1), a (2 3)        device: empty
    assert m.match("a", blocks(1, 2, 3)) == (0, 8, Tier.HOST)
    recorder.take()
    alloc = m.allocate("r2", "a", blocks(1, 2, 3), now=2.0)
    m.check_invariants()
    # root first: the adapter, then its KV; both copies overlap and end at 2.5
    # device  0 1 | 2 3    | 4
    #         a a | [1][2] | r2
    assert recorder.take() == [
        ("swap_in", "Adapter(a#0, DEVICE, 2b)", [2, 3], [0, 1], 2 * BLOCK_BYTES),
        ("swap_in", "KV(a[0:8], DEVICE, ref=1)", [0, 1], [2, 3], 2 * BLOCK_BYTES),
    ]
    assert alloc.block_table() == [2, 3, 4]
    assert alloc.ready_at == 2.5 and alloc.host_hit_tokens == 8
    assert m.stats.adapter_host_hits == 1
    m.free(alloc, now=3.0)
    m.check_invariants()


def test_a_host_hit_can_follow_a_device_hit_in_one_prompt():
    m = make_manager(device_blocks=8, adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    run(m, "r2", "a", blocks(1, 2, 4))
    a = m.adapters["a"]
    m.move(a.children[blocks(1)].children[blocks(3)], Tier.HOST, now=1.0)
    # a ── [1][2] (2 3) device ─┬─ [3] (0) host       device block 4 free again
    #                            └─ [4] (5) device
    alloc = m.allocate("r3", "a", blocks(1, 2, 3) + (99,), now=2.0)
    assert (alloc.device_hit_tokens, alloc.host_hit_tokens) == (8, 4)
    # [3] comes back first (into block 4), then r3's own block 6
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3] pin=1", "  [3] DEVICE [4] pin=1",
                            "  [4] DEVICE [5]"]
    assert alloc.block_table() == [2, 3, 4, 6]
    m.free(alloc, now=2.0)
    m.check_invariants()


def test_drop_removes_a_kv_subtree_and_with_the_dependency_rule_an_adapters_kv():
    m = make_manager(adapters={"a": 2, "b": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    run(m, "r2", "a", blocks(1, 2, 4))
    run(m, "r3", "b", blocks(1, 2))
    a = m.adapters["a"]
    m.drop(a.children[blocks(1)])  # [1][2] and both children
    assert tree(m, "a") == [] and a.tier is Tier.DEVICE
    m.check_invariants()
    m.drop(m.adapters["b"])
    assert tree(m, "b") == [] and m.adapters["b"].tier is Tier.DISK
    assert m.device_kv_pool.num_free == 16 - 2
    assert m.stats.drops == 2
    m.check_invariants()


def test_a_pinned_node_cannot_be_dropped_or_moved_off_the_device():
    m = make_manager(adapters={"a": 2})
    alloc = m.allocate("r1", "a", blocks(1), now=0.0)
    with pytest.raises(AssertionError):
        m.drop(m.adapters["a"])
    with pytest.raises(AssertionError):
        m.move(m.adapters["a"], Tier.HOST, now=0.0)
    m.free(alloc, now=0.0)
    m.check_invariants()


# -- adapter generations ---------------------------------------------------------------------

def test_reregistering_a_name_makes_a_new_generation_and_frees_the_old_kv():
    m = make_manager(adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    old = m.adapters["a"]
    new = m.register_adapter("a", adapter_bytes(2))
    assert (old.generation, new.generation, m.adapters["a"] is new) == (0, 1, True)
    assert old.retired and old.tier is Tier.DISK and tree(m, old) == []
    assert m.device_kv_pool.num_free == 16  # old adapter and its KV are gone
    assert m.match("a", blocks(1, 2, 3) + (9,)) == (0, 0, Tier.DISK)
    assert old not in m.nodes()
    m.check_invariants()


def test_generations_never_repeat_after_unregister_while_the_old_one_still_runs():
    m = make_manager(adapters={"a": 2})
    old_alloc = m.allocate("r1", "a", blocks(1, 2), now=0.0)
    m.unregister_adapter("a")
    new = m.register_adapter("a", adapter_bytes(2))
    assert (old_alloc.adapter.generation, new.generation) == (0, 1)
    m.free(old_alloc, now=1.0)
    m.check_invariants()


def test_old_generation_in_use_is_freed_when_its_last_request_ends(recorder):
    m = make_manager(adapters={"a": 2}, mover=recorder)
    run(m, "r0", "a", blocks(1, 2))
    run(m, "r0b", "a", blocks(5, 6))
    running = m.allocate("r1", "a", blocks(1, 2) + (9,), now=1.0)
    old = m.adapters["a"]
    m.register_adapter("a", adapter_bytes(2))
    m.check_invariants()
    # the old a and its [1][2] stay pinned for r1; the unused [5][6] goes at once
    assert tree(m, old) == ["[1][2] DEVICE [2, 3] pin=1"]
    assert old.tier is Tier.DEVICE and old.retired
    # the new generation never matches the old KV, and loads its own copy of the adapter
    r2 = m.allocate("r2", "a", blocks(1, 2) + (9,), now=2.0)
    assert (r2.cached_tokens, m.adapters["a"].blocks) == (0, [4, 5])
    m.check_invariants()
    m.free(running, blocks(1, 2, 9), now=3.0)
    m.check_invariants()
    # the old generation's adapter, KV and r1's own blocks are all free; nothing was cached
    assert old.tier is Tier.DISK and tree(m, old) == [] and old not in m.nodes()
    assert m.device_kv_pool.usage() == {"adapter": 2, "kv_cached": 0, "kv_running": 3,
                                        "free": 11}
    m.free(r2, now=3.0)
    m.check_invariants()


def test_unregister_stops_serving_but_lets_running_requests_finish():
    m = make_manager(adapters={"a": 2})
    running = m.allocate("r1", "a", blocks(1, 2), now=0.0)
    m.unregister_adapter("a")
    with pytest.raises(UnknownAdapter, match="unknown adapter 'a'$"):
        m.allocate("r2", "a", blocks(1), now=1.0)
    m.check_invariants()
    m.free(running, now=2.0)
    assert m.device_kv_pool.num_free == 16
    assert m.register_adapter("a", adapter_bytes(2)).tier is Tier.DISK
    m.check_invariants()


# -- bad input: a clear exception and a consistent cache -------------------------------------

def _busy():
    """A cache with something in every state: cached KV, a running request, a loaded adapter."""
    m = make_manager(adapters={"a": 2, "b": 1})
    run(m, "r0", "a", blocks(1, 2))
    alloc = m.allocate("r1", "a", blocks(1, 2) + (9,), now=1.0)
    return m, alloc


def _snapshot(m):
    return (tree(m, "a"), [p.usage() for p in m.pools], dict(m.running), m.stats.requests)


@pytest.mark.parametrize("call", [
    lambda m: m.allocate("r2", "zzz", blocks(1), now=2.0),
    lambda m: m.match("zzz", blocks(1)),
    lambda m: m.add_demand("q", "zzz", blocks(1)),
    lambda m: m.unregister_adapter("zzz"),
    lambda m: m.check_fits("zzz", 4),
])
def test_unknown_adapter_names_only_the_name_asked_for(call):
    m, _ = _busy()
    before = _snapshot(m)
    with pytest.raises(UnknownAdapter, match="^unknown adapter 'zzz'$"):
        call(m)
    assert _snapshot(m) == before
    m.check_invariants()


def test_unknown_adapter_is_a_key_error_with_a_readable_message():
    m, _ = _busy()
    with pytest.raises(KeyError) as err:
        m.adapter("zzz")
    assert str(err.value) == "unknown adapter 'zzz'"  # not the registered names


def test_a_request_that_cannot_fit_in_an_empty_pool_says_the_numbers():
    m, _ = _busy()
    before = _snapshot(m)
    # adapter a (2 blocks) + 57 tokens (15 blocks) > 16 device blocks
    with pytest.raises(RequestTooLarge, match=r"needs 17 device blocks \(57 tokens of KV "
                                              r"\+ adapter\) but the pool holds 16"):
        m.allocate("big", "a", (1,) * 57, now=2.0)
    with pytest.raises(RequestTooLarge, match=r"needs 17 device blocks \(65 tokens of KV\)"):
        m.allocate("big", None, (1,) * 60, now=2.0, reserve_tokens=5)
    assert _snapshot(m) == before
    m.check_invariants()
    # 14 blocks of KV + the adapter fit an empty pool: waits (None), does not raise
    assert m.allocate("ok", "a", (1,) * 56, now=2.0) is None
    m.check_invariants()


def test_static_adapter_share_leaves_the_kv_pool_smaller():
    m = make_manager("vllm", device_blocks=20, adapters={"a": 2})
    # 4 blocks for adapters, 16 for KV: the adapter does not count against the KV pool
    with pytest.raises(RequestTooLarge, match="needs 17 device blocks .* holds 16"):
        m.allocate("big", "a", (1,) * 68, now=0.0)
    run(m, "ok", "a", (1,) * 64)


def test_freeing_twice_or_unpinning_the_unpinned_raises_not_pinned():
    m, alloc = _busy()
    m.free(alloc, now=2.0)
    before = _snapshot(m)
    with pytest.raises(NotPinned, match="request 'r1' is not running"):
        m.free(alloc, now=3.0)
    with pytest.raises(NotPinned, match="is not pinned"):
        m.unpin(m.adapters["a"])
    assert _snapshot(m) == before
    m.check_invariants()


def test_an_adapter_larger_than_the_pool_is_refused():
    m, _ = _busy()
    with pytest.raises(CacheError, match=r"adapter 'huge' needs 17 blocks \(1088 bytes\) but "
                                         r"the device pool holds 16"):
        m.register_adapter("huge", adapter_bytes(17))
    vllm = make_manager("vllm", device_blocks=20)
    with pytest.raises(CacheError, match="needs 5 blocks .* device-adapters pool holds 4"):
        vllm.register_adapter("big", adapter_bytes(5))
    assert "huge" not in m.adapters and "big" not in vllm.adapters
    m.check_invariants()
    vllm.check_invariants()


@pytest.mark.parametrize("name, nbytes, message", [
    ("", 64, "non-empty"),
    ("x", 0, "size must be positive, got 0"),
    ("x", -5, "size must be positive, got -5"),
])
def test_bad_adapter_registrations_are_refused(name, nbytes, message):
    m, _ = _busy()
    before = _snapshot(m)
    with pytest.raises(CacheError, match=message):
        m.register_adapter(name, nbytes)
    assert _snapshot(m) == before and set(m.adapters) == {"a", "b"}
    m.check_invariants()


def test_an_empty_prompt_or_a_reused_request_id_is_refused():
    m, _ = _busy()
    before = _snapshot(m)
    with pytest.raises(CacheError, match="at least one prompt token"):
        m.allocate("r2", "a", [], now=2.0)
    with pytest.raises(CacheError, match="request 'r1' is already running"):
        m.allocate("r1", "a", blocks(1), now=2.0)
    assert _snapshot(m) == before
    m.check_invariants()


def test_zero_or_negative_capacities_are_config_errors():
    with pytest.raises(ConfigError, match="device_blocks must be positive, got 0"):
        make_manager(device_blocks=0)
    with pytest.raises(ConfigError, match="host_blocks must not be negative, got -1"):
        make_manager(host_blocks=-1)


def test_a_static_share_too_small_for_one_block_is_refused():
    with pytest.raises(CacheError, match="adapter share of 0.2 of 4 device blocks"):
        make_manager("vllm", device_blocks=4)


# -- reporting, clear and the invariant checker ----------------------------------------------

def test_usage_reports_blocks_by_kind_per_pool():
    m, _ = _busy()
    assert m.usage() == {
        "device": {"adapter": 2, "kv_cached": 2, "kv_running": 1, "free": 11, "invalid_kv": 0},
        "host": {"adapter": 0, "kv_cached": 0, "kv_running": 0, "free": 8},
    }


def test_clear_frees_everything_not_in_use():
    m, alloc = _busy()
    run(m, "rb", "b", blocks(4))
    m.move(m.adapters["b"].children[blocks(4)], Tier.HOST, now=2.0)
    m.clear()
    m.check_invariants()
    # what r1 uses stays: a and [1][2] pinned, r1's own block
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3] pin=1"]
    assert (m.adapters["b"].tier, tree(m, "b")) == (Tier.DISK, [])
    m.free(alloc, now=3.0)
    m.clear()
    m.check_invariants()
    assert [p.num_free for p in m.pools] == [16, 8]


def test_check_invariants_catches_kv_left_on_device_under_a_host_parent():
    m = make_manager(adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    run(m, "r2", "a", blocks(1, 2, 4))
    m.move(m.adapters["a"].children[blocks(1)], Tier.HOST, now=1.0)  # parent before children
    with pytest.raises(AssertionError, match="I1"):
        m.check_invariants()


def test_check_invariants_catches_a_wrong_pin_count():
    m, _ = _busy()
    m.adapters["b"].ref_count = 1
    with pytest.raises(AssertionError, match="I2"):
        m.check_invariants()


def test_check_invariants_catches_a_leaked_block():
    m, _ = _busy()
    m.device_kv_pool.allocate(1, m.device_kv_pool.owner(2))  # cached KV owned by no node
    with pytest.raises(AssertionError, match="I3"):
        m.check_invariants()


def test_manager_accepts_a_policy_object_or_a_name():
    from fastlibra.cache import get_policy

    m = CacheManager(make_manager().cfg, get_policy("sglang"), mover=RecordingMover())
    assert m.policy.name == "sglang"
    with pytest.raises(ValueError, match="unknown policy 'lfu'"):
        make_manager("lfu")
