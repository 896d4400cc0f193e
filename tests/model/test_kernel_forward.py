"""The forward pass through the Triton kernels (`FASTLIBRA_KERNELS=triton`; interpreted
on CPU) gives the torch path's logits, and peft's: adapters packed into arena blocks as
the engine packs them (so the LoRA kernels read them in place), several adapters and
base rows in one batch, a prefill chunk after a cached prefix that ends inside a block,
and decodes, in one step."""

from __future__ import annotations

import pytest
import torch
from tinymodels import DEVICE, Blocks, llama_setup, runner, tokens

pytest.importorskip("triton")
from fastlibra.model import SeqInput, load_adapter  # noqa: E402
from fastlibra.model.lora import ArenaLayout, LoraAdapter  # noqa: E402


@pytest.fixture
def llama(tmp_path_factory):
    return llama_setup(tmp_path_factory)


def kernel_runner(base, adapters, blocks: Blocks, monkeypatch, dtype=torch.float32):
    """A runner on the kernel path whose adapters live in arena blocks (`ArenaLayout`),
    and the runner's `slots` (the LoRA kernels' tables)."""
    monkeypatch.setenv("FASTLIBRA_KERNELS", "triton")
    r = runner(base, num_blocks=160, dtype=dtype)
    for name, path in adapters.items():
        ad = load_adapter(path, r.cfg, max_rank=64, name=name, dtype=dtype, device=DEVICE)
        layout = ArenaLayout(ad, r.kv.block_elems)
        flat = [r.kv.data[b].view(-1) for b in blocks.take(layout.num_blocks)]
        layout.write(ad, flat)
        r.add_adapter(LoraAdapter(name, ad.rank, ad.scaling, ad.target_modules, {}, ad.path,
                                  layout.views(flat)))
    assert r.slots is not None and set(r.slots.slot) == set(adapters)
    return r


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


@pytest.mark.slow
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
