"""The dependency tree: block-aligned radix edges per adapter, prefix matching per tier,
splits on partial edges, isolation between adapters, and sharing on insert."""

from conftest import blocks, make_manager, run, tree

from fastlibra.cache import Tier
from fastlibra.cache import tree as T
from fastlibra.cache.tree import AdapterNode

BS = 4


def _chain(*edges: tuple[int, ...]) -> tuple[AdapterNode, list[T.KVNode]]:
    """An adapter with one chain of device KV nodes, one per edge; block ids count from 0."""
    a = AdapterNode(parent=None, tier=Tier.DEVICE, name="a")
    parent, pos, nodes, next_block = a, 0, [], 0
    for edge in edges:
        nb = len(edge) // BS
        node = T.attach(parent, a, edge, pos, list(range(next_block, next_block + nb)),
                        Tier.DEVICE, BS)
        nodes.append(node)
        parent, pos, next_block = node, pos + len(edge), next_block + nb
    return a, nodes


# -- tree functions --------------------------------------------------------------------------

def test_walk_matches_whole_nodes_then_whole_blocks_of_a_partial_edge():
    # a ── [1][2] ── [3][4][5]
    a, (n12, n345) = _chain(blocks(1, 2), blocks(3, 4, 5))
    m = T.walk(a, blocks(1, 2, 3, 4, 9), BS, max_blocks=10)
    assert m.nodes == [n12]
    assert (m.partial, m.partial_blocks) == (n345, 2)
    assert m.last is n12


def test_walk_stops_at_a_token_inside_the_first_block_and_at_max_blocks():
    a, (n12, n345) = _chain(blocks(1, 2), blocks(3, 4, 5))
    # [1] then block 2 differs in its last token: only one whole block matches
    m = T.walk(a, blocks(1) + (20, 21, 22, 99), BS, max_blocks=10)
    assert (m.nodes, m.partial, m.partial_blocks) == ([], n12, 1)
    # everything matches but only 3 blocks may be used
    m = T.walk(a, blocks(1, 2, 3, 4, 5), BS, max_blocks=3)
    assert (m.nodes, m.partial, m.partial_blocks) == ([n12], n345, 1)
    m = T.walk(a, blocks(7), BS, max_blocks=10)
    assert (m.nodes, m.partial, m.last) == ([], None, None)


def test_split_gives_the_upper_node_the_first_blocks_and_keeps_pins_and_stats():
    a, (n12, n345) = _chain(blocks(1, 2), blocks(3, 4, 5))
    n345.ref_count, n345.freq, n345.t_last = 2, 3.5, 7.0
    upper = T.split(n345, 1, BS)
    # before: a ── [1][2] ── [3][4][5] (blocks 2 3 4)
    # after:  a ── [1][2] ── [3] (block 2) ── [4][5] (blocks 3 4)
    assert n12.children == {blocks(3): upper}
    assert upper.children == {blocks(4): n345}
    assert (upper.tokens, upper.blocks, upper.prefix_len, upper.end) == (blocks(3), [2], 8, 12)
    assert (n345.tokens, n345.blocks, n345.prefix_len, n345.end) == (blocks(4, 5), [3, 4], 12, 20)
    assert (upper.ref_count, upper.freq, upper.t_last, upper.tier) == (2, 3.5, 7.0, Tier.DEVICE)
    assert n345.parent is upper and upper.parent is n12
    assert upper.children_in(Tier.DEVICE) == 1 and n12.children_in(Tier.DEVICE) == 1


def test_set_tier_and_detach_keep_resident_children_counts():
    a, (n12, n345) = _chain(blocks(1, 2), blocks(3, 4, 5))
    T.set_tier(n345, Tier.HOST)
    assert n12.resident_children == [0, 1, 0]
    n345.blocks = []
    T.detach(n345, BS)
    assert n12.resident_children == [0, 0, 0] and n12.children == {}


def test_subtree_lists_parents_before_children():
    a, (n12, n345) = _chain(blocks(1, 2), blocks(3, 4, 5))
    side = T.attach(n12, a, blocks(6), 8, [9], Tier.DEVICE, BS)
    nodes = T.subtree(a)
    assert set(nodes) == {n12, n345, side}
    assert nodes[0] is n12


# -- prefix matching per tier through the manager --------------------------------------------

def test_match_reports_device_hits_and_never_the_last_prompt_token():
    m = make_manager(adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    # a ── [1][2][3] device
    assert tree(m, "a") == ["[1][2][3] DEVICE [2, 3, 4]"]
    assert m.match("a", blocks(1, 2, 3) + (99,)) == (12, 0, Tier.DEVICE)
    # the same 12 tokens again: the last one must be computed, so block [3] is not a hit
    assert m.match("a", blocks(1, 2, 3)) == (8, 0, Tier.DEVICE)
    assert m.match("a", blocks(1, 5, 6)) == (4, 0, Tier.DEVICE)
    assert m.match("a", blocks(7, 1, 2)) == (0, 0, Tier.DEVICE)
    # a prompt of one block or less never hits
    assert m.match("a", blocks(1)) == (0, 0, Tier.DEVICE)
    m.check_invariants()


def test_match_reports_host_hits_after_a_leaf_was_swapped_out():
    m = make_manager(device_blocks=8, adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3), now=0.0)
    run(m, "r2", "a", blocks(1, 2, 4), now=1.0)
    # a(0 1) ── [1][2] (2 3) ─┬─ [3] (4)   last used at t=0
    #                         └─ [4] (5)   last used at t=1
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "  [3] DEVICE [4]", "  [4] DEVICE [5]"]
    alloc = m.allocate("r3", None, blocks(8, 9) + (1,), now=2.0)  # 3 blocks, 2 free
    m.check_invariants()
    # the colder leaf [3] went to host block 0 and its device block 4 went to r3
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "  [3] HOST [0]", "  [4] DEVICE [5]"]
    assert alloc.blocks == [4, 6, 7]
    assert m.match("a", blocks(1, 2, 3) + (99,)) == (8, 4, Tier.DEVICE)
    assert m.match("a", blocks(1, 2, 4) + (99,)) == (12, 0, Tier.DEVICE)
    assert m.match("a", blocks(9, 9) + (99,)) == (0, 0, Tier.DEVICE)


def test_match_reports_the_adapter_tier_and_misses_for_an_unloaded_adapter():
    m = make_manager(adapters={"a": 2, "b": 2})
    assert m.match("a", blocks(1, 2)) == (0, 0, Tier.DISK)
    run(m, "r1", "a", blocks(1, 2))
    assert m.match("a", blocks(1, 2) + (5,)) == (8, 0, Tier.DEVICE)
    assert m.match("b", blocks(1, 2) + (5,)) == (0, 0, Tier.DISK)
    assert m.match(None, blocks(1, 2) + (5,)) == (0, 0, Tier.DEVICE)  # base model


# -- edges, splits, isolation and sharing ----------------------------------------------------

def test_only_whole_blocks_are_cached():
    m = make_manager(adapters={"a": 2})
    alloc = m.allocate("r1", "a", blocks(1, 2, 3) + (40, 41), now=0.0)  # 14 tokens
    assert alloc.blocks == [2, 3, 4, 5]
    m.free(alloc, now=0.0)
    m.check_invariants()
    # a ── [1][2][3]  (the half-filled block 5 is freed)
    assert tree(m, "a") == ["[1][2][3] DEVICE [2, 3, 4]"]
    assert m.device_kv_pool.usage() == {"adapter": 2, "kv_cached": 3, "kv_running": 0,
                                        "free": 11}


def test_a_prompt_that_diverges_inside_an_edge_splits_it_at_the_block_boundary():
    m = make_manager(adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    alloc = m.allocate("r2", "a", blocks(1, 2, 7), now=1.0)
    m.check_invariants()
    # a ── [1][2] (2 3) pinned by r2 ── [3] (4)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3] pin=1", "  [3] DEVICE [4]"]
    assert (alloc.cached_tokens, alloc.device_hit_tokens) == (8, 8)
    assert alloc.block_table() == [2, 3, 5]
    m.free(alloc, now=1.0)
    m.check_invariants()
    # a ── [1][2] ─┬─ [3] (4)
    #              └─ [7] (5)
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "  [3] DEVICE [4]", "  [7] DEVICE [5]"]


def test_same_tokens_under_two_adapters_share_zero_blocks():
    m = make_manager(adapters={"a": 2, "b": 2})
    prompt = blocks(1, 2, 3)
    ra = run(m, "ra", "a", prompt)
    rb = m.allocate("rb", "b", prompt + (99,), now=1.0)
    assert (rb.device_hit_tokens, rb.host_hit_tokens) == (0, 0)
    assert set(ra.block_table()).isdisjoint(rb.block_table())
    m.free(rb, now=1.0)
    rn = run(m, "rn", None, prompt, now=2.0)  # the base model is a third identity
    # a(0 1) ── [1][2][3] (2 3 4)
    # b(5 6) ── [1][2][3] (7 8 9)
    # <base> ── [1][2][3] (10 11 12)
    assert tree(m, "a") == ["[1][2][3] DEVICE [2, 3, 4]"]
    assert tree(m, "b") == ["[1][2][3] DEVICE [7, 8, 9]"]
    assert tree(m, None) == ["[1][2][3] DEVICE [10, 11, 12]"]
    assert rn.device_hit_tokens == 0
    m.check_invariants()


def test_an_identical_request_reuses_the_cached_blocks():
    m = make_manager(adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3))
    alloc = m.allocate("r2", "a", blocks(1, 2, 3) + (99,), now=1.0)
    # a ── [1][2][3] (2 3 4) pinned; r2 owns block 5 for its last token
    assert (alloc.device_hit_tokens, alloc.host_hit_tokens) == (12, 0)
    assert alloc.block_table() == [2, 3, 4, 5]
    assert m.stats.device_hit_tokens == 12
    m.free(alloc, now=1.0)
    m.check_invariants()


def test_free_of_a_concurrent_duplicate_shares_the_first_copy_and_frees_its_own():
    m = make_manager(adapters={"a": 2})
    r1 = m.allocate("r1", "a", blocks(1, 2, 3), now=0.0)
    r2 = m.allocate("r2", "a", blocks(1, 2, 3), now=0.0)  # nothing cached yet: no hit
    assert (r1.blocks, r2.blocks) == ([2, 3, 4], [5, 6, 7])
    m.free(r1, now=1.0)
    m.free(r2, now=1.0)
    m.check_invariants()
    # a ── [1][2][3] (2 3 4); r2's copies 5 6 7 are free again
    assert tree(m, "a") == ["[1][2][3] DEVICE [2, 3, 4]"]
    assert m.device_kv_pool.usage() == {"adapter": 2, "kv_cached": 3, "kv_running": 0,
                                        "free": 11}


def test_free_shares_the_common_prefix_and_attaches_only_the_new_tail():
    m = make_manager(adapters={"a": 2})
    r1 = m.allocate("r1", "a", blocks(1, 2, 3), now=0.0)
    r2 = m.allocate("r2", "a", blocks(1, 2, 4, 5), now=0.0)
    m.free(r1, now=1.0)
    m.free(r2, now=1.0)
    m.check_invariants()
    # a ── [1][2] (2 3) ─┬─ [3] (4)
    #                    └─ [4][5] (7 8)   r2's copies of [1][2] (5 6) are freed
    assert tree(m, "a") == ["[1][2] DEVICE [2, 3]", "  [3] DEVICE [4]", "  [4][5] DEVICE [7, 8]"]
    assert m.device_kv_pool.num_free == 16 - 2 - 5
