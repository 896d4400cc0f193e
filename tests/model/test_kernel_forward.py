"""The forward pass through the Triton kernels (`FASTLIBRA_KERNELS=triton`; interpreted
on CPU) gives the torch path's logits, and peft's: adapters packed into arena blocks as
the engine packs them (so the LoRA kernels read them in place), several adapters and
base rows in one batch, a prefill chunk after a cached prefix that ends inside a block,
and decodes, in one step."""

from __future__ import annotations

import pytest
import torch
from tinymodels import BS, DEVICE, Blocks, llama_setup, runner, tokens

pytest.importorskip("triton")
from fastlibra.model import KVCache, ModelRunner, SeqInput, load_adapter, load_model  # noqa: E402
from fastlibra.model.kernels.step import KernelStep  # noqa: E402
from fastlibra.model.lora import ArenaLayout, LoraAdapter  # noqa: E402


@pytest.fixture
def llama(tmp_path_factory):
    return llama_setup(tmp_path_factory)


def into_arena(runners: list[ModelRunner], adapters, blocks: Blocks) -> None:
    """Pack each adapter into arena blocks (`ArenaLayout`, as the engine does) and install
    the views in every runner (they share the arena)."""
    r0 = runners[0]
    for name, path in adapters.items():
        ad = load_adapter(path, r0.cfg, max_rank=64, name=name, dtype=r0.w.dtype,
                          device=DEVICE)
        layout = ArenaLayout(ad, r0.kv.block_elems)
        flat = [r0.kv.data[b].view(-1) for b in blocks.take(layout.num_blocks)]
        layout.write(ad, flat)
        for r in runners:
            r.add_adapter(LoraAdapter(name, ad.rank, ad.scaling, ad.target_modules, {},
                                      ad.path, layout.views(flat)))


def kernel_runner(base, adapters, blocks: Blocks, monkeypatch, dtype=torch.float32):
    """A runner on the kernel path whose adapters live in arena blocks."""
    monkeypatch.setenv("FASTLIBRA_KERNELS", "triton")
    r = runner(base, num_blocks=160, dtype=dtype)
    into_arena([r], adapters, blocks)
    assert r.slots is not None and set(r.slots.slot) == set(adapters)
    return r


def test_one_mixed_step_through_the_kernels(llama):
    """Two runners on one arena and one set of weights: the torch one computes the
    prefixes, then both compute the same step (a 5-token chunk after a 6-token prefix,
    with adapter a, beside decodes with b, c and none); the logits agree."""
    base, adapters, _ = llama
    weights = load_model(base, device=DEVICE)
    kv = KVCache(weights.config, 160, BS, torch.float32, DEVICE)
    plain, kern = ModelRunner(weights, kv, kernels=False), ModelRunner(weights, kv, kernels=True)
    blocks = Blocks(160)
    into_arena([plain, kern], adapters, blocks)
    kern._lora.clear()  # its torch loop has nothing to multiply: the kernels must
    prompts = [(tokens(6, 1), "a"), (tokens(9, 2), "b"), (tokens(3, 3), None),
               (tokens(7, 4), "c")]
    tables = [blocks.table(len(t) + 6) for t, _ in prompts]
    plain.forward([SeqInput(t, 0, tab, ad) for (t, ad), tab in
                   zip(prompts, tables, strict=True)])
    step = [SeqInput(tokens(5, 5), 6, tables[0], "a")] + [
        SeqInput([7], len(t), tab, ad) for (t, ad), tab in zip(prompts[1:], tables[1:],
                                                               strict=True)]
    want = plain.forward_all(step)
    got = kern.forward_all(step)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def mixed_steps(r, blocks: Blocks) -> list[torch.Tensor]:
    """Step 1: prefills (one a 6-token prefix). Step 2: that sequence's 7-token chunk
    after its prefix, next to one-token decodes of the others (adapters a, b, c, none)."""
    seqs = [(tokens(6, 1), "a"), (tokens(9, 2), "b"), (tokens(5, 3), None),
            (tokens(7, 4), "c"), (tokens(4, 5), "a")]
    tables = [blocks.table(len(t) + 8) for t, _ in seqs]
    first = r.forward([SeqInput(t, 0, tab, ad) for (t, ad), tab in
                       zip(seqs, tables, strict=True)])
    nxt = first.argmax(-1).tolist()
    chunk = tokens(7, 6)
    step = [SeqInput(chunk, 6, tables[0], "a")] + [
        SeqInput([n], len(t), tab, ad)
        for (t, ad), n, tab in zip(seqs[1:], nxt[1:], tables[1:], strict=True)]
    return [first] + r.forward_all(step)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_kernel_path_matches_torch_path(llama, monkeypatch, dtype, atol):
    base, adapters, ref = llama
    blocks = Blocks(160)
    want = mixed_steps(runner(base, adapters, num_blocks=160, dtype=dtype), Blocks(160))
    r = kernel_runner(base, adapters, blocks, monkeypatch, dtype)
    r._lora.clear()  # the torch loop's products: a step that needed them would fail
    got = mixed_steps(r, blocks)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w.cpu(), atol=atol, rtol=0)
    # and peft: the chunk of sequence 0 sees its 6 cached tokens
    t0 = tokens(6, 1) + tokens(7, 6)
    torch.testing.assert_close(got[1].cpu(), ref.logits(t0, "a")[6:], atol=atol, rtol=0)


def test_kernel_choice_is_checked(monkeypatch):
    from fastlibra.model import kernels

    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTLIBRA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FASTLIBRA_KERNELS='cuda': use 'triton' or 'torch'"):
        kernels.kernels_wanted(cpu)
    monkeypatch.setenv("FASTLIBRA_KERNELS", "triton")
    assert kernels.kernels_wanted(cpu)  # the tests run in the interpreter
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 too"):
        kernels.kernels_wanted(cpu)
    monkeypatch.delenv("FASTLIBRA_KERNELS")
    assert not kernels.kernels_wanted(cpu)  # CPU default: the torch path


def test_long_decodes_split_their_keys(llama):
    """Decodes after 520 and 300 cached tokens: the step slices the keys (`kv_splits`:
    2 slices here) and still gives the torch path's logits."""
    base, _, _ = llama
    weights = load_model(base, device=DEVICE)
    kv = KVCache(weights.config, 240, BS, torch.float32, DEVICE)
    plain, kern = ModelRunner(weights, kv, kernels=False), ModelRunner(weights, kv, kernels=True)
    blocks = Blocks(240)
    prompts = [tokens(520, 8), tokens(300, 9)]
    tables = [blocks.table(len(t) + 1) for t in prompts]
    plain.forward([SeqInput(t, 0, tab) for t, tab in zip(prompts, tables, strict=True)])
    step = [SeqInput([5], len(t), tab) for t, tab in zip(prompts, tables, strict=True)]
    assert KernelStep([1, 1], [521, 301], tables, [], kern.slots, kern.cfg, BS).splits == 2
    torch.testing.assert_close(kern.forward(step), plain.forward(step), atol=1e-4, rtol=0)
