"""The whole engine under random workloads: scheduler + cache + swapper + preemption, on
the simulated runner, for every policy. After every step every invariant of the cache
holds (I1-I3, and queued demand equal to a recount from the queue), and at the end every
request finished or was refused and every running block came back."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlibra.cache import POLICIES, BlockKind, CacheManager, get_policy
from fastlibra.config import SchedulerConfig
from fastlibra.engine.engine import Engine
from fastlibra.engine.request import Request
from fastlibra.sim.profiles import GPUS, MODELS, SimProfile
from fastlibra.sim.runner import SimMover, SimRunner
from fastlibra.sim.simulate import SimSetup

PROFILE = SimProfile(MODELS["llama-2-7b"], GPUS["a100-80g"])
BLOCK = 16 * PROFILE.model.kv_bytes_per_token  # an adapter is 8 blocks
ADAPTERS = ("a", "b", "c")
PREFIXES = [[1000 * p + i for i in range(48)] for p in range(3)]


def _engine(policy: str, device_blocks: int, host_blocks: int, steps: list[int]) -> Engine:
    setup = SimSetup(PROFILE, device_memory=device_blocks * BLOCK,
                     host_memory=host_blocks * BLOCK,
                     scheduler=SchedulerConfig(max_num_seqs=8, max_batched_tokens=128))
    share = 0.25 if get_policy(policy).adapter_share is not None else None
    cache = CacheManager(setup.cache_config(), get_policy(policy, share), SimMover(PROFILE))
    for name in ADAPTERS:
        cache.register_adapter(name, PROFILE.lora.nbytes(PROFILE.model))

    def check(engine: Engine) -> None:
        engine.cache.check_invariants()
        steps.append(1)

    return Engine(setup.scheduler, cache, SimRunner(PROFILE, cache.mover), observer=check)


def _requests(rng: random.Random, n: int) -> list[Request]:
    """Requests sharing prefixes per adapter (so KV is reused, split and evicted), with
    follow-up turns (so sessions come back), prompts from 1 to ~150 tokens."""
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(20.0)
        adapter = rng.choice((None, *ADAPTERS))
        prompt = rng.choice(PREFIXES)[:rng.randint(0, 48)] + [
            rng.randrange(30_000) for _ in range(rng.randint(1, 100))]
        first = Request(f"r{i}", prompt, rng.randint(1, 24), arrival=t, adapter=adapter)
        if rng.random() < 0.3:
            first.next_turn = Request(f"r{i}.1", prompt + [7] * 5, rng.randint(1, 8),
                                      arrival=t, adapter=adapter)
            first.think_s = rng.random()
        out.append(first)
    return out


def _run(policy: str, seed: int, n: int, device_blocks: int, host_blocks: int) -> int:
    steps: list[int] = []
    engine = _engine(policy, device_blocks, host_blocks, steps)
    reqs = _requests(random.Random(seed), n)
    for r in reqs:
        engine.add_request(r)
    finished = engine.run()
    total = sum(1 + (r.next_turn is not None) for r in reqs)
    assert len(finished) + len(engine.scheduler.rejected) == total
    cache = engine.cache
    assert not cache.running and not engine.scheduler.waiting
    assert all(p.used(BlockKind.KV_RUNNING) == 0 for p in cache.pools)
    cache.clear()
    cache.check_invariants()
    assert all(p.num_free == p.capacity for p in cache.pools)  # nothing leaked (I3)
    return len(steps)


@pytest.mark.parametrize("policy", list(POLICIES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40),
       device_blocks=st.integers(40, 120), host_blocks=st.integers(0, 80))
def test_random_workloads_keep_every_invariant_after_every_step(policy, seed, n, device_blocks,
                                                                 host_blocks):
    _run(policy, seed, n, device_blocks, host_blocks)


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_survives_a_hundred_thousand_random_operations(policy):
    """Outside the default suite (`pytest -m slow`): steps + requests >= 10^5 per policy."""
    ops, seed = 0, 0
    while ops < 100_000:
        rng = random.Random(seed)
        n = 400
        ops += _run(policy, seed, n, rng.randint(40, 200), rng.randint(0, 200)) + n
        seed += 1
