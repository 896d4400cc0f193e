"""The cluster simulator: N production engines behind a router of fastlibra/router.py."""

import json

import pytest
from simfixtures import chat_sessions

from fastlibra.engine.engine import Engine
from fastlibra.engine.request import Request
from fastlibra.sim.cluster import ClusterSetup, simulate_cluster
from fastlibra.sim.profiles import GPUS, MODELS, GiB, SimProfile
from fastlibra.sim.runner import SimRunner
from fastlibra.sim.simulate import SimSetup, build_cache, count_requests

PROFILE = SimProfile(MODELS["llama-2-7b"], GPUS["a100-80g"])
SETUP = SimSetup(PROFILE, device_memory=4 * GiB, host_memory=8 * GiB)
TIMED = ("decision_us_mean", "decision_us_p99")  # wall-clock, not simulated


def two_turns() -> list[Request]:
    """One session of lora-0: 100 prompt tokens, 40 answered, then 60 more after 1 s."""
    first = Request("t0", list(range(100)), 40, arrival=0.0, adapter="lora-0",
                    output=list(range(1000, 1040)), think_s=1.0)
    first.next_turn = Request("t1", list(range(100)) + list(range(1000, 1040))
                              + list(range(2000, 2060)), 8, adapter="lora-0",
                              output=list(range(3000, 3008)))
    return [first]


def test_the_next_turn_finds_its_kv_only_where_the_router_kept_the_session():
    cluster = ClusterSetup(SETUP, num_replicas=2)
    rr = simulate_cluster("round-robin", "fastlibra", two_turns(), cluster)
    fl = simulate_cluster("fastlibra", "fastlibra", two_turns(), cluster)
    assert rr["completed"] == fl["completed"] == 2
    # round robin: turn 2 on the other replica, nothing cached. fastlibra: on the same
    # one, its first 139 computed tokens (prompt + answer but the last) give 8 full blocks
    # of 16 = 128 tokens, of 200 + 100 prompt tokens over both turns.
    assert rr["device_hit_rate"] == 0.0
    assert fl["device_hit_rate"] == 128 / 300
    assert fl["ttft_mean"] < rr["ttft_mean"]


def test_every_turn_is_routed_and_completes_under_every_router():
    reqs = chat_sessions(num_sessions=30, num_adapters=5, rate=4.0, seed=3)
    for router in ("round-robin", "least-loaded", "multiplex", "prefix", "fastlibra"):
        r = simulate_cluster(router, "fastlibra", reqs, ClusterSetup(SETUP, 3))
        assert r["completed"] == count_requests(reqs), router
        assert r["decision_us_mean"] > 0 and 1.0 <= r["load_imbalance"] <= 3.0


def test_same_seed_gives_the_same_result_twice():
    reqs = chat_sessions(num_sessions=20, seed=4)
    a, b = (simulate_cluster("least-loaded", "fastlibra", reqs, ClusterSetup(SETUP, 3), seed=7)
            for _ in range(2))
    assert json.dumps({k: v for k, v in a.items() if k not in TIMED}, sort_keys=True) == \
        json.dumps({k: v for k, v in b.items() if k not in TIMED}, sort_keys=True)


def test_the_replicas_serving_an_adapter_are_counted_per_interval():
    # one short request of lora-0 per second, counted over [0, 5), [5, 10), [10, 15):
    # round robin spreads it over both replicas; fastlibra keeps it on the one that has
    # it (the load never outweighs a copy of the adapter)
    reqs = [Request(f"r{k}", list(range(10 * k, 10 * k + 40)), 4, arrival=float(k),
                    adapter="lora-0", output=[1, 2, 3, 4]) for k in range(12)]
    cluster = ClusterSetup(SETUP, 2, sample_interval_s=5.0, tracked_adapters=1)
    rr = simulate_cluster("round-robin", "fastlibra", reqs, cluster)["replicas_per_adapter"]
    fl = simulate_cluster("fastlibra", "fastlibra", reqs, cluster)["replicas_per_adapter"]
    assert rr == {"t": [5.0, 10.0, 15.0], "lora-0": [2, 2, 2]}
    assert fl == {"t": [5.0, 10.0, 15.0], "lora-0": [1, 1, 1]}


def test_fused_decode_steps_stop_at_an_outside_event():
    """A cluster's next arrival may come to this engine: decode steps fused past it would
    keep that request waiting until the fused run ends."""
    def engine():
        cache = build_cache("fastlibra", SETUP, ["lora-0"])
        e = Engine(SETUP.scheduler, cache, SimRunner(PROFILE, cache.mover))
        e.add_request(Request("r", list(range(50)), 40, adapter="lora-0",
                              output=list(range(40))))
        while not e.scheduler.running or not e.scheduler.running[0].generated:
            e.step()  # the adapter's copy, then the prefill and the first token
        return e
    free, bounded = engine(), engine()
    req_free = free.scheduler.running[0]
    req_bounded = bounded.scheduler.running[0]
    free.step()
    bounded.step(until=bounded.now)
    assert len(req_free.generated) > 2 and len(req_bounded.generated) == 2


@pytest.mark.parametrize("n", [0, -1])
def test_a_cluster_needs_a_replica(n):
    with pytest.raises(ValueError, match=">= 1 replica"):
        ClusterSetup(SETUP, n)
