"""A bad request or a bad adapter fails alone (issue 18), on the LLM API: what goes wrong
inside a step ends only the requests it belongs to, the others finish exactly as
transformers + peft say, and nothing a failure leaves in the arena reaches a result.

Fixture `served` (llmsetup): tiny Llama, adapters a (q/k/v/o) and b (all linear),
block size 4; every request here is greedy for 8 tokens unless it says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

import pytest
import torch
from llmsetup import served_setup
from safetensors.torch import load_file, save_file
from tinymodels import DEVICE, tokens
from transformers import AutoTokenizer

from fastlibra.cache import Tier, UnknownAdapter
from fastlibra.llm import LLM, AsyncLLM, RequestFailed
from fastlibra.model.lora import AdapterLoadError
from fastlibra.model.sampling import SamplingParams

torch.set_num_threads(1)

KIB = 1024
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
NAN = float("nan")


@pytest.fixture
def served(tmp_path_factory):
    return served_setup(tmp_path_factory)


def make_llm(served) -> LLM:
    base, adapters, _ = served
    return LLM(base, adapters, device_memory=256 * KIB, host_memory=256 * KIB, block_size=4,
               dtype="float32", device=DEVICE)


def run(llm: LLM, requests: list[tuple[list[int], str | None, SamplingParams]]):
    """Queue every request at once and step to the end: ({request id: token ids},
    {request id: error}) in request order."""
    rids = [llm.add_request(p, ad, sp) for p, ad, sp in requests]
    errors = {}
    while llm.has_unfinished:
        for d in llm.step():
            if d.error is not None:
                errors[d.request_id] = d.error
    outs = {rid: llm.take_output(rid) for rid in rids}
    assert [outs[r].error for r in rids] == [errors.get(r) for r in rids]
    return ([None if rid in errors else outs[rid].token_ids for rid in rids],
            [errors.get(r) for r in rids])


def with_nan(src, dst, tensor: str):
    """A copy of adapter `src` whose tensor `tensor` holds one NaN."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "adapter_model.safetensors")
    key = next(k for k in weights if tensor in k)
    weights[key][0, 0] = NAN
    save_file(weights, dst / "adapter_model.safetensors")
    return dst


def test_an_adapter_with_nan_weights_is_refused_naming_the_tensor(served, tmp_path):
    _, adapters, _ = served
    bad = with_nan(adapters["b"], tmp_path / "nan", "layers.1.mlp.down_proj.lora_B")
    llm = make_llm(served)
    with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: layers\.1\.mlp\."
                       r"down_proj\.lora_B has 1 non-finite values \(NaN or inf\) in float32"):
        llm.add_adapter("nan", bad)
    assert "nan" not in llm.adapter_names and "nan" not in llm.mover.layouts


def test_a_prompt_the_tokenizer_refuses_is_a_value_error_and_queues_nothing(served):
    """Whatever a tokenizer raises for a text (here a TypeError, as `tokenizers` raises for
    input it cannot take) is that prompt's fault: a ValueError (the server's 400)."""
    base, adapters, _ = served
    real = AutoTokenizer.from_pretrained(base)

    class Picky:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode(self, text, **kw):
            if "w099" in text:
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
            return real.encode(text, **kw)

    llm = LLM(base, adapters, device_memory=256 * KIB, block_size=4, dtype="float32",
              device=DEVICE, tokenizer=Picky())
    with pytest.raises(ValueError, match="the tokenizer could not encode the prompt: "
                                         "TextEncodeInput must be"):
        llm.add_request("w005 w099", None, GREEDY)
    assert not llm.has_unfinished
    (out,) = llm.generate("w005 w006", sampling_params=GREEDY)
    assert len(out.token_ids) == 8


def test_nan_in_freed_blocks_never_reaches_an_output(served):
    """Stale tail slots of a sequence's last block (and the block-0 padding of a short
    block table) are gathered with the longest context of the step: masked, but
    0 x NaN is NaN, so they are zeroed. Every free block holds NaN here (as blocks an
    adapter with NaN weights, or a failed read, would leave behind)."""
    _, _, ref = served
    llm = make_llm(served)
    prefix = tokens(16, 30)
    llm.generate(prefix, sampling_params=GREEDY)  # cached on device: the next prompts hit it
    pool = llm.cache.device_kv_pool
    free = [b for b in range(pool.capacity) if pool.owner(b) is None]
    llm.runner.kv.data[free] = NAN
    prompts = [prefix + tokens(3, 31), tokens(30, 32), prefix + tokens(9, 33)]
    outs = llm.generate(prompts, sampling_params=GREEDY)
    assert [o.cached_tokens for o in outs] == [16, 0, 16]
    assert [o.token_ids for o in outs] == [ref.greedy(p, None, 8) for p in prompts]


def test_non_finite_logits_fail_only_their_request(served):
    """Adapter b's blocks turned to NaN after it was loaded: its greedy and its sampled
    request fail, each with its own error naming b; the base-model and adapter-a
    requests of the same steps (one of them sampled with a seed) are untouched."""
    _, _, ref = served
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=8, ignore_eos=True)
    good = [(tokens(7, 1), None, GREEDY), (tokens(9, 2), "a", GREEDY),
            (tokens(6, 3), None, seeded)]
    alone, _ = run(make_llm(served), good)

    llm = make_llm(served)
    llm.generate(tokens(5, 4), adapter="b", sampling_params=GREEDY)
    node = llm.cache.adapters["b"]
    assert node.tier is Tier.DEVICE
    llm.runner.kv.data[[b + llm.mover.adapter_block_offset for b in node.blocks]] = NAN
    bad = [(tokens(8, 5), "b", GREEDY), (tokens(4, 6), "b", seeded)]
    outs, errors = run(llm, good[:2] + bad + good[2:])
    assert outs[:2] + outs[4:] == alone
    assert alone[:2] == [ref.greedy(p, ad, 8) for p, ad, _ in good[:2]]
    for e in errors[2:4]:
        assert isinstance(e, RequestFailed) and e.adapter == "b"
        assert "adapter 'b' produced non-finite logits" in str(e)
    assert errors[:2] + errors[4:] == [None] * 3
    assert not llm.cache.running
    llm.cache.check_invariants()


def test_a_forward_pass_that_fails_for_one_sequence_fails_only_its_request(served,
                                                                            monkeypatch):
    """The batch's forward pass raises; each sequence is computed alone, and only the
    one that fails alone fails."""
    _, _, ref = served
    llm = make_llm(served)
    forward = llm.runner.forward

    def kernel_fails_on_b(seqs):
        if any(s.adapter == "b" for s in seqs):
            raise RuntimeError("kernel launch failed")
        return forward(seqs)

    monkeypatch.setattr(llm.runner, "forward", kernel_fails_on_b)
    good = [(tokens(7, 1), None, GREEDY), (tokens(9, 2), "a", GREEDY)]
    outs, errors = run(llm, [good[0], (tokens(6, 3), "b", GREEDY), good[1]])
    assert [outs[0], outs[2]] == [ref.greedy(p, ad, 8) for p, ad, _ in good]
    assert isinstance(errors[1], RequestFailed)
    assert str(errors[1]) == "the forward pass failed: kernel launch failed"
    assert errors[0] is None and errors[2] is None
    llm.cache.check_invariants()


def test_an_adapter_whose_directory_is_gone_fails_only_its_requests(served, tmp_path):
    """Its directory is deleted after loading while no tier holds its weights: the read
    fails on the copy thread. Its request fails with that reason, the others finish
    exactly, the adapter is unloaded whole (no views, no books, no readiness entry), a
    base-model request afterwards is exact, and loading it again serves it again."""
    _, adapters, ref = served
    llm = make_llm(served)
    shutil.copytree(adapters["a"], tmp_path / "gone")
    llm.add_adapter("gone", tmp_path / "gone")
    llm.cache.clear()  # every adapter back to its file
    llm.mover.sync_adapters(llm.cache)
    assert llm.cache.adapters["gone"].tier is Tier.DISK
    shutil.rmtree(tmp_path / "gone")

    good = [(tokens(7, 1), None, GREEDY), (tokens(9, 2), "a", GREEDY),
            (tokens(6, 3), "b", GREEDY)]
    outs, errors = run(llm, good[:2] + [(tokens(8, 4), "gone", GREEDY)] + good[2:])
    assert outs[:2] + outs[3:] == [ref.greedy(p, ad, 8) for p, ad, _ in good]
    err = errors[2]
    assert isinstance(err, RequestFailed) and err.adapter == "gone"
    assert "adapter directory not found" in str(err) and "load it again" in str(err)
    assert errors[:2] + errors[3:] == [None] * 3
    assert "gone" not in llm.cache.adapters and "gone" not in llm.runner.adapters
    assert not llm.mover.failed and "gone" not in llm.mover.layouts
    assert all(f.exception() is None for f in llm.mover._block_ready.values())
    llm.cache.check_invariants()
    with pytest.raises(UnknownAdapter):
        llm.add_request(tokens(3, 5), "gone")

    (base,) = llm.generate(tokens(12, 6), sampling_params=GREEDY)
    assert base.token_ids == ref.greedy(tokens(12, 6), None, 8)
    shutil.copytree(adapters["a"], tmp_path / "gone")
    llm.add_adapter("gone", tmp_path / "gone")
    (again,) = llm.generate(tokens(8, 4), adapter="gone", sampling_params=GREEDY)
    assert again.token_ids == ref.greedy(tokens(8, 4), "a", 8)


def test_an_adapter_whose_host_copy_fails_at_load_is_not_left_half_loaded(served,
                                                                          monkeypatch):
    """fastlibra reads a new adapter into host memory at registration; if that read fails
    (its files changed since they were checked), the load fails whole: nothing of it is
    registered, and the same name loads once the files are good."""
    _, adapters, ref = served
    llm = make_llm(served)

    def gone(name, arena, blocks):
        raise AdapterLoadError(f"{adapters['a']}: adapter directory not found")

    monkeypatch.setattr(llm.mover, "_write", gone)
    with pytest.raises(AdapterLoadError, match="adapter directory not found"):
        llm.add_adapter("late", adapters["a"])
    assert "late" not in llm.cache.adapters and "late" not in llm.mover.layouts
    llm.cache.check_invariants()
    monkeypatch.undo()
    llm.add_adapter("late", adapters["a"])
    (out,) = llm.generate(tokens(8, 7), adapter="late", sampling_params=GREEDY)
    assert out.token_ids == ref.greedy(tokens(8, 7), "a", 8)


def test_a_broken_step_fails_every_request_in_flight_and_the_engine_serves_on(
        served, monkeypatch, caplog):
    """What escapes `LLM.step` is the engine's own bookkeeping (here the scheduler): no
    request's state can be trusted, so every stream in flight gets the error, the log
    gets its traceback, and the next request is served."""
    _, _, ref = served
    llm = make_llm(served)
    schedule = llm.engine.scheduler.schedule

    def broken_with_three(now):
        s = llm.engine.scheduler
        if len(s.waiting) + len(s.running) == 3:
            raise RuntimeError("the books do not add up")
        return schedule(now)

    monkeypatch.setattr(llm.engine.scheduler, "schedule", broken_with_three)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    engine = AsyncLLM(llm)

    async def run_all():
        rids = [await engine.add_request(tokens(6, i), None, long) for i in range(3)]
        errors = []
        for rid in rids:
            with pytest.raises(RuntimeError) as e:
                async for _ in engine.stream(rid):
                    pass
            errors.append(str(e.value))
        monkeypatch.undo()
        last = [d async for d in engine.generate_stream(tokens(9, 4), None, GREEDY)]
        return errors, last[-1].output

    try:
        with caplog.at_level(logging.ERROR, logger="fastlibra"):
            errors, after = asyncio.run(run_all())
    finally:
        engine.close()
    assert errors == ["the books do not add up"] * 3
    assert after.token_ids == ref.greedy(tokens(9, 4), None, 8)
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "failing 3 requests in flight" in record.getMessage()
