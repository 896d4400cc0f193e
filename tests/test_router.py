"""Routers on hand-drawn clusters: which replica each request goes to, and why.

Costs are round numbers so every estimate can be checked by hand:

    prefill         0.01 s per token (no base, no attention term)
    queue wait      queued prefill seconds + 0.01 s per request in flight
    adapter miss    device 0 | host 100 B / 1000 B/s = 0.1 s | disk or absent 100 B / 100 B/s = 1 s
    KV copy in      a block is 10 B: 0.01 s per host block
    blocks          4 tokens; `blocks(1, 2)` is [1][2] as in tests/conftest.py
"""

import os
import subprocess
import sys

import pytest
from conftest import blocks, make_manager, run

from fastlibra.cache import Residency, Tier
from fastlibra.cache.tree import chain_hashes, chain_root
from fastlibra.config import ConfigError, HardwareProfile
from fastlibra.router import (
    ROUTERS,
    FastLibra,
    LeastLoaded,
    Multiplex,
    PrefixAware,
    RoundRobin,
    RouteCosts,
    RouteRequest,
    make_router,
)

HW = HardwareProfile(h2d_bandwidth=1000, d2h_bandwidth=1000, disk_bandwidth=100,
                     adapter_parse_s=0, prefill_base=0, prefill_per_token=0.01,
                     prefill_per_token_pair=0)
COSTS = RouteCosts(HW, block_size=4, block_bytes=10, adapter_bytes=100)


def req(rid: str, adapter: str | None, prompt) -> RouteRequest:
    return RouteRequest(rid, adapter, prompt, 4)


def prefixes(adapter: str, prompt) -> set[int]:
    return set(chain_hashes(chain_root(adapter), tuple(prompt), 4))


def publish(router, i, adapters=None, device=(), host=()):
    router.publish(i, Residency(dict(adapters or {}), set(device), set(host)))


# -- the fastlibra estimate --------------------------------------------------------------


def test_the_adapter_tier_decides_between_replicas_with_nothing_cached():
    r = FastLibra(3, COSTS)
    for i, tier in enumerate([Tier.DISK, Tier.HOST, Tier.DEVICE]):
        publish(r, i, {"a": tier})
    q = req("q", "a", blocks(5, 6) + (1,))  # 9 tokens, nothing cached: 0.09 s of prefill
    assert [round(e, 6) for e in r.estimates(q)] == [1.09, 0.19, 0.09]
    assert r.route(q) == 2
    assert r.estimates(req("x", None, (1,)))[0] == pytest.approx(0.01)  # base: no adapter cost


def test_a_prefix_counts_only_under_its_own_adapter_and_host_blocks_pay_their_copy():
    prompt = blocks(1, 2) + (5,)  # 2 blocks can hit, the last token is always computed
    r = FastLibra(3, COSTS)
    # replica 0: [1][2] of "b" on device     -> nothing for "a": 0.09
    # replica 1: [1][2] of "a" on host       -> 2 blocks copied (0.02) + 1 token (0.01)
    # replica 2: [1] of "a" on device        -> 5 tokens after it: 0.05
    publish(r, 0, {"a": Tier.DEVICE, "b": Tier.DEVICE}, device=prefixes("b", prompt))
    publish(r, 1, {"a": Tier.DEVICE}, host=prefixes("a", prompt))
    publish(r, 2, {"a": Tier.DEVICE}, device=prefixes("a", blocks(1)))
    q = req("q", "a", prompt)
    assert [r.views[i].cached_blocks(q) for i in range(3)] == [(0, 0), (0, 2), (1, 0)]
    assert [round(e, 6) for e in r.estimates(q)] == [0.09, 0.03, 0.05]
    assert r.route(q) == 1


def test_a_hot_adapter_spreads_when_its_replica_queues_and_shrinks_back_when_it_cools():
    r = FastLibra(3, COSTS)
    publish(r, 0, {"a": Tier.DEVICE})
    publish(r, 1, {"a": Tier.HOST})
    publish(r, 2, {"a": Tier.HOST})
    reqs = [req(f"r{k}", "a", blocks(10 + k, 20 + k) + (1,)) for k in range(4)]  # 0.09 s each
    # r0: 0.09 on 0 vs 0.19.  r1: 0 now queues 0.09 + 0.01 -> 0.19, a tie with the host
    # replicas; the less loaded wins: 1 (its copy of "a" is now noted on device).
    # r2: 0 and 1 both 0.19, replica 2 0.19: tie on estimate and load -> lowest index of
    # the unloaded: 2.  r3: every replica at 0.19 with one request: 0.
    assert [r.route(q) for q in reqs] == [0, 1, 2, 0]
    for q in reqs:
        r.finish(q.request_id)
    # It cooled: replicas 1 and 2 evicted it to host again; new requests go back to 0.
    publish(r, 1, {"a": Tier.HOST})
    publish(r, 2, {"a": Tier.HOST})
    assert [r.route(req(f"s{k}", "a", blocks(30 + k, 40 + k) + (1,))) for k in range(2)] == [0, 1]
    assert r.views[0].queued_prefill_s == pytest.approx(0.09)


def test_a_session_stays_with_its_kv_until_the_queue_there_outweighs_recomputing_it():
    history = blocks(*range(1, 9)) + (7,)  # 33 tokens: 8 blocks cached on replica 0
    r = FastLibra(2, COSTS)
    publish(r, 0, {"a": Tier.DEVICE}, device=prefixes("a", history))
    publish(r, 1, {"a": Tier.DEVICE})
    # on 0: 1 token (0.01); on 1: 33 tokens (0.33). Queue on 0 of 0.3 s: still 0.31 < 0.33
    r.views[0].queued_prefill_s = 0.3
    assert r.choose(req("t1", "a", history), r.all_replicas) == 0
    r.views[0].queued_prefill_s = 0.33  # 0.34 > 0.33: load says move
    assert r.choose(req("t2", "a", history), r.all_replicas) == 1


def test_running_conversations_make_a_replica_slower_by_the_kv_each_step_reads():
    costs = RouteCosts(HW, block_size=4, block_bytes=10, adapter_bytes=100, kv_read_s=0.001)
    r = FastLibra(2, costs)
    for i in range(2):
        publish(r, i, {"a": Tier.DEVICE})
    r.route(req("long", "a", tuple(range(200))))   # replica 0: 200 tokens in flight
    r.first_token("long")
    r.route(req("short", "a", tuple(range(500, 510))))  # replica 1: 10 tokens in flight
    r.first_token("short")
    # both run one request (0.01 s); their contexts cost 0.2 s and 0.01 s per step
    q = req("q", "a", blocks(7) + (1,))
    assert [round(e, 6) for e in r.estimates(q)] == [0.26, 0.07]
    assert r.route(q) == 1
    r.finish("long")
    assert r.views[0].context_tokens == 0 and r.estimates(q)[0] == pytest.approx(0.05)


def test_a_publication_keeps_the_prompts_of_requests_still_running_there():
    r = FastLibra(2, COSTS)
    turn1 = blocks(1, 2, 3) + (4,)
    assert r.route(req("t1", "a", turn1)) == 0
    publish(r, 0, {"a": Tier.HOST})  # taken while t1 runs: its KV is not cached yet
    turn2 = req("t2", "a", turn1 + (5, 6, 7, 8, 9))
    assert r.views[0].cached_blocks(turn2) == (3, 0)
    assert r.views[0].adapters == {"a": Tier.DEVICE}
    r.finish("t1")
    publish(r, 0, {"a": Tier.HOST})  # t1 ended and the replica dropped its KV
    assert r.views[0].cached_blocks(turn2) == (0, 0)


def test_the_router_amends_its_view_as_it_routes_and_publication_replaces_it():
    r = FastLibra(2, COSTS)
    prompt = blocks(1, 2) + (3,)
    q = req("q", "a", prompt)
    assert r.route(q) == 0  # all equal: 1 s + 0.09 s; lowest index
    v = r.views[0]
    assert v.adapters == {"a": Tier.DEVICE} and v.inflight == 1
    assert v.queued_prefill_s == pytest.approx(0.09)
    assert v.cached_blocks(req("q2", "a", prompt + (4, 5))) == (2, 0)
    r.first_token("q")
    assert (v.queued_prefill_s, v.inflight) == (0.0, 1)
    r.finish("q")
    assert (v.queued_prefill_s, v.inflight) == (0.0, 0)
    publish(r, 0, {"a": Tier.HOST})  # the replica evicted all of it meanwhile
    assert r.views[0].cached_blocks(req("q3", "a", prompt)) == (0, 0)
    r.finish("q")  # a second end (Ray reports every call's end) changes nothing
    assert (r.views[0].queued_prefill_s, r.views[0].inflight) == (0.0, 0)


def test_a_request_routed_twice_is_refused():
    r = FastLibra(1, COSTS)
    r.route(req("q", "a", (1, 2)))
    with pytest.raises(ValueError, match="'q' is already routed"):
        r.route(req("q", "a", (1, 2)))


def test_the_published_view_agrees_with_the_cache_it_came_from():
    m = make_manager(device_blocks=16, host_blocks=8, adapters={"a": 2})
    run(m, "r1", "a", blocks(1, 2, 3), now=0.0)
    assert m.residency().device_prefixes == prefixes("a", blocks(1, 2, 3))  # kept ...
    run(m, "r2", "a", blocks(1, 2, 4, 5), now=1.0)  # ... and sliced by this split of [1][2][3]
    m.move(m.adapters["a"].children[blocks(1)].children[blocks(4)], Tier.HOST, now=2.0)
    r = FastLibra(1, RouteCosts.of(m.cfg, 100))
    r.publish(0, m.residency())
    for prompt in (blocks(1, 2, 3, 9), blocks(1, 2, 4, 5, 9), blocks(1, 9), blocks(7)):
        dev, host = r.views[0].cached_blocks(req("q", "a", prompt))
        device_tokens, host_tokens, _ = m.match("a", prompt)
        assert (dev * 4, host * 4) == (device_tokens, host_tokens), prompt
    assert r.views[0].adapters == {"a": Tier.DEVICE}


def test_prefix_hashes_are_the_same_in_another_process():
    """Replicas and the router run in different processes with different hash seeds."""
    code = ("from fastlibra.cache.tree import chain_hashes, chain_root;"
            "print(chain_hashes(chain_root('sql'), tuple(range(8)), 4))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == str(chain_hashes(chain_root("sql"), tuple(range(8)), 4))
    assert chain_root("sql") != chain_root("chat") and chain_root("") != chain_root("sql")


# -- the baselines -----------------------------------------------------------------------


def test_round_robin_cycles():
    r = RoundRobin(3, COSTS)
    assert [r.route(req(f"q{k}", "a", (1,))) for k in range(5)] == [0, 1, 2, 0, 1]


def test_least_loaded_takes_the_less_loaded_of_two():
    r = LeastLoaded(2, COSTS)
    r.views[0].inflight = 3
    assert [r.choose(req(f"q{k}", "a", (1,)), r.all_replicas) for k in range(4)] == [1, 1, 1, 1]


def test_multiplex_prefers_holders_then_the_replica_with_fewest_models_and_keeps_an_lru():
    r = Multiplex(3, COSTS, max_models=2, max_ongoing=2)
    r.models[0].update(dict.fromkeys(["a", "b"]))
    r.models[1].update(dict.fromkeys(["c"]))
    r.models[2].update(dict.fromkeys(["c", "d"]))
    assert r.route(req("q1", "a", (1,))) == 0       # the only holder of a
    assert r.route(req("q2", "e", (1,))) == 1       # nobody holds e: fewest models (1)
    assert list(r.models[1]) == ["c", "e"]
    assert r.route(req("q3", "a", (1,))) == 0       # a is now the most recent on 0
    assert list(r.models[0]) == ["b", "a"]
    # 0 is full (2 in flight); 1 and 2 hold 2 models each: the less loaded, 2, whose LRU
    # set drops c
    assert r.route(req("q4", "f", (1,))) == 2
    assert list(r.models[2]) == ["d", "f"]
    r.finish("q1")
    assert r.route(req("q5", "b", (1,))) == 0


def test_prefix_is_adapter_blind_and_balances_when_the_load_is_skewed():
    r = PrefixAware(3, COSTS, cache_threshold=0.5, balance_abs=2, balance_rel=1.5)
    prompt = blocks(1, 2, 3, 4)
    r.trees[1].update(chain_hashes(0, prompt, 4))
    r.trees[2].update(chain_hashes(0, blocks(1, 9, 9, 9, 9), 4))
    # 4 of 4 blocks match on 1, under any adapter (what it cached was for "b")
    assert r.choose(req("q1", "a", prompt), r.all_replicas) == 1
    # 1 of 4 on 2 (0.25 <= 0.5): the smallest tree, replica 0
    assert r.choose(req("q2", "a", blocks(1, 7, 7, 7)), r.all_replicas) == 0
    r.views[1].inflight, r.views[0].inflight = 4, 1  # 4 - 0 > 2 and 4 > 1.5 x 0: imbalanced
    assert r.choose(req("q3", "a", prompt), r.all_replicas) == 2


def test_unknown_router_and_bad_costs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown router 'ray'; choose from round-robin"):
        make_router("ray", 2, COSTS)
    with pytest.raises(ConfigError, match="RouteCosts.block_bytes must be >= 1"):
        RouteCosts(HW, 4, 0, 100)
    with pytest.raises(ConfigError, match=">= 1 replica"):
        make_router("fastlibra", 0, COSTS)


def test_an_empty_prompt_is_routed_without_cache_lookups():
    r = FastLibra(2, COSTS)
    assert req("e", "a", ()).usable_blocks == 0
    assert r.route(req("e", "a", ())) in (0, 1)


def test_routers_choose_only_among_the_live_candidates_and_grow_with_new_replicas():
    for name in ROUTERS:
        r = make_router(name, 3, COSTS)
        assert all(r.route(req(f"{name}{k}", "a", blocks(k, 1)), [0, 2]) in (0, 2)
                   for k in range(6)), name
        assert r.add_replica() == 3 and len(r.views) == 4
        assert r.route(req(f"{name}-new", "a", blocks(9, 9)), [3]) == 3
