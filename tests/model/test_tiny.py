"""`build_tiny_model` writes files the real libraries read: peft loads the adapters, our
engine's greedy output equals transformers + peft's, and the tokenizer round-trips text
and renders its chat template.

    model: 2 layers, hidden 64, 4 query / 2 KV heads, vocab 128, context 256, fp32
    adapters: lora-0 r=4, lora-1 r=8, lora-2 r=4 (q/k/v/o, lora_alpha = 2r)
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import Reference, quiet, tokens
from transformers import AutoTokenizer

from fastlibra.llm import LLM
from fastlibra.model import load_adapter, load_config
from fastlibra.model.sampling import SamplingParams
from fastlibra.model.tiny import build_tiny_model

torch.set_num_threads(1)

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base, adapters = build_tiny_model(tmp_path_factory.mktemp("tiny"), num_adapters=3,
                                      ranks=(4, 8), seed=5, **SHAPE)
    return base, adapters, Reference(base, adapters)


def test_adapters_load_in_peft_and_in_our_loader(tiny):
    base, adapters, ref = tiny
    assert list(adapters) == ["lora-0", "lora-1", "lora-2"]
    with quiet():
        ranks = {name: ref.peft.peft_config[name].r for name in adapters}
    assert ranks == {"lora-0": 4, "lora-1": 8, "lora-2": 4}
    cfg = load_config(base)
    ours = load_adapter(adapters["lora-1"], cfg, max_rank=8, device="cpu")
    assert (ours.rank, ours.scaling) == (8, 2.0)
    assert ours.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert len(ours.weights) == 2 * 4
    assert ours.weights[(1, "k_proj")].a.shape == (8, 64)
    assert ours.weights[(1, "k_proj")].b.shape == (32, 8)
    assert all(w.a.abs().min() > 0 and w.b.abs().min() > 0 for w in ours.weights.values())


def test_llm_greedy_equals_transformers_plus_peft(tiny):
    base, adapters, ref = tiny
    llm = LLM(base, adapters, device_memory=256 << 10, host_memory=256 << 10, block_size=4,
              dtype="float32", device="cpu")
    prompt = tokens(13, 7)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([prompt] * 3, adapter=[None, "lora-0", "lora-1"], sampling_params=greedy)
    expected = [ref.greedy(prompt, a, 8) for a in (None, "lora-0", "lora-1")]
    assert [o.token_ids for o in outs] == expected
    # The adapters are not no-ops: their logits move away from the base model's.
    plain = ref.logits(prompt, None)
    for name in adapters:
        assert (ref.logits(prompt, name) - plain).abs().max() > 1e-3, name


def test_tokenizer_round_trips_and_renders_the_chat_template(tiny):
    base, _, _ = tiny
    tok = AutoTokenizer.from_pretrained(base)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("w7 w42 w127") == [7, 42, 127]
    assert tok.decode([7, 42, 127]) == "w7 w42 w127"
    messages = [{"role": "system", "content": "w10"}, {"role": "user", "content": "w7 w42"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s> <system> w10 <user> w7 w42 <assistant>"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == [1, 3, 10, 4, 7, 42, 5]
    assert tok.decode(ids) == text
