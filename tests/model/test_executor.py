"""The engine on the real model: ModelExecutor (the Runner) and ArenaMover (the Mover),
wired by hand (no LLM API), against transformers + peft on the same files.

Fixture `served` (llmsetup): tiny Llama, vocab 128; adapters a (r=8, q/k/v/o) and b
(r=4, all projections). Block size 4 tokens.
"""

from __future__ import annotations

import pytest
import torch
from llmsetup import served_setup
from tinymodels import BS, tokens

from fastlibra.cache import CacheManager, MoveKind, Tier
from fastlibra.cache.pool import BlockKind
from fastlibra.cache.tree import KVNode
from fastlibra.config import CacheConfig, SchedulerConfig
from fastlibra.engine.engine import Engine
from fastlibra.engine.request import Request
from fastlibra.model import KVCache, ModelRunner, load_model
from fastlibra.model.executor import ArenaMover, ModelExecutor


@pytest.fixture
def served(tmp_path_factory):
    return served_setup(tmp_path_factory)


def build(base, adapters, device_blocks=64, host_blocks=64, max_batched_tokens=64,
          policy="fastlibra", async_copies=True):
    """(engine, cache, mover, runner) on CPU, fp32; adapters registered at their real size."""
    w = load_model(base, device="cpu")
    runner = ModelRunner(w, KVCache(w.config, device_blocks, BS, torch.float32, "cpu"))
    mover = ArenaMover(runner, host_blocks, max_rank=64, async_copies=async_copies)
    sizes = {name: mover.read_adapter(name, path) for name, path in adapters.items()}
    cache = CacheManager(CacheConfig(model=w.config.shape(dtype_bytes=4),
                                     device_blocks=device_blocks, host_blocks=host_blocks,
                                     block_size=BS), policy, mover=mover)
    if cache.device_adapter_pool is not cache.device_kv_pool:
        mover.adapter_block_offset = cache.device_kv_pool.capacity
    for name, size in sizes.items():
        cache.register_adapter(name, size)
    mover.sync_adapters(cache)  # fastlibra starts adapters in host memory: read them
    holder: dict[str, Engine] = {}
    executor = ModelExecutor(runner, lambda rid: holder["e"].scheduler.allocs[rid],
                             wait_for=mover.wait_for)
    engine = Engine(SchedulerConfig(max_batched_tokens=max_batched_tokens), cache, executor)
    holder["e"] = engine
    return engine, cache, mover, runner


def test_engine_on_the_model_matches_peft_greedy_with_chunked_prefill(served):
    """Five requests (base, a, b) through continuous batching with a 7-token step budget:
    prompts are prefilled in chunks next to other requests' decodes; adapters arrive by
    `swap_in` moves from host memory. Every greedy continuation equals transformers + peft `generate`."""
    base, adapters, ref = served
    engine, cache, mover, runner = build(base, adapters, max_batched_tokens=7)
    reqs = [Request(f"r{i}", tokens(n, 40 + i), 6, adapter=ad)
            for i, (n, ad) in enumerate([(9, None), (13, "a"), (5, "b"), (11, "a"), (6, None)])]
    for r in reqs:
        engine.add_request(r)
    engine.run()
    for r in reqs:
        assert r.generated == ref.greedy(r.prompt, r.adapter, 6), r.request_id
    assert mover.bytes[MoveKind.SWAP_IN] == sum(cache.adapters[n].nbytes for n in ("a", "b"))
    assert mover.bytes[MoveKind.LOAD] == 0 and not mover.on_host
    assert set(runner.adapters) == {"a", "b"}
    cache.check_invariants()


def kv_nodes(cache: CacheManager, adapter: str | None) -> list[KVNode]:
    return [n for n in cache.nodes() if isinstance(n, KVNode) and n.adapter is cache.adapter(adapter)]


def test_kv_swap_out_and_in_copy_exactly_the_node_blocks(served):
    """A finished request's KV node goes to host and back: the bytes follow its blocks.
    Device blocks are poisoned after the swap-out, so only the copy can bring them back."""
    base, adapters, _ = served
    engine, cache, mover, runner = build(base, adapters)
    engine.add_request(Request("r0", tokens(13, 50), 1, adapter="a"))
    engine.run()
    (node,) = kv_nodes(cache, "a")  # 3 full blocks of the 13-token prompt
    assert node.num_blocks == 3 and node.tier is Tier.DEVICE
    kv = runner.kv.data
    before = kv[node.blocks].clone()

    cache.move(node, Tier.HOST, engine.now)
    assert node.tier is Tier.HOST
    mover.drain()
    torch.testing.assert_close(mover.host[node.blocks], before, atol=0, rtol=0)
    others = [b for b in range(kv.shape[0]) if cache.device_kv_pool.owner(b) is not
              BlockKind.ADAPTER]
    kv[others] = torch.randn_like(kv[others])  # no KV block on device may be trusted now

    cache.move(node, Tier.DEVICE, engine.now)
    mover.drain()
    torch.testing.assert_close(kv[node.blocks], before, atol=0, rtol=0)
    nbytes = 3 * cache.cfg.block_bytes
    assert mover.bytes[MoveKind.SWAP_OUT] == nbytes
    on_device = [a for a in cache.adapters.values() if a.tier is Tier.DEVICE]  # a, and
    assert cache.adapters["a"] in on_device  # b if the idle swapper prefetched it
    assert mover.bytes[MoveKind.SWAP_IN] == nbytes + sum(a.nbytes for a in on_device)
    cache.check_invariants()


def test_adapter_moves_follow_the_cache(served):
    """swap_out takes the adapter out of the model runner into the host store, swap_in
    puts it back; a drop (no move) is reconciled by `sync_adapters`."""
    base, adapters, _ = served
    engine, cache, mover, runner = build(base, adapters)
    engine.add_request(Request("r0", tokens(6, 51), 1, adapter="b"))
    engine.run()
    node = cache.adapters["b"]
    want = [(a.clone(), bt.clone()) for a, bt in runner.adapters["b"].parts[(0, "q_proj")]]
    cache.clear()  # drops the KV under b (and b itself: no running request pins it)
    assert node.tier is Tier.DISK and "b" in runner.adapters
    mover.sync_adapters(cache)
    assert "b" not in runner.adapters

    engine.add_request(Request("r1", tokens(6, 52), 1, adapter="b"))
    engine.run()  # loads b from its directory again
    cache.clear()
    mover.sync_adapters(cache)
    engine.add_request(Request("r2", tokens(6, 53), 1, adapter="b"))
    engine.run()
    for child in list(node.children.values()):
        cache.drop(child)
    cache.move(node, Tier.HOST, engine.now)
    assert "b" not in runner.adapters and mover.on_host["b"] == node.blocks
    cache.move(node, Tier.DEVICE, engine.now)
    assert "b" not in mover.on_host
    mover.drain()
    got = runner.adapters["b"].parts[(0, "q_proj")]
    for (a, bt), (wa, wbt) in zip(got, want, strict=True):
        torch.testing.assert_close(a, wa, atol=0, rtol=0)
        torch.testing.assert_close(bt, wbt, atol=0, rtol=0)
    kinds = [k for k in MoveKind if mover.bytes[k]]
    assert kinds == [MoveKind.SWAP_OUT, MoveKind.SWAP_IN, MoveKind.LOAD]
    cache.check_invariants()


@pytest.mark.parametrize("async_copies", [True, False])
def test_estimate_uses_the_measured_bandwidth(served, async_copies):
    base, adapters, _ = served
    engine, cache, mover, _ = build(base, adapters, async_copies=async_copies)
    mover.bandwidth[MoveKind.SWAP_IN] = 1e9
    assert mover.estimate(MoveKind.SWAP_IN, 2_000_000, 5.0) == pytest.approx(5.002)
    engine.add_request(Request("r0", tokens(9, 54), 1))
    engine.run()
    (node,) = kv_nodes(cache, None)
    cache.move(node, Tier.HOST, engine.now)
    mover.drain()
    assert mover.bandwidth[MoveKind.SWAP_OUT] != cache.cfg.hardware.d2h_bandwidth
    mover.bandwidth[MoveKind.SWAP_IN] = 1e6
    done = cache.move(node, Tier.DEVICE, 7.0)
    guess = cache.cfg.hardware.disk_load_time(10**6)
    assert mover.estimate(MoveKind.LOAD, 10**6, 0.0) == guess  # nothing read from disk yet
    cache.clear()
    mover.sync_adapters(cache)
    engine.add_request(Request("r1", tokens(9, 55), 1, adapter="a"))
    engine.run()  # reads a from its directory
    mover.drain()
    assert mover.load_s_per_byte is not None
    assert mover.estimate(MoveKind.LOAD, 10**6, 0.0) == pytest.approx(mover.load_s_per_byte * 1e6)
    # Synchronous: ready when asked for. On the copy thread: when the estimate says.
    want = 7.0 + node.num_blocks * cache.cfg.block_bytes / 1e6 if async_copies else 7.0
    assert done == pytest.approx(want)
