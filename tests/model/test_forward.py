"""The paged, multi-adapter forward pass against transformers + peft on the same files.

Fixture `llama` (tinymodels.llama_setup): 2 layers, GQA 4/2, llama3 rope; adapters
a (r=8, q/k/v/o), b (r=4, rslora, all projections), c (r=16, MLP of layer 1 only).
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import (
    BS,
    Blocks,
    Reference,
    llama_setup,
    make_adapter,
    make_model,
    runner,
    tokens,
)

from fastlibra.cache import CacheManager
from fastlibra.config import CacheConfig
from fastlibra.model import SeqInput

ATOL = 1e-4


@pytest.fixture
def llama(tmp_path_factory):
    return llama_setup(tmp_path_factory)


def close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=atol, rtol=0)


def test_mixed_adapter_batch_matches_peft(llama):
    base, adapters, ref = llama
    r = runner(base, adapters)
    blocks = Blocks()
    seqs = [(tokens(11, 1), None), (tokens(5, 2), "a"), (tokens(9, 3), "b"),
            (tokens(7, 4), "a"), (tokens(6, 5), "c"), (tokens(3, 6), None)]
    tables = [blocks.table(len(t) + 4) for t, _ in seqs]
    out = r.forward_all([SeqInput(t, 0, tab, ad)
                         for (t, ad), tab in zip(seqs, tables, strict=True)])
    for (t, ad), got in zip(seqs, out, strict=True):
        close(got, ref.logits(t, ad))
    # The last-token entry point agrees, in the caller's order.
    last = r.forward([SeqInput(t, 0, tab, ad) for (t, ad), tab in zip(seqs, tables, strict=True)])
    close(last, torch.stack([o[-1] for o in out]))

    # Three decode steps for the whole batch at once (crossing block boundaries).
    for _ in range(3):
        nxt = [int(o[-1].argmax()) for o in out]
        batch = [SeqInput([n], len(t), tab, ad)
                 for (t, ad), n, tab in zip(seqs, nxt, tables, strict=True)]
        got = r.forward(batch)
        seqs = [(t + [n], ad) for (t, ad), n in zip(seqs, nxt, strict=True)]
        for i, (t, ad) in enumerate(seqs):
            close(got[i], ref.logits(t, ad)[-1])
        out = [g[None] for g in got]


def test_each_adapter_changes_the_output(llama):
    """Guards the comparisons above against adapters that are silently not applied."""
    base, adapters, _ = llama
    r = runner(base, adapters)
    blocks = Blocks()
    t = tokens(9, 7)
    got = r.forward([SeqInput(t, 0, blocks.table(9), ad) for ad in (None, "a", "b", "c")])
    for i in range(1, 4):
        assert (got[i] - got[0]).abs().max() > 1e-2


def test_cached_prefix_gives_full_prefill_logits(llama):
    """A prefix computed earlier (in chunks, not block-aligned) plus only the suffix gives
    the logits of one full prefill, which match peft."""
    base, adapters, ref = llama
    r = runner(base, adapters)
    blocks = Blocks()
    t = tokens(16, 8)
    full = r.forward_all([SeqInput(t, 0, blocks.table(16), "b")])[0]
    table = blocks.table(16)
    r.forward([SeqInput(t[:5], 0, table, "b")])
    r.forward([SeqInput(t[5:10], 5, table, "b")])
    suffix = r.forward_all([SeqInput(t[10:], 10, table, "b")])[0]
    close(suffix, full[10:], atol=1e-5)
    close(suffix, ref.logits(t, "b")[10:])


def test_nan_outside_every_context_never_reaches_a_result(llama):
    """Every slot no sequence wrote holds NaN, block 0 too (a freed block may hold
    anything). Cached-prefix sequences of different lengths in one step read whole
    blocks up to the longest context: a short table's padding and the unwritten tail of
    its last block are masked, but 0 x NaN is NaN, so they must not reach the product."""
    base, adapters, ref = llama
    r = runner(base, adapters)
    r.kv.data.fill_(float("nan"))
    blocks = Blocks()
    blocks.free.remove(0)
    long, short = tokens(13, 9), tokens(6, 10)
    tables = [blocks.table(13), blocks.table(6)]
    r.forward([SeqInput(long[:9], 0, tables[0], "a"), SeqInput(short[:3], 0, tables[1])])
    out = r.forward_all([SeqInput(long[9:], 9, tables[0], "a"),
                         SeqInput(short[3:], 3, tables[1])])
    close(out[0], ref.logits(long, "a")[9:])
    close(out[1], ref.logits(short, None)[3:])


def test_shared_prefix_blocks_serve_several_sequences(llama):
    """One cached prefix (2 full blocks, adapter a) is read by two sequences in one batch,
    each appending its own suffix in its own blocks, next to a base-model sequence."""
    base, adapters, ref = llama
    r = runner(base, adapters)
    blocks = Blocks()
    prefix = tokens(2 * BS, 9)
    shared = blocks.take(2)
    r.forward([SeqInput(prefix, 0, shared, "a")])
    s1, s2 = tokens(5, 10), tokens(3, 11)
    batch = [SeqInput(s1, len(prefix), shared + blocks.take(2), "a"),
             SeqInput(prefix + s2, 0, blocks.table(11), None),
             SeqInput(s2, len(prefix), shared + blocks.take(1), "a")]
    out = r.forward_all(batch)
    close(out[0], ref.logits(prefix + s1, "a")[len(prefix):])
    close(out[1], ref.logits(prefix + s2, None))
    close(out[2], ref.logits(prefix + s2, "a")[len(prefix):])


def greedy(r, prompts: list[tuple[list[int], str | None]], n: int) -> list[list[int]]:
    """Continuous batching in miniature: prefill every prompt, then decode all together."""
    blocks = Blocks()
    tables = [blocks.table(len(p) + n) for p, _ in prompts]
    logits = r.forward([SeqInput(p, 0, tab, ad)
                        for (p, ad), tab in zip(prompts, tables, strict=True)])
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(n):
        nxt = logits.argmax(-1).tolist()
        for o, x in zip(outs, nxt, strict=True):
            o.append(x)
        logits = r.forward([SeqInput([x], len(p) + len(o) - 1, tab, ad)
                            for (p, ad), o, x, tab in zip(prompts, outs, nxt, tables,
                                                           strict=True)])
    return outs


def test_greedy_continuation_matches_generate(llama):
    base, adapters, ref = llama
    prompts = [(tokens(6, 12), None), (tokens(9, 13), "a"), (tokens(4, 14), "b")]
    got = greedy(runner(base, adapters), prompts, 8)
    for (p, ad), g in zip(prompts, got, strict=True):
        assert g == ref.greedy(p, ad, 8)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """Mistral with a sliding window (6) shorter than the test sequences."""
    root = tmp_path_factory.mktemp("mistral")
    base = make_model(root / "base", "mistral", seed=4, sliding_window=6)
    adapters = {"m": make_adapter(base, root / "m", r=8, seed=5,
                                  targets=("q_proj", "v_proj", "down_proj"))}
    return base, adapters, Reference(base, adapters)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2: q/k/v biases, tied embeddings, sharded checkpoint."""
    root = tmp_path_factory.mktemp("qwen2")
    base = make_model(root / "base", "qwen2", seed=6, tie_word_embeddings=True, shard="40KB")
    adapters = {"q": make_adapter(base, root / "q", r=4, alpha=4, seed=7,
                                  targets=("q_proj", "k_proj", "o_proj", "up_proj"))}
    return base, adapters, Reference(base, adapters)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_match(family, request):
    base, adapters, ref = request.getfixturevalue(family)
    (name,) = adapters
    r = runner(base, adapters)
    blocks = Blocks()
    seqs = [(tokens(14, 15), None), (tokens(13, 16), name)]
    tables = [blocks.table(20) for _ in seqs]
    out = r.forward_all([SeqInput(t[:9], 0, tab, ad)
                         for (t, ad), tab in zip(seqs, tables, strict=True)])
    rest = r.forward_all([SeqInput(t[9:], 9, tab, ad)
                          for (t, ad), tab in zip(seqs, tables, strict=True)])
    for (t, ad), a, b in zip(seqs, out, rest, strict=True):
        close(torch.cat([a, b]), ref.logits(t, ad))
    prompts = [(tokens(10, 17), None), (tokens(8, 18), name)]
    for (p, ad), g in zip(prompts, greedy(r, prompts, 8), strict=True):
        assert g == ref.greedy(p, ad, 8)


def test_linear_rope_scaling_matches(tmp_path):
    base = make_model(tmp_path / "base", "llama", seed=8,
                      rope_parameters={"rope_type": "linear", "factor": 4.0,
                                       "rope_theta": 10000.0})
    ref = Reference(base, {})
    t = tokens(20, 19)
    close(runner(base).forward_all([SeqInput(t, 0, Blocks().table(20))])[0],
          ref.logits(t, None))


def test_bfloat16_close_to_transformers_bfloat16(llama):
    base, adapters, _ = llama
    from tinymodels import hf_model

    hf = hf_model(base).to(torch.bfloat16)
    t = tokens(12, 20)
    want = hf(torch.tensor([t])).logits[0].float()
    r = runner(base, dtype=torch.bfloat16)
    table = Blocks().table(13)
    got = r.forward_all([SeqInput(t, 0, table)])[0]
    assert r.kv.data.dtype == torch.bfloat16  # the cache and weights stay bf16 ...
    assert got.dtype == torch.float32  # ... logits come out float32 for sampling
    close(got, want.detach(), atol=0.05)
    # Decoding over the bf16 cache (attention widened to float32 on CPU) stays close too.
    nxt = int(got[-1].argmax())
    step = r.forward([SeqInput([nxt], len(t), table)])[0]
    ref = hf(torch.tensor([t + [nxt]])).logits[0, -1].float()
    close(step, ref.detach(), atol=0.05)


def test_bfloat16_adapters_match_the_float32_reference(llama):
    """A bf16 model's LoRA products (widened to fp32 on CPU, `CPU_LORA_FP32`) land on the
    transformers + peft logits within bf16 precision, and are not the base model's."""
    base, adapters, ref = llama
    t = tokens(12, 21)
    r = runner(base, adapters, dtype=torch.bfloat16)
    got = r.forward_all([SeqInput(t, 0, Blocks().table(12), "a")])[0]
    close(got, ref.logits(t, "a"), atol=0.05)
    assert (got.cpu() - ref.logits(t, None)).abs().max() > 0.1  # the adapter was applied


def test_bad_step_inputs_are_rejected(llama):
    base, adapters, _ = llama
    r = runner(base, adapters, num_blocks=8)
    with pytest.raises(ValueError, match="block table has 1 blocks, 6 positions need 2"):
        r.forward([SeqInput(tokens(6, 1), 0, [3])])
    with pytest.raises(ValueError, match=r"block ids \[9\] outside the arena \(0..7\)"):
        r.forward([SeqInput(tokens(3, 1), 0, [9])])
    with pytest.raises(ValueError, match="adapter 'zz' is not loaded"):
        r.forward([SeqInput(tokens(3, 1), 0, [1], "zz")])
    with pytest.raises(ValueError, match="write the same KV slot"):
        r.forward([SeqInput(tokens(3, 1), 0, [1]), SeqInput(tokens(3, 2), 0, [1])])


def test_cache_manager_hit_reuses_the_kv_in_its_blocks(llama):
    """I4 end to end: the cache manager places a prompt, the runner fills its blocks; a
    follow-up turn hits the cached full blocks and computes only the rest, matching peft.
    The same tokens under another adapter hit nothing."""
    base, adapters, ref = llama
    r = runner(base, adapters, num_blocks=64)
    m = CacheManager(CacheConfig(model=r.cfg.shape(dtype_bytes=4), device_blocks=64,
                                 host_blocks=0, block_size=BS), "fastlibra")
    for name, ad in r.adapters.items():
        m.register_adapter(name, ad.nbytes)
    prompt = tokens(13, 30)
    first = m.allocate("r1", "a", prompt, 0.0)
    assert first.cached_tokens == 0
    r.forward([SeqInput(prompt, 0, first.block_table(), "a")])
    m.free(first, prompt, 1.0)

    follow = prompt + tokens(6, 31)
    second = m.allocate("r2", "a", follow, 2.0)
    assert second.cached_tokens == 12  # the 3 full blocks of the first prompt
    got = r.forward_all([SeqInput(follow[12:], 12, second.block_table(), "a")])[0]
    close(got, ref.logits(follow, "a")[12:])
    other = m.allocate("r3", "b", follow, 3.0)
    assert other.cached_tokens == 0
    assert not set(other.block_table()) & set(second.block_table())
    m.check_invariants()
