"""The LLM API end to end on a tiny model: outputs against transformers + peft, cache
reuse in every form (I4), sampling, the CLI, errors and the asyncio front.

Fixture `served` (llmsetup): tiny Llama (vocab 128, context 256), a word-level tokenizer
("w005 w017" <-> [5, 17], </s> = 2), adapters a and b. Block size 4 tokens:
a block is 4 tokens x 2 layers x K,V x 2 heads x 16 x 4 bytes = 2 KiB.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
import torch
from llmsetup import served_setup, text, word
from tinymodels import DEVICE, make_model, tokens

from fastlibra.cache import CacheError, RequestTooLarge, Tier, UnknownAdapter
from fastlibra.cache.pool import BlockKind
from fastlibra.cache.tree import KVNode
from fastlibra.cli import main
from fastlibra.llm import (
    DEFAULT_MAX_MODEL_LEN,
    LLM,
    AsyncLLM,
    LoRARequest,
    PromptTooLong,
    device_pool_bytes,
)
from fastlibra.model.sampling import SamplingParams, SamplingParamsError

torch.set_num_threads(1)

KIB = 1024
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def served(tmp_path_factory):
    return served_setup(tmp_path_factory)


def poison_kv(llm: LLM) -> None:
    """Overwrite every device block that is not an adapter's (adapters live in the same
    arena: their blocks must survive), once the copies in flight are done: the arena is
    reused after its swap-outs, as the runner orders it."""
    llm.mover.drain()
    pool = llm.cache.device_kv_pool
    kv = [b for b in range(pool.capacity) if pool.owner(b) is not BlockKind.ADAPTER]
    llm.runner.kv.data[kv] = torch.randn_like(llm.runner.kv.data[kv]) * 10


def make_llm(served, device_kib=256, host_kib=256, **kw) -> LLM:
    base, adapters, _ = served
    return LLM(base, adapters, device_memory=device_kib * KIB, host_memory=host_kib * KIB,
               block_size=4, dtype="float32", device=DEVICE, **kw)


def test_mixed_adapters_in_one_call_match_peft_greedy(served):
    _, _, ref = served
    llm = make_llm(served)
    prompts = [tokens(9, 1), tokens(14, 2), tokens(5, 3), tokens(11, 4), tokens(7, 5)]
    adapters = [None, "a", "b", "a", None]
    outs = llm.generate(prompts, adapter=adapters, sampling_params=GREEDY)
    for p, ad, out in zip(prompts, adapters, outs, strict=True):
        assert out.token_ids == ref.greedy(p, ad, 8)
        assert out.finish_reason == "length"
        assert out.text == " " + text(out.token_ids)
    llm.cache.check_invariants()


def device_kv(llm: LLM, adapter: str | None) -> list[KVNode]:
    """Device KV nodes under `adapter`, deepest first (the order leaves can leave in)."""
    nodes = [n for n in llm.cache.nodes() if isinstance(n, KVNode)
             and n.adapter is llm.cache.adapter(adapter) and n.tier is Tier.DEVICE]
    return sorted(nodes, key=lambda n: -n.end)


def test_i4_prefix_kv_computed_hit_swapped_or_recomputed_gives_the_same_output(served):
    """One 12-token prefix (3 blocks) under adapter a, four ways:

        1. computed now            prefix + s1   cached 0
        2. device hit              prefix + s2   cached 12 (the prefix blocks of 1)
        3. swapped to host, back   prefix + s3   every device KV node moved to host, the
                                                 device arena overwritten with noise
        4. dropped, recomputed     prefix + s1   cache cleared: cached 0
    Each continuation equals transformers + peft, so all four agree with each other."""
    _, _, ref = served
    llm = make_llm(served)
    prefix = tokens(12, 60)
    s1, s2, s3 = tokens(3, 61), tokens(5, 62), tokens(2, 63)
    stats = llm.cache.stats

    (first,) = llm.generate(prefix + s1, adapter="a", sampling_params=GREEDY)
    assert first.cached_tokens == 0
    assert first.token_ids == ref.greedy(prefix + s1, "a", 8)

    (hit,) = llm.generate(prefix + s2, adapter="a", sampling_params=GREEDY)
    assert hit.cached_tokens == 12 and stats.device_hit_tokens == 12
    assert hit.token_ids == ref.greedy(prefix + s2, "a", 8)

    for node in device_kv(llm, "a"):
        llm.cache.move(node, Tier.HOST, llm.engine.now)
    assert not device_kv(llm, "a")
    poison_kv(llm)  # only the swap-in can bring the prefix back
    (swapped,) = llm.generate(prefix + s3, adapter="a", sampling_params=GREEDY)
    assert swapped.cached_tokens == 12 and stats.host_hit_tokens == 12
    assert swapped.token_ids == ref.greedy(prefix + s3, "a", 8)

    llm.cache.clear()
    (again,) = llm.generate(prefix + s1, adapter="a", sampling_params=GREEDY)
    assert again.cached_tokens == 0
    assert again.token_ids == first.token_ids
    llm.cache.check_invariants()


def test_small_device_pool_swaps_and_stays_exact(served):
    """40 device blocks (80 KiB) for two adapters (14 + 16 blocks) and the KV of
    two-turn conversations: the swapper moves adapters and KV to host and back while
    every output still equals transformers + peft."""
    _, _, ref = served
    llm = make_llm(served, device_kib=80, host_kib=512)
    sessions = [(tokens(13, 70 + i), ad) for i, ad in enumerate(["a", "b", None, "a", "b"])]
    for turn in range(2):
        for i, (prompt, ad) in enumerate(sessions):
            (out,) = llm.generate(prompt, adapter=ad, sampling_params=GREEDY)
            assert out.token_ids == ref.greedy(prompt, ad, 8), (turn, i)
            sessions[i] = (prompt + out.token_ids + tokens(3, 90 + i), ad)
    st = llm.cache.stats
    assert st.swap_outs > 0 and st.swap_ins > 0 and st.host_hit_tokens > 0
    llm.cache.check_invariants()


def test_sampling_seed_greedy_top_k_stop_and_length(served):
    llm = make_llm(served)
    prompt = text(tokens(10, 80))
    greedy = llm.generate(prompt, sampling_params=SamplingParams(temperature=0, max_tokens=10,
                                                          ignore_eos=True))[0]
    warm = SamplingParams(temperature=1.5, seed=3, max_tokens=10, ignore_eos=True)
    a, b = llm.generate([prompt, prompt], sampling_params=warm)
    c = llm.generate(prompt, sampling_params=warm)[0]
    assert a.token_ids == b.token_ids == c.token_ids
    assert a.token_ids != greedy.token_ids  # the draw is not the argmax path
    other = llm.generate(prompt, sampling_params=SamplingParams(temperature=1.5, seed=4, max_tokens=10,
                                                         ignore_eos=True))[0]
    assert other.token_ids != a.token_ids
    top1 = llm.generate(prompt, sampling_params=SamplingParams(top_k=1, seed=5, max_tokens=10,
                                                        ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids

    stop = word(greedy.token_ids[3])
    cut = llm.generate(prompt, sampling_params=SamplingParams(temperature=0, max_tokens=10,
                                                       ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == greedy.text[:greedy.text.index(stop)]
    assert cut.token_ids == greedy.token_ids[:len(cut.token_ids)]
    assert len(cut.token_ids) <= 4
    short = llm.generate(prompt, sampling_params=SamplingParams(temperature=0, max_tokens=3,
                                                         ignore_eos=True))[0]
    assert (short.token_ids, short.finish_reason) == (greedy.token_ids[:3], "length")
    assert not llm.cache.running  # stopped requests gave their blocks back


def test_cli_generate_json(served, capsys):
    base, adapters, ref = served
    prompt = tokens(8, 85)
    rc = main(["generate", "--model", str(base), "--lora-modules", f"a={adapters['a']}",
               "--lora-modules", f"b={adapters['b']}", "--use-adapter", "b", "--prompt",
               text(prompt), "--max-tokens", "6", "--json", "--device-memory", "256KiB",
               "--host-memory", "256KiB", "--block-size", "4", "--device", "cpu"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    want = ref.greedy(prompt, "b", 6)
    if 2 in want:  # </s> ends the request (the CLI does not ignore EOS)
        want = want[:want.index(2) + 1]
    assert data["token_ids"] == want
    assert data["text"].split() == [word(t) for t in want if t != 2]


def test_unknown_adapter_and_too_long_prompt(served, capsys):
    llm = make_llm(served)
    with pytest.raises(UnknownAdapter, match=r"^unknown adapter 'zz'$"):
        llm.generate([tokens(5, 1), tokens(5, 2)], adapter=[None, "zz"])
    with pytest.raises(PromptTooLong, match=r"300 tokens but the model's context is 256 tokens"):
        llm.generate(tokens(300, 3))
    with pytest.raises(RequestTooLarge, match=r"pool holds"):
        make_llm(served, device_kib=40).generate(tokens(100, 4))  # 20 blocks
    assert not llm.has_unfinished  # nothing was queued by the failed calls
    base, _, _ = served
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(base), "--use-adapter", "zz", "--prompt", "w005",
              "--device-memory", "64KiB", "--device", "cpu"])
    assert e.value.code == 2
    assert "unknown adapter 'zz'" in capsys.readouterr().err


def test_max_model_len_defaults_below_a_long_position_limit(served, tmp_path):
    """A model declaring 16,384 positions serves DEFAULT_MAX_MODEL_LEN (8,192) unless told
    otherwise; a shorter max_model_len is enforced with an error naming it, and a longer
    one than the model's positions is refused."""
    long = make_model(tmp_path / "long", max_position_embeddings=16384)
    assert LLM(long, device_memory=64 * KIB, device=DEVICE).max_model_len == DEFAULT_MAX_MODEL_LEN
    assert LLM(long, device_memory=64 * KIB, device=DEVICE,
               max_model_len=12000).max_model_len == 12000
    llm = make_llm(served, max_model_len=64)
    with pytest.raises(PromptTooLong, match=r"70 tokens but the model's context is 64 tokens "
                                            r"\(max_model_len\)"):
        llm.generate(tokens(70, 3))
    (out,) = llm.generate(tokens(60, 3), sampling_params=replace(GREEDY, max_tokens=10))
    assert len(out.token_ids) == 4 and out.finish_reason == "length"  # 60 + 4 = 64
    with pytest.raises(ValueError, match=r"max_model_len=300 must be an integer in 2..256"):
        make_llm(served, max_model_len=300)


def test_device_pool_is_what_the_utilization_leaves_after_use_and_peak():
    gib = 2**30
    # 80 GiB GPU, 0.9 -> 72 GiB; 17 GiB in use (weights, context); 3 GiB step peak
    assert device_pool_bytes(80 * gib, 63 * gib, 3 * gib, 0.9) == 52 * gib
    assert device_pool_bytes(80 * gib, 10 * gib, 3 * gib, 0.9) < 0  # nothing left: an error


def test_async_stream_and_abort_frees_blocks_at_once(served):
    """Two streams at once; the long one is aborted after its first delta: its blocks go
    back before abort returns, its stream ends with "abort", the other one completes."""
    _, _, ref = served
    llm = make_llm(served)
    engine = AsyncLLM(llm)
    short_prompt, long_prompt = tokens(7, 90), tokens(9, 91)

    async def collect(prompt, adapter, params, rid, abort_after=None):
        deltas = []
        async for d in engine.generate_stream(prompt, adapter, params, request_id=rid):
            deltas.append(d)
            if abort_after is not None and len(deltas) == abort_after:
                assert rid in llm.cache.running
                assert await engine.abort(rid)
                assert rid not in llm.cache.running
                assert rid not in llm.engine.scheduler.allocs
        return deltas

    async def both():
        return await asyncio.gather(
            collect(short_prompt, "a", GREEDY, "short"),
            collect(long_prompt, None, SamplingParams(temperature=0, max_tokens=200,
                                                      ignore_eos=True), "long", 1))

    try:
        short, long = asyncio.run(both())
    finally:
        engine.close()
    ids = [t for d in short for t in d.token_ids]
    assert ids == ref.greedy(short_prompt, "a", 8)
    assert "".join(d.text for d in short) == " " + text(ids)
    assert short[-1].finish_reason == "length"
    assert long[-1].finish_reason == "abort"
    assert len([t for d in long for t in d.token_ids]) < 200  # the engine steps meanwhile
    assert long[-1].output.finish_reason == "abort" and short[-1].output.ttft > 0
    assert not llm.cache.running and not llm.has_unfinished
    llm.cache.check_invariants()



@pytest.mark.parametrize("policy", ["fastlibra", "vllm"])
def test_adapters_live_in_the_device_arena_blocks_the_cache_gave_them(served, policy):
    """The unified pool for real: an adapter on device is views of its arena blocks (in
    the KV pool for fastlibra, in the static adapter region after it for vllm), the
    forward pass reads them in place, and KV never lands in them."""
    _, _, ref = served
    llm = make_llm(served, policy=policy)
    prompt = tokens(9, 70)
    (out,) = llm.generate(prompt, adapter="a", sampling_params=GREEDY)
    assert out.token_ids == ref.greedy(prompt, "a", 8)

    node = llm.cache.adapters["a"]
    assert node.tier is Tier.DEVICE
    arena = llm.runner.kv.data
    offset = llm.mover.adapter_block_offset
    assert offset == (0 if policy == "fastlibra" else llm.cache.device_kv_pool.capacity)
    blocks = {b + offset for b in node.blocks}
    block_ptrs = {arena[b].data_ptr() for b in blocks}
    span = arena[0].nbytes
    for parts in llm.runner.adapters["a"].parts.values():
        for a, bt in parts:
            for t in (a, bt):
                start = t.data_ptr() - (t.data_ptr() - arena.data_ptr()) % span
                assert start in block_ptrs
    kv_blocks = {b for n in llm.cache.nodes() if isinstance(n, KVNode)
                 and n.tier is Tier.DEVICE for b in n.blocks}
    assert kv_blocks  # the prompt's KV is cached on device, beside the adapter
    assert not kv_blocks & blocks

    arena[sorted(blocks)] = 0.0  # zero the adapter's blocks: "a" is now the base model
    (zeroed,) = llm.generate(tokens(9, 71), adapter="a", sampling_params=GREEDY)
    assert zeroed.token_ids == ref.greedy(tokens(9, 71), None, 8)


def test_a_request_waits_only_for_its_own_copies(served):
    """Copies run on the copy thread. A request whose adapter is being read from disk
    (slowly: 0.3 s here, and the estimate says so) sits out the steps until its copy is
    due, while a request that needs no copy decodes to the end meanwhile; then the
    waiting one gets exactly the reference output."""
    _, _, ref = served
    llm = make_llm(served)
    llm.cache.clear()  # every adapter back to its file
    llm.mover.sync_adapters(llm.cache)
    assert llm.cache.adapters["b"].tier is Tier.DISK

    slow = 0.3
    write = llm.mover._write

    def slow_write(name, arena, blocks):
        time.sleep(slow)
        write(name, arena, blocks)

    llm.mover._write = slow_write
    llm.mover.hw = replace(llm.mover.hw, adapter_parse_s=slow)
    prompt = tokens(10, 83)
    waiting = llm.add_request(prompt, "b", GREEDY)
    free = llm.add_request(tokens(5, 82), None, SamplingParams(temperature=0, max_tokens=4,
                                                              ignore_eos=True))
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    t0 = time.perf_counter()
    while llm.has_unfinished:
        for d in llm.step():
            now = time.perf_counter() - t0
            first.setdefault(d.request_id, now)
            if d.finish_reason:
                done[d.request_id] = now
    assert done[free] < first[waiting]  # it did not wait behind the other's copy
    assert first[waiting] >= slow * 0.9
    assert llm.take_output(waiting).token_ids == ref.greedy(prompt, "b", 8)


def test_a_host_hit_whose_copy_is_quick_joins_the_next_step(served):
    """A swap-in of a few KV blocks takes microseconds: the request is prefilled in the
    step that admits it (the runner waits for the copy) instead of sitting out a step."""
    _, _, ref = served
    llm = make_llm(served)
    prefix, suffix = tokens(16, 84), tokens(3, 85)
    llm.generate(prefix, adapter="a", sampling_params=GREEDY)
    for node in device_kv(llm, "a"):
        llm.cache.move(node, Tier.HOST, llm.engine.now)
    llm.mover.drain()
    rid = llm.add_request(prefix + suffix, "a", GREEDY)
    first = llm.step()  # admission, swap-in, prefill and the first token, in one step
    assert [d.request_id for d in first] == [rid] and len(first[0].token_ids) == 1
    while llm.has_unfinished:
        llm.step()
    out = llm.take_output(rid)
    assert out.cached_tokens == 16 and llm.cache.stats.host_hit_tokens >= 16
    assert out.token_ids == ref.greedy(prefix + suffix, "a", 8)


def test_bfloat16_engine_swaps_kv_and_adapters_exactly(served):
    """The engine in bf16 (weights, arenas and adapter blocks all bf16; attention widened
    to fp32 on CPU, fp32 logits): a prefix swapped to host and back, over a device arena
    filled with noise, gives the same greedy output as the same prefix hit on device."""
    base, adapters, _ = served

    def bf16_llm() -> LLM:
        return LLM(base, adapters, device_memory=128 * KIB, host_memory=256 * KIB,
                   block_size=4, dtype="bfloat16", device=DEVICE)

    prefix, s1, s3 = tokens(12, 60), tokens(3, 61), tokens(2, 63)
    hit_llm = bf16_llm()
    assert hit_llm.runner.kv.data.dtype == torch.bfloat16
    hit_llm.generate(prefix + s1, adapter="a", sampling_params=GREEDY)
    (hit,) = hit_llm.generate(prefix + s3, adapter="a", sampling_params=GREEDY)
    assert hit.cached_tokens == 12 and hit_llm.cache.stats.device_hit_tokens == 12

    llm = bf16_llm()
    llm.generate(prefix + s1, adapter="a", sampling_params=GREEDY)
    for node in device_kv(llm, "a"):
        llm.cache.move(node, Tier.HOST, llm.engine.now)
    llm.cache.move(llm.cache.adapter("a"), Tier.HOST, llm.engine.now)
    poison_kv(llm)
    (swapped,) = llm.generate(prefix + s3, adapter="a", sampling_params=GREEDY)
    assert swapped.cached_tokens == 12 and llm.cache.stats.host_hit_tokens == 12
    assert swapped.token_ids == hit.token_ids and len(swapped.token_ids) == 8
    llm.cache.check_invariants()


def test_vllm_python_api_generate_and_chat(served):
    """vLLM's offline example as written: LLM(model, enable_lora=True, ...),
    generate(prompts, SamplingParams, lora_request=LoRARequest(name, id, path)), chat."""
    base, adapters, ref = served
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128,
              dtype="auto", device=DEVICE, block_size=4, device_memory=256 * KIB,
              swap_space=256 * KIB / 2**30)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [text(tokens(6, 1)), text(tokens(9, 2))]
    sql = LoRARequest("sql_adapter", 1, str(adapters["a"]))
    outputs = llm.generate(prompts, params, lora_request=sql)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.prompt == prompt
        assert out.prompt_token_ids == [int(w[1:]) for w in prompt.split()]
        (c,) = out.outputs
        assert c.token_ids == ref.greedy(out.prompt_token_ids, "a", 5)
        assert c.text.split() == text(c.token_ids).split() and c.finish_reason == "length"
    assert llm.adapter_names == ["sql_adapter"]  # loaded by its first request
    again = llm.generate({"prompt_token_ids": tokens(6, 1)}, params, sql)[0]
    assert again.outputs[0].token_ids == outputs[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="lora_int_id 1 is already adapter 'sql_adapter'"):
        llm.generate(prompts[0], params, LoRARequest("other", 1, str(adapters["b"])))

    chat = llm.chat([{"role": "user", "content": "w005 w006"}], params)[0]
    assert chat.prompt_token_ids == [11, 5, 6, 12]  # the tokenizer's chat template
    assert chat.outputs[0].token_ids == ref.greedy([11, 5, 6, 12], None, 5)
    two = llm.chat([[{"role": "user", "content": "w005"}], [{"role": "user", "content": "w007"}]],
                   params, lora_request=sql)
    assert [o.prompt_token_ids for o in two] == [[11, 5, 12], [11, 7, 12]]


def test_vllm_python_api_wrong_types_say_what_was_expected(served):
    llm = make_llm(served)
    with pytest.raises(TypeError, match="sampling_params must be SamplingParams or None, or a "
                       "list of them .*got str 'a'"):
        llm.generate("w005", "a")  # the old positional adapter
    with pytest.raises(TypeError, match="lora_request must be LoRARequest or None.*got str"):
        llm.generate(["w005"], None, "a")
    with pytest.raises(TypeError, match="a prompt must be a str, a list of token ids"):
        llm.generate([3.5])
    with pytest.raises(TypeError, match="lora_int_id must be an int >= 1"):
        LoRARequest("x", 0, "/p")
    with pytest.raises(TypeError, match="messages must be a non-empty list"):
        llm.chat("hello")
    assert not llm.has_unfinished


def test_vllm_engine_arguments(served):
    base, adapters, _ = served
    prompt = tokens(20, 3)
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    same = [make_llm(served, seed=7).generate(prompt, params)[0].token_ids for _ in range(2)]
    other = make_llm(served, seed=8).generate(prompt, params)[0].token_ids
    assert same[0] == same[1] != other  # seed: the RNG of requests without their own
    with pytest.raises(PromptTooLong, match="16 tokens but the model's context is 16"):
        make_llm(served, max_model_len=16).generate(tokens(16, 1))
    llm = make_llm(served, enable_prefix_caching=False)
    assert [llm.generate(prompt, GREEDY)[0].cached_tokens for _ in range(2)] == [0, 0]
    assert make_llm(served).generate([prompt, prompt], GREEDY)[1].cached_tokens == 0
    warm = make_llm(served)
    warm.generate(prompt, GREEDY)
    assert warm.generate(prompt, GREEDY)[0].cached_tokens == 16  # 4 whole blocks
    grown = LLM(base, adapters, device_memory=256 * KIB, block_size=4, dtype="float32",
                device=DEVICE, max_cpu_loras=40)
    largest = max(grown.cache.adapter(n).num_blocks for n in "ab")  # b: all-linear
    assert grown.cache.host_pool.capacity == 40 * largest > 256 * KIB // grown.block_bytes
    # vLLM's meaning: at most max_cpu_loras adapters in host memory (in blocks of the
    # largest); without it both adapters sit in the 128-block host pool
    def host_adapters(llm: LLM) -> list[str]:
        return [n for n in "ab" if llm.cache.adapter(n).tier is Tier.HOST]

    assert host_adapters(make_llm(served)) == ["a", "b"]
    one = make_llm(served, max_cpu_loras=1)
    assert len(host_adapters(one)) == 1
    for ad in "abab":
        one.generate(prompt, GREEDY, adapter=ad)
        assert one.cache.host_pool.used(BlockKind.ADAPTER) <= largest
        one.cache.check_invariants()
    with pytest.raises(CacheError, match="max_cpu_loras=40 adapters need"):
        make_llm(served, max_cpu_loras=40)  # host_memory given and too small
    # max_loras=1: a and b never run together; the base-model request joins a
    capped = make_llm(served, max_loras=1)
    for p, ad in ((tokens(6, 20), "a"), (tokens(6, 21), "b"), (tokens(6, 22), None)):
        capped.add_request(p, ad, GREEDY)
    capped.step()
    assert [r.adapter for r in capped.engine.scheduler.running] == ["a", None]
    while capped.has_unfinished:
        capped.step()
        assert len({r.adapter for r in capped.engine.scheduler.running} - {None}) <= 1
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        make_llm(served, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="enable_lora=False is not supported"):
        make_llm(served, enable_lora=False)


def test_vllm_python_api_logprobs_penalties_and_min_tokens(served):
    _, _, ref = served
    llm = make_llm(served)
    prompt = tokens(7, 60)
    (out,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=2,
                                                 ignore_eos=True), adapter="a")
    (c,) = out.outputs
    assert c.token_ids == ref.greedy(prompt, "a", 4)
    context = list(prompt)
    for t, lps in zip(c.token_ids, c.logprobs, strict=True):
        row = ref.logits(context, "a")[-1].log_softmax(-1)
        best = row.topk(2)
        assert set(lps) == {t, *best.indices.tolist()}
        assert all(abs(lps[i].logprob - float(row[i])) < 1e-4 for i in lps)
        assert lps[int(best.indices[0])].rank == 1
        context.append(t)
    assert c.cumulative_logprob == pytest.approx(sum(c.logprobs[i][t].logprob for i, t in
                                                     enumerate(c.token_ids)))
    # greedy repeats itself; with the strongest penalties no token comes twice
    (plain,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12,
                                                   ignore_eos=True))
    (fresh,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12,
                                                   ignore_eos=True, frequency_penalty=2,
                                                   presence_penalty=2))
    assert len(set(plain.token_ids)) < 12 == len(set(fresh.token_ids))
    eos = SamplingParams(temperature=0, max_tokens=8, logit_bias={2: 50.0}, min_tokens=3)
    assert llm.generate(prompt, eos)[0].token_ids[3:] == [2]
    with pytest.raises(SamplingParamsError, match="logit_bias token id 300 is outside"):
        llm.generate(prompt, SamplingParams(logit_bias={300: 1.0}))
