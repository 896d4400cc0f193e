"""Continuous batching on the simulated runner: chunked prefill, preemption, copy waits."""

import pytest

from fastlibra.cache import CacheManager, get_policy
from fastlibra.config import ConfigError, SchedulerConfig
from fastlibra.engine.engine import Engine
from fastlibra.engine.request import Request, RequestState
from fastlibra.sim.profiles import GPUS, MODELS, SimProfile
from fastlibra.sim.runner import SimMover, SimRunner
from fastlibra.sim.simulate import SimSetup

PROFILE = SimProfile(MODELS["llama-2-7b"], GPUS["a100-80g"])
BLOCK = 16 * PROFILE.model.kv_bytes_per_token


def make_engine(device_blocks, policy="fastlibra", **sched):
    setup = SimSetup(PROFILE, device_memory=device_blocks * BLOCK, host_memory=128 * BLOCK,
                     scheduler=SchedulerConfig(**sched))
    cache = CacheManager(setup.cache_config(), get_policy(policy), SimMover(PROFILE))
    cache.register_adapter("a", PROFILE.lora.nbytes(PROFILE.model))
    return Engine(setup.scheduler, cache, SimRunner(PROFILE, cache.mover))


def req(rid, n_prompt, n_out, arrival=0.0, adapter=None, base=0):
    return Request(rid, [base + i for i in range(n_prompt)], n_out, arrival=arrival,
                   adapter=adapter, output=[7] * n_out)


def test_a_long_prompt_is_prefilled_in_chunks_within_the_token_budget():
    eng = make_engine(64, max_batched_tokens=256)
    eng.add_request(req("r", 600, 2))
    chunks = []
    while eng.has_work:
        eng._admit_arrivals()
        batch = eng.scheduler.schedule(eng.now)
        chunks.append([(p.num_tokens, p.prefix_len) for p in batch.prefills])
        out = eng.runner.execute(batch, eng.now)
        eng.now += out.duration
        eng._postprocess(batch, out)
    assert chunks[:3] == [[(256, 0)], [(256, 256)], [(88, 512)]]
    assert eng.finished[0].generated == [7, 7]


def test_decodes_are_scheduled_before_new_prefills():
    eng = make_engine(64, max_batched_tokens=64)
    eng.add_request(req("first", 40, 5))
    eng.step()  # prefill "first" -> first token
    eng.add_request(req("second", 200, 1, arrival=eng.now, base=10_000))
    eng._admit_arrivals()
    batch = eng.scheduler.schedule(eng.now)
    assert [r.request_id for r in batch.decodes] == ["first"]
    assert [(p.request.request_id, p.num_tokens) for p in batch.prefills] == [("second", 63)]


def test_when_the_pool_runs_out_the_latest_request_is_preempted_and_recomputed():
    # 8 blocks of 16 tokens: two 40-token prompts fit (3 blocks each), growing to 100
    # tokens each does not: the later one is preempted, requeued first, and finishes.
    eng = make_engine(8, policy="slora")
    eng.add_request(req("a", 40, 60, base=0))
    eng.add_request(req("b", 40, 60, base=1000))
    finished = eng.run()
    by_id = {r.request_id: r for r in finished}
    assert set(by_id) == {"a", "b"}
    assert by_id["b"].num_preemptions >= 1 and by_id["a"].num_preemptions == 0
    assert all(r.generated == [7] * 60 for r in finished)
    assert all(r.state is RequestState.FINISHED for r in finished)
    eng.cache.check_invariants()
    assert eng.cache.device_kv_pool.num_free == eng.cache.device_kv_pool.capacity


def test_a_request_sits_out_while_its_adapter_is_copied_in():
    eng = make_engine(256, policy="sglang")
    eng.add_request(req("r", 32, 1, adapter="a"))
    eng._admit_arrivals()
    batch = eng.scheduler.schedule(0.0)
    # the adapter comes from host (a few ms), longer than copy_join_s: nothing runs yet
    assert not batch
    ready = eng.scheduler.allocs["r"].ready_at
    assert ready > eng.scheduler.cfg.copy_join_s
    eng.run()
    r = eng.finished[0]
    assert r.t_first_token > ready
    assert r.t_adapter_wait == ready


def test_vllm_loads_the_adapter_inside_the_step_and_the_whole_step_waits():
    eng = make_engine(256, policy="vllm")
    eng.add_request(req("r", 32, 1, adapter="a"))
    eng._admit_arrivals()
    batch = eng.scheduler.schedule(0.0)
    ready = eng.scheduler.allocs["r"].ready_at
    assert batch.prefills and ready > eng.scheduler.cfg.copy_join_s  # it runs now...
    out = eng.runner.execute(batch, 0.0)
    assert out.duration >= ready + PROFILE.prefill_time(32, 0) - 1e-9  # ...after the load


def test_a_preempted_request_resumes_with_its_generated_tokens_as_context():
    eng = make_engine(8, policy="fastlibra")
    eng.add_request(req("a", 40, 60, base=0))
    eng.add_request(req("b", 40, 60, base=1000))
    finished = eng.run()
    b = next(r for r in finished if r.request_id == "b")
    assert b.num_preemptions >= 1
    assert len(b.generated) == 60
    eng.cache.check_invariants()


def test_a_host_hit_waits_for_its_whole_copy_before_the_prefill():
    """The real runner copies whole blocks before the step (no per-layer overlap): a
    1,024-token prefix back from host costs its copy, then the prefill of the rest."""
    from fastlibra.cache import Tier

    eng = make_engine(512)
    first = req("first", 1024, 1)
    eng.add_request(first)
    eng.run()
    node = next(iter(eng.cache.base.children.values()))
    eng.cache.move(node, Tier.HOST, eng.now)
    eng.now += 1.0  # the swap-out is long done
    second = req("second", 1024 + 256, 1, arrival=eng.now)
    second.prompt[:1024] = first.prompt  # same prefix, 256 new tokens
    eng.add_request(second)
    eng.run()
    copy = eng.scheduler.cache.cfg.hardware.h2d_time(64 * BLOCK)
    assert second.cached_tokens == 1024
    assert second.ttft >= copy + PROFILE.prefill_time(256, 1024) - 1e-9


def test_a_step_waits_for_pending_swap_outs():
    """Blocks a swap-out frees may be written by the next step, so the real runner waits
    for every pending swap-out first: the simulator charges that wait to the step."""
    from fastlibra.cache import Tier

    eng = make_engine(512)
    first = req("first", 1024, 1)
    eng.add_request(first)
    eng.run()
    node = next(iter(eng.cache.base.children.values()))
    done = eng.cache.move(node, Tier.HOST, eng.now)  # 64 blocks device -> host
    assert done > eng.now
    other = req("other", 64, 1, arrival=eng.now)
    eng.add_request(other)
    eng.run()
    assert other.ttft >= done - other.arrival


def _one_adapter_slot(policy):
    """100 device blocks, a 10 % adapter share: one 8-block slot. Adapters a and b."""
    setup = SimSetup(PROFILE, device_memory=100 * BLOCK, host_memory=128 * BLOCK)
    cache = CacheManager(setup.cache_config(), get_policy(policy, adapter_share=0.1),
                         SimMover(PROFILE))
    for name in "ab":
        cache.register_adapter(name, PROFILE.lora.nbytes(PROFILE.model))
    return Engine(setup.scheduler, cache, SimRunner(PROFILE, cache.mover))


def test_vllm_passes_over_a_request_without_an_adapter_slot_where_sglang_waits():
    admitted = {}
    for policy in ("vllm", "sglang"):
        eng = _one_adapter_slot(policy)
        eng.add_request(req("A", 16, 50, adapter="a"))  # holds the only slot while it runs
        eng._admit_arrivals()
        eng.scheduler.schedule(0.0)
        eng.add_request(req("B", 16, 1, adapter="b"))  # no free slot
        eng.add_request(req("C", 16, 1, adapter="a", base=500))
        eng._admit_arrivals()
        eng.scheduler.schedule(0.0)
        admitted[policy] = [r.request_id for r in eng.scheduler.running]
        assert [r.request_id for r in eng.scheduler.waiting] == (
            ["B"] if policy == "vllm" else ["B", "C"])
        eng.run()
        assert {r.request_id for r in eng.finished} == {"A", "B", "C"}
        eng.cache.check_invariants()
    assert admitted == {"vllm": ["A", "C"], "sglang": ["A"]}


def test_max_loras_skips_a_request_whose_adapter_has_no_slot_and_admits_the_next():
    # max_loras=2: running adapters {a, b}; c waits, the base-model request and the
    # second "a" behind it start (vLLM skips a request without a slot); c starts once
    # the others finish.
    eng = make_engine(256, max_loras=2)
    for name in ("b", "c"):
        eng.cache.register_adapter(name, PROFILE.lora.nbytes(PROFILE.model))
    for i, ad in enumerate(["a", "b", "c", None, "a"]):
        eng.add_request(req(f"r{i}-{ad}", 32, 4, adapter=ad, base=1000 * i))
    eng._admit_arrivals()
    eng.scheduler.schedule(eng.now)
    assert [r.request_id for r in eng.scheduler.running] == [
        "r0-a", "r1-b", "r3-None", "r4-a"]
    assert [r.request_id for r in eng.scheduler.waiting] == ["r2-c"]
    finished = eng.run()
    assert sorted(r.request_id for r in finished) == [
        "r0-a", "r1-b", "r2-c", "r3-None", "r4-a"]
    assert all(len(r.generated) == 4 for r in finished)


def test_max_loras_must_be_positive():
    with pytest.raises(ConfigError, match="max_loras"):
        SchedulerConfig(max_loras=0)
