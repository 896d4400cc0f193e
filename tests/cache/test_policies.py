"""Policies: the baselines and ablations behave like the systems they stand for."""

import pytest
from conftest import adapter_bytes, blocks, make_cfg, make_manager, run, tree

from fastlibra.cache import (
    ABLATIONS,
    BASELINES,
    POLICIES,
    BlockKind,
    CacheError,
    CacheManager,
    Tier,
    get_policy,
)
from fastlibra.cache.policies import PAPER_POLICIES, Policy


def _four_adapters(policy):
    """Device of 10 blocks; adapters a b c d (2 blocks each) used in turn, one 2-block
    prompt each: [1][2] under a, [3][4] under b, [5][6] under c, [7][8] under d."""
    m = make_manager(policy, device_blocks=10, host_blocks=8,
                     adapters={"a": 2, "b": 2, "c": 2, "d": 2})
    for i, name in enumerate("abcd"):
        run(m, f"r{name}", name, blocks(2 * i + 1, 2 * i + 2), now=float(i))
    return m


def test_vllm_keeps_kv_of_evicted_adapters_on_device_where_fastlibra_keeps_none():
    vllm = _four_adapters("vllm")
    # adapter slots (2 blocks): d          host (max_cpu_loras = one slot's 2 blocks): c
    # KV pool (8 blocks):       [1][2] [3][4] [5][6] [7][8]   <- 6 blocks no request can hit
    assert {n: a.tier for n, a in vllm.adapters.items()} == {
        "a": Tier.DISK, "b": Tier.DISK, "c": Tier.HOST, "d": Tier.DEVICE}
    assert tree(vllm, "a") == ["[1][2] DEVICE [0, 1]"]
    assert vllm.invalid_kv_blocks == 6
    assert vllm.usage()["device-kv"] == {"adapter": 0, "kv_cached": 8, "kv_running": 0,
                                         "free": 0, "invalid_kv": 6}

    fastlibra = _four_adapters("fastlibra")
    # device (10): b c d [5][6] [7][8]       host: a [1][2] [3][4]
    # a left the device too, but only after its KV: nothing on device is unreachable
    assert fastlibra.adapters["a"].tier is Tier.HOST
    assert tree(fastlibra, "a") == ["[1][2] HOST [0, 1]"]
    assert tree(fastlibra, "b") == ["[3][4] HOST [4, 5]"]
    assert fastlibra.invalid_kv_blocks == 0
    assert fastlibra.usage()["device"]["invalid_kv"] == 0


def test_slora_keeps_no_kv_after_a_request_ends():
    m = make_manager("slora", adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    assert tree(m, "a") == []
    assert m.device_kv_pool.usage() == {"adapter": 2, "kv_cached": 0, "kv_running": 0,
                                        "free": 14}
    assert m.match("a", blocks(1, 2, 3) + (9,)) == (0, 0, Tier.DEVICE)
    again = m.allocate("r2", "a", blocks(1, 2, 3) + (9,), now=1.0)
    assert again.cached_tokens == 0 and again.blocks == [2, 3, 4, 5]
    m.free(again, now=1.0)
    m.check_invariants()


@pytest.mark.parametrize("policy", ["vllm", "sglang"])
def test_static_policies_split_the_device_into_an_adapter_and_a_kv_pool(policy):
    m = make_manager(policy, device_blocks=20, adapters={"a": 2, "b": 2, "c": 2})
    assert [(p.name, p.capacity) for p in m.pools] == [
        ("device-adapters", 4), ("device-kv", 16), ("host", 8)]
    run(m, "r1", "a", blocks(1, 2))
    run(m, "r2", "b", blocks(1, 2))
    # adapter pool: a a b b (full)     KV pool: a's [1][2], b's [1][2]
    assert m.device_adapter_pool.usage()["adapter"] == 4
    assert m.device_kv_pool.usage()["kv_cached"] == 4
    # KV never goes into the adapter share, even when the KV pool is full
    big = m.allocate("big", None, (1,) * 64, now=1.0)  # all 16 KV blocks: evicts the KV
    # the blocks freed last come first: b's [1][2] (2 3), a's (0 1), then 4..15
    assert big.blocks == [2, 3, 0, 1, *range(4, 16)]
    assert m.device_adapter_pool.usage() == {"adapter": 4, "kv_cached": 0, "kv_running": 0,
                                             "free": 0}
    assert tree(m, "a") == [] and tree(m, "b") == []  # no host KV tier: dropped
    m.check_invariants()
    m.free(big, (), now=1.0)
    # a third adapter evicts the least recently used one (a) to host
    run(m, "r3", "c", (7,))
    assert (m.adapters["a"].tier, m.adapters["b"].tier, m.adapters["c"].tier) == (
        Tier.HOST, Tier.DEVICE, Tier.DEVICE)


def test_adapter_share_can_be_overridden_for_static_policies_only():
    policy = get_policy("vllm", adapter_share=0.5)
    assert policy.adapter_share == 0.5 and POLICIES["vllm"].adapter_share == 0.2
    m = CacheManager(make_cfg(device_blocks=20), policy)
    assert (m.device_adapter_pool.capacity, m.device_kv_pool.capacity) == (10, 10)
    with pytest.raises(ValueError, match="'fastlibra' has one unified pool"):
        get_policy("fastlibra", adapter_share=0.5)
    with pytest.raises(ValueError, match=r"adapter_share must be in \(0, 1\)"):
        get_policy("sglang", adapter_share=1.0)


def _tail_vs_leaf(policy):
    """Device KV pool of 16: [1][2][3] cached under a (0 1 2), a running request holds the
    other 13 blocks; one more block is needed."""
    m = make_manager(policy, device_blocks=20, adapters={"a": 2})
    run(m, "r0", "a", blocks(1, 2, 3))
    m.allocate("r1", None, (1,) * 52, now=1.0)
    assert m.device_kv_pool.num_free == 0
    m.allocate("r2", None, (2,) * 4, now=2.0)
    m.check_invariants()
    return m


def test_vllm_evicts_single_tail_blocks_while_sglang_evicts_whole_leaves():
    vllm = _tail_vs_leaf("vllm")
    assert tree(vllm, "a") == ["[1][2] DEVICE [0, 1]"]  # only block 2 ([3]) was freed
    assert vllm.match("a", blocks(1, 2, 3) + (9,)) == (8, 0, Tier.DEVICE)
    sglang = _tail_vs_leaf("sglang")
    assert tree(sglang, "a") == []  # the whole leaf went
    assert sglang.device_kv_pool.num_free == 2


@pytest.mark.parametrize("policy", ["vllm", "sglang", "slora"])
def test_policies_without_a_swapper_do_nothing_between_steps(policy):
    m = make_manager(policy, device_blocks=20, high=0.5, low=0.5, adapters={"a": 2})
    run(m, "r0", "a", blocks(1, 2, 3))
    alloc = m.allocate("r1", None, (1,) * 44, now=1.0)  # 11 blocks: far above 50 %
    before = ([p.usage() for p in m.pools], tree(m, "a"))
    m.tick(now=2.0)
    assert ([p.usage() for p in m.pools], tree(m, "a")) == before
    m.free(alloc, now=3.0)
    m.check_invariants()


def test_fastlibra_nodep_lets_an_adapter_leave_before_its_kv():
    # the ablation drops only the adapter -> KV edge of the dependency rule
    m = make_manager("fastlibra-nodep", device_blocks=8, adapters={"a": 2})
    run(m, "r0", "a", blocks(1, 2))
    m.move(m.adapters["a"], Tier.HOST, now=1.0)
    m.check_invariants()
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]"] and m.invalid_kv_blocks == 2
    strict = make_manager("fastlibra", device_blocks=8, adapters={"a": 2})
    run(strict, "r0", "a", blocks(1, 2))
    strict.move(strict.adapters["a"], Tier.HOST, now=1.0)
    with pytest.raises(AssertionError, match="I1"):
        strict.check_invariants()


def test_policy_traits_match_the_systems_they_stand_for():
    traits = {name: (p.dependency_aware, p.reuse_kv, p.host_kv, p.swapper, p.adapter_share,
                     p.evict_blocks) for name, p in POLICIES.items()}
    assert traits == {
        "fastlibra": (True, True, True, True, None, False),
        "fastlibra-nodep": (False, True, True, True, None, False),
        "fastlibra-lru": (True, True, True, True, None, False),
        "vllm": (False, True, False, False, 0.2, True),
        "vllm-offload": (False, True, True, False, 0.2, True),
        "sglang": (False, True, False, False, 0.2, False),
        "sglang-hicache": (False, True, True, False, 0.2, False),
        "slora": (False, False, False, False, None, False),
        **dict.fromkeys(PAPER_POLICIES, (True, True, True, True, None, False)),
    }
    # vLLM v1's own behaviour: max_cpu_loras = max_loras, loads inside the step, a request
    # without a free adapter slot is passed over; offloaded KV is written through
    vllm_like = {name for name, p in POLICIES.items()
                 if p.host_adapters_as_slots and p.copies_in_step and p.skip_without_adapter_slot}
    assert vllm_like == {"vllm", "vllm-offload"}
    assert {name for name, p in POLICIES.items() if p.write_through} == {
        "vllm-offload", "sglang-hicache"}
    assert set(BASELINES) | set(ABLATIONS) | set(PAPER_POLICIES) | {"fastlibra"} == set(POLICIES)


def test_get_policy_errors_on_unknown_names_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown policy 'lfu'; choose from fastlibra, "
                                         "fastlibra-nodep, fastlibra-lru, vllm, vllm-offload, "
                                         "sglang, sglang-hicache, slora, fastlibra-paper, "):
        get_policy("lfu")
    assert get_policy("sglang") is POLICIES["sglang"]


def test_policy_refuses_a_share_outside_zero_one():
    with pytest.raises(ValueError, match="adapter_share must be in"):
        Policy("x", "", POLICIES["vllm"].rank, dependency_aware=False, reuse_kv=True,
               host_kv=False, swapper=False, adapter_share=0.0)


def test_static_policy_adapters_are_sized_against_the_adapter_share():
    m = make_manager("sglang", device_blocks=20)
    m.register_adapter("fits", adapter_bytes(4))
    with pytest.raises(CacheError, match="device-adapters pool holds 4"):
        m.register_adapter("too-big", adapter_bytes(5))


@pytest.mark.parametrize("in_host", [True, False])
def test_every_policy_starts_from_the_same_adapter_state(in_host):
    """Adapters in host memory before serving (the default), or all on disk: the same for
    every policy, so no baseline alone pays first reads."""
    for name in POLICIES:
        m = CacheManager(make_cfg(device_blocks=20, host_blocks=8, adapters_in_host=in_host),
                         get_policy(name))
        assert m.register_adapter("a", adapter_bytes(2)).tier is (
            Tier.HOST if in_host else Tier.DISK), name
        m.check_invariants()


def test_vllm_host_keeps_max_cpu_loras_adapters():
    """max_cpu_loras defaults to max_loras: vLLM's CPU cache holds as many adapters as its
    device slots (a 20 % share of 20 blocks = 4 blocks = two 2-block adapters)."""
    m = CacheManager(make_cfg(device_blocks=20, host_blocks=8, adapters_in_host=True),
                     get_policy("vllm"))
    tiers = [m.register_adapter(n, adapter_bytes(2)).tier for n in "abc"]
    assert tiers == [Tier.HOST, Tier.HOST, Tier.DISK]
    # using c brings it to a device slot; a and b stay in host
    run(m, "r1", "c", blocks(1))
    assert [m.adapters[n].tier for n in "abc"] == [Tier.HOST, Tier.HOST, Tier.DEVICE]
    run(m, "r2", "a", blocks(1), now=1.0)
    # slots: c a     host: b
    run(m, "r3", "b", blocks(1), now=2.0)
    # b takes the least recent slot (c's); c goes to host, where b's blocks were
    assert [m.adapters[n].tier for n in "abc"] == [Tier.DEVICE, Tier.DEVICE, Tier.HOST]
    m.register_adapter("d", adapter_bytes(2))  # host has room for one more (cap 4 blocks)
    assert m.adapters["d"].tier is Tier.HOST
    run(m, "r5", "d", blocks(1), now=4.0)
    # d takes a's slot (least recent); a goes to host, which is at its cap (c and d):
    # the least recent host adapter, c, goes back to its file
    assert [m.adapters[n].tier for n in "abcd"] == [
        Tier.HOST, Tier.DEVICE, Tier.DISK, Tier.DEVICE]
    assert m.host_pool.used(BlockKind.ADAPTER) <= m.host_adapter_cap == 4
    m.check_invariants()
    # no room on host: the adapter stays on disk until first use
    m = CacheManager(make_cfg(device_blocks=20, host_blocks=1), get_policy("fastlibra"))
    assert m.register_adapter("a", adapter_bytes(2)).tier is Tier.DISK


def _kv_hotter_than_its_adapter_on_host(policy):
    """Device of 8 with room to prefetch 2 blocks; adapter a (2 blocks) and its KV [1]
    (1 block) both on host, the KV ranked far above the adapter."""
    m = make_manager(policy, device_blocks=8, low=2 / 8, adapters={"a": 2})
    run(m, "r0", "a", blocks(1))
    a = m.adapters["a"]
    kv = a.children[blocks(1)]
    m.move(kv, Tier.HOST, now=1.0)
    m.move(a, Tier.HOST, now=1.0)
    for node, freq in ((a, 1.0), (kv, 100.0)):
        node.freq, node.t_last = freq, 1.0
        m.swapper.touch(node)
    m.tick(now=1.0)
    m.check_invariants()
    return a, kv, m


def test_without_the_dependency_rule_prefetch_brings_kv_whose_adapter_is_on_host():
    # the ablation drops the adapter -> KV edge in prefetch as in eviction: the hotter KV
    # comes in first and then holds the room its adapter needed (invalid KV)
    a, kv, m = _kv_hotter_than_its_adapter_on_host("fastlibra-nodep")
    assert (a.tier, kv.tier, m.invalid_kv_blocks) == (Tier.HOST, Tier.DEVICE, 1)
    # fastlibra brings the adapter first; its KV waits for room
    a, kv, m = _kv_hotter_than_its_adapter_on_host("fastlibra")
    assert (a.tier, kv.tier, m.invalid_kv_blocks) == (Tier.DEVICE, Tier.HOST, 0)
