"""The paper's Eval (`fastlibra-paper`): each of its four terms changes a decision.

Every case draws two or three eviction candidates, lets the swapper re-score at time T,
then admits a request that needs room for exactly what one victim frees (two for the
adapter case). Worked numbers use RECENCY_SCALE_S = 10 s: 1 - sigmoid(t / 10) is 0.500
at t = 0, 0.475 at 1 s, 0.450 at 2 s, 0.109 at 21 s. Transfer is in blocks (every block
costs the same PCIe copy, adapters here fill whole blocks).
"""

import pytest
from conftest import blocks, label, make_manager, run

from fastlibra.cache import POLICIES, MoveKind, Tier, get_policy
from fastlibra.cache.paper_eval import RECENCY_SCALE_S, PaperSwapper, low_lora
from fastlibra.cache.policies import PAPER_POLICIES
from fastlibra.cache.tree import AdapterNode


def _swapped_out(recorder) -> list[str]:
    return [mv.node.name if isinstance(mv.node, AdapterNode) else label(mv.node.tokens)
            for mv in recorder.take_log() if mv.kind is MoveKind.SWAP_OUT]


def _evict_at(m, recorder, now: float, nblocks: int) -> list[str]:
    """Re-score at `now`, then admit a base-model request of `nblocks` fresh blocks."""
    m.tick(now)
    recorder.take_log()
    alloc = m.allocate("new", None, blocks(*range(11, 11 + nblocks)), now)
    assert alloc is not None
    m.check_invariants()
    return _swapped_out(recorder)


@pytest.mark.parametrize(("policy", "victim"), [("fastlibra-paper", "[5]"),
                                                ("fastlibra-paper-no-transfer", "[1][2][3][4]")])
def test_transfer_term_keeps_the_node_that_costs_more_to_copy_back(recorder, policy, victim):
    # device (8): X = [1][2][3][4] used at t=0, Y = [5] used at t=1; 3 free
    # at T=2:  X = 4 blocks x 0.450 = 1.80    Y = 1 block x 0.475 = 0.475  -> Y goes
    #          without transfer: X 0.450 < Y 0.475                          -> X goes
    m = make_manager(policy, device_blocks=8, host_blocks=8, mover=recorder)
    run(m, "x", None, blocks(1, 2, 3, 4), now=0.0)
    run(m, "y", None, blocks(5), now=1.0)
    assert _evict_at(m, recorder, 2.0, 4) == [victim]


@pytest.mark.parametrize(("policy", "victim"), [("fastlibra-paper", "[5][6]"),
                                                ("fastlibra-paper-no-visit", "[1][2]")])
def test_visit_term_keeps_the_node_used_more_often(recorder, policy, victim):
    # device (8): X = [1][2] made and reused twice at t=0 (3 visits), Y = [5][6] at t=1
    # at T=2:  X = 3 x 0.450 = 1.35    Y = 1 x 0.475    -> Y goes
    #          without visits: X 0.450 < Y 0.475        -> X goes
    m = make_manager(policy, device_blocks=8, host_blocks=8, mover=recorder)
    run(m, "x", None, blocks(1, 2), now=0.0)
    run(m, "x2", None, blocks(1, 2) + (99,), now=0.0)
    run(m, "x3", None, blocks(1, 2) + (98,), now=0.0)
    run(m, "y", None, blocks(5, 6), now=1.0)
    assert m.adapter(None).children[blocks(1)].visits == 3
    assert _evict_at(m, recorder, 2.0, 6) == [victim]


@pytest.mark.parametrize(("policy", "victim"), [("fastlibra-paper", "[1][2]"),
                                                ("fastlibra-paper-no-recency", "[5][6]")])
def test_recency_term_lets_an_idle_node_go_despite_more_visits(recorder, policy, victim):
    # device (8): X = [1][2] made and reused at t=0 (2 visits), Y = [5][6] made at t=20
    # at T=21: X = 2 x 0.109 = 0.218   Y = 1 x 0.475    -> X goes
    #          without recency: X 2 > Y 1               -> Y goes
    # (with times scaled by 1e-13, as a public fork does, the first line would read like
    # the second: this is the case that catches it)
    assert RECENCY_SCALE_S == 10.0
    m = make_manager(policy, device_blocks=8, host_blocks=8, mover=recorder)
    run(m, "x", None, blocks(1, 2), now=0.0)
    run(m, "x2", None, blocks(1, 2) + (99,), now=0.0)
    run(m, "y", None, blocks(5, 6), now=20.0)
    assert _evict_at(m, recorder, 21.0, 6) == [victim]


@pytest.mark.parametrize(("policy", "victims"), [("fastlibra-paper", ["a", "[1][2][3]"]),
                                                 ("fastlibra-paper-no-lora", ["a", "b"])])
def test_lora_term_keeps_adapters_while_fewer_than_low_lora_are_resident(recorder, policy,
                                                                         victims):
    # t=0: ra (adapter a, 1 block), rb (adapter b, 2 blocks), r0 (base, [1][2][3]) run
    #      together: BS = 3, p_a = p_b = 1/2, Low_lora = 2 (1 - 1/2^3) = 1.75
    # device (8) after they finish: a, b, [1][2][3] (base model's KV); 2 free
    # a request needs 5: victims in increasing Eval (all idle 0 s, 1 visit each):
    #   a (1 block) first; then 1 adapter is left on device, fewer than 1.75, so
    #   b = 2 blocks x 1.75 = 3.5 > [1][2][3] = 3 blocks  -> the KV goes, b stays
    #   without the LoRA term b (2) < [1][2][3] (3)        -> b goes
    m = make_manager(policy, device_blocks=8, host_blocks=8, mover=recorder,
                     adapters={"a": 1, "b": 2})
    allocs = [m.allocate("ra", "a", (1, 2, 3), 0.0), m.allocate("rb", "b", (5, 6, 7), 0.0),
              m.allocate("r0", None, blocks(1, 2, 3), 0.0)]
    m.tick(0.0)
    assert m.swapper.low_lora == pytest.approx(1.75)
    for alloc in allocs:
        m.free(alloc, now=0.01)
    recorder.take_log()
    alloc = m.allocate("new", None, blocks(*range(11, 16)), 0.02)
    assert alloc is not None
    m.check_invariants()
    assert _swapped_out(recorder) == victims
    assert m.adapters["b"].tier is (Tier.DEVICE if victims[1] != "b" else Tier.HOST)


def test_low_lora_is_the_expected_number_of_distinct_adapters_in_a_batch():
    assert low_lora([0.5, 0.5], 3) == pytest.approx(1.75)
    assert low_lora([1.0], 8) == 1.0
    assert low_lora([0.25] * 4, 0) == 0.0


def test_scores_hold_between_rescorings_at_most_every_100_ms(recorder):
    # the recency case, but the swapper last re-scored at T=20.95: both nodes are scored
    # as of 20.95, when Y (made at 20) was 0.95 s idle and X 20.95 s:
    #   X = 2 x 0.110 = 0.220, Y = 1 x 0.476 -> X goes, as at 21 s;
    # a request at 21.0 (50 ms later) does not re-score: the keys are those of 20.95
    m = make_manager("fastlibra-paper", device_blocks=8, host_blocks=8, mover=recorder)
    run(m, "x", None, blocks(1, 2), now=0.0)
    run(m, "x2", None, blocks(1, 2) + (99,), now=0.0)
    run(m, "y", None, blocks(5, 6), now=20.0)
    m.tick(20.95)
    recorder.take_log()
    m.allocate("new", None, blocks(*range(11, 17)), 21.0)
    assert m.swapper.scored_at == 20.95
    assert _swapped_out(recorder) == ["[1][2]"]
    m.tick(21.05)
    assert m.swapper.scored_at == 21.05


def test_paper_policies_are_registered_with_the_fastlibra_cache_rules():
    assert PAPER_POLICIES == ("fastlibra-paper", "fastlibra-paper-no-lora",
                              "fastlibra-paper-no-transfer", "fastlibra-paper-no-visit",
                              "fastlibra-paper-no-recency")
    fastlibra = get_policy("fastlibra")
    for name in PAPER_POLICIES:
        p = POLICIES[name]
        assert p.swapper_class is PaperSwapper
        assert (p.dependency_aware, p.reuse_kv, p.host_kv, p.swapper, p.adapter_share) == (
            fastlibra.dependency_aware, fastlibra.reuse_kv, fastlibra.host_kv,
            fastlibra.swapper, fastlibra.adapter_share)
    off = {name: [t for t, on in vars(POLICIES[name].eval_terms).items() if not on]
           for name in PAPER_POLICIES}
    assert off == {"fastlibra-paper": [], "fastlibra-paper-no-lora": ["lora"],
                   "fastlibra-paper-no-transfer": ["transfer"],
                   "fastlibra-paper-no-visit": ["visit"],
                   "fastlibra-paper-no-recency": ["recency"]}
