"""BlockPool: a free list that hands out the lowest ids first and counts blocks per owner."""

import pytest

from fastlibra.cache import BlockKind, BlockPool, PoolExhausted, Tier

A, K, R = BlockKind.ADAPTER, BlockKind.KV_CACHED, BlockKind.KV_RUNNING


def test_allocate_hands_out_lowest_ids_first_and_counts_by_kind():
    p = BlockPool("device", Tier.DEVICE, 8)
    assert p.allocate(2, A) == [0, 1]
    assert p.allocate(3, R) == [2, 3, 4]
    # ids 0 1 2 3 4 5 6 7
    #     A A R R R . . .
    assert p.usage() == {"adapter": 2, "kv_cached": 0, "kv_running": 3, "free": 3}
    assert (p.num_used, p.num_free) == (5, 3)
    assert [p.owner(b) for b in range(6)] == [A, A, R, R, R, None]
    p.check()


def test_freed_blocks_are_reused_lowest_first():
    p = BlockPool("device", Tier.DEVICE, 8)
    p.allocate(6, R)
    p.free([1, 2, 3])
    # ids 0 1 2 3 4 5 6 7
    #     R . . . R R . .   -> the freed ids come back before the never-used 6, 7
    assert p.allocate(2, K) == [1, 2]
    assert p.allocate(2, K) == [3, 6]
    assert p.usage() == {"adapter": 0, "kv_cached": 4, "kv_running": 3, "free": 1}
    p.check()


def test_allocate_zero_blocks_is_empty_and_changes_nothing():
    p = BlockPool("device", Tier.DEVICE, 2)
    assert p.allocate(0, R) == []
    assert p.num_free == 2
    p.check()


def test_retag_moves_blocks_between_kinds_without_changing_ids():
    p = BlockPool("device", Tier.DEVICE, 4)
    blocks = p.allocate(3, R)
    p.retag(blocks[:2], K)
    # ids 0 1 2 3
    #     K K R .
    assert p.usage() == {"adapter": 0, "kv_cached": 2, "kv_running": 1, "free": 1}
    assert [p.owner(b) for b in range(4)] == [K, K, R, None]
    p.check()


def test_retag_of_a_free_block_raises():
    p = BlockPool("device", Tier.DEVICE, 4)
    p.allocate(1, R)
    with pytest.raises(RuntimeError, match="block 1 is free"):
        p.retag([1], K)
    p.check()


def test_exhausted_pool_says_how_many_were_needed_and_free_and_changes_nothing():
    p = BlockPool("host", Tier.HOST, 4)
    p.allocate(3, K)
    with pytest.raises(PoolExhausted, match=r"pool 'host': need 2 blocks, 1 free of 4"):
        p.allocate(2, K)
    assert p.usage() == {"adapter": 0, "kv_cached": 3, "kv_running": 0, "free": 1}
    p.check()


def test_double_free_raises():
    p = BlockPool("device", Tier.DEVICE, 4)
    blocks = p.allocate(2, K)
    p.free(blocks)
    with pytest.raises(RuntimeError, match="block 0 freed twice"):
        p.free([0])


def test_zero_capacity_pool_is_allowed_but_negative_is_not():
    p = BlockPool("host", Tier.HOST, 0)
    assert p.usage() == {"adapter": 0, "kv_cached": 0, "kv_running": 0, "free": 0}
    with pytest.raises(PoolExhausted):
        p.allocate(1, K)
    with pytest.raises(ValueError, match="capacity must be >= 0, got -1"):
        BlockPool("host", Tier.HOST, -1)


def test_check_catches_a_free_block_that_still_has_an_owner():
    p = BlockPool("device", Tier.DEVICE, 4)
    p.allocate(2, K)
    p._free.append(1)  # corrupt: block 1 is both owned and on the free list
    with pytest.raises(AssertionError, match="free block 1 has an owner"):
        p.check()


def test_check_catches_a_block_listed_free_twice():
    p = BlockPool("device", Tier.DEVICE, 4)
    p._free.append(0)
    with pytest.raises(AssertionError, match="duplicate free block"):
        p.check()


def test_check_catches_counts_that_disagree_with_owners():
    p = BlockPool("device", Tier.DEVICE, 4)
    p.allocate(2, K)
    p._used[K] = 1  # corrupt: one cached block no longer counted
    with pytest.raises(AssertionError, match="usage"):
        p.check()


def test_check_catches_a_leaked_block():
    p = BlockPool("device", Tier.DEVICE, 4)
    p._free.pop()  # corrupt: block 0 neither free nor owned
    with pytest.raises(AssertionError, match="leak"):
        p.check()
