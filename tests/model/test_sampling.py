"""Sampling parameters, the batch sampler, streaming detokenisation and stop handling,
without a model."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastlibra.model.sampling import (
    IncrementalDetokenizer,
    OutputTracker,
    Sampler,
    SamplingParams,
    SamplingParamsError,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"seed": 1.5}, "seed"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"repetition_penalty": 0},
                                                         "repetition_penalty"),
    ({"min_tokens": 17}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
])
def test_bad_params_name_the_field(kw, field):
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**kw)


def test_the_seed_range_is_what_a_generator_takes():
    s = Sampler()
    edges = [SamplingParams(seed=0, temperature=1.0), SamplingParams(seed=2**64 - 1,
                                                                     temperature=1.0)]
    assert all(isinstance(t, int) for t in s.sample(LOGITS, edges, ["lo", "hi"]))


def test_stop_string_and_lists_become_tuples():
    p = SamplingParams(stop="END", stop_token_ids=[5, 6])
    assert p.stop == ("END",) and p.stop_token_ids == (5, 6)


LOGITS = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0],
                       [2.0, 2.0, 0.5, 0.0, 1.9]])


def test_greedy_top_k_1_and_tiny_top_p_are_the_argmax():
    """Row 1 has a tie between tokens 0 and 1: every greedy form picks the first."""
    s = Sampler()
    # The last two came from fuzzing the server: 1e-300 overflowed the division by the
    # temperature to nan, and a top_p that is 0 in float32 dropped every token.
    for p in (SamplingParams(temperature=0), SamplingParams(top_k=1, seed=1),
              SamplingParams(top_p=1e-6, seed=2, temperature=5.0),
              SamplingParams(temperature=1e-300, seed=3),
              SamplingParams(top_p=1e-300, seed=4)):
        assert s.sample(LOGITS, [p, p], ["x", "y"]) == [1, 0]


def test_top_k_and_top_p_restrict_the_support():
    s = Sampler()
    logits = LOGITS[:1].repeat(400, 1)
    keys = [str(i) for i in range(400)]
    top2 = s.sample(logits, [SamplingParams(top_k=2, seed=i) for i in range(400)], keys)
    assert set(top2) == {1, 2}
    # softmax of row 0: 1 -> 0.47, 2 -> 0.43, 4 -> 0.06: top_p 0.8 keeps tokens 1 and 2
    nucleus = s.sample(logits, [SamplingParams(top_p=0.8, seed=1000 + i) for i in range(400)],
                       keys)
    assert set(nucleus) == {1, 2}
    everything = s.sample(logits, [SamplingParams(seed=2000 + i, temperature=3.0)
                                   for i in range(400)], keys)
    assert set(everything) == {0, 1, 2, 3, 4}


def test_seeded_requests_reproduce_whatever_the_batch():
    """Same seed -> same tokens, alone or next to other requests; its own generator."""
    torch.manual_seed(0)
    steps = [torch.randn(3, 50) for _ in range(6)]
    p = SamplingParams(temperature=1.0, seed=7)

    def run(sampler: Sampler, rows: list[int], params) -> list[list[int]]:
        return [sampler.sample(s[rows], params, [f"r{i}" for i in rows]) for s in steps]

    alone = [out[0] for out in run(Sampler(), [1], [p])]
    batched = [out[1] for out in run(Sampler(), [0, 1, 2],
                                     [SamplingParams(seed=1), p, SamplingParams()])]
    assert alone == batched
    assert alone != [out[0] for out in run(Sampler(), [1], [SamplingParams(seed=8)])]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with few merges: multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["héllo wörld 你好 hello world"] * 10, trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_incremental_detokenizer_emits_only_whole_characters():
    tok = byte_level_tokenizer()
    prompt = tok.encode("hello ")
    target = "你好 wörld héllo 🙂 ok"
    ids = tok.encode(target)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # pieces of characters exist
    d = IncrementalDetokenizer(tok, prompt)
    deltas = [d.push(i) for i in ids]
    assert "".join(deltas) + d.flush() == target
    assert not any("\ufffd" in x for x in deltas)
    assert "" in deltas  # some tokens had to wait for the rest of their character


def test_detokenizer_window_stays_short_on_long_outputs():
    tok = byte_level_tokenizer()
    d = IncrementalDetokenizer(tok)
    ids = tok.encode("hello world " * 40)
    assert "".join(d.push(i) for i in ids) == "hello world " * 40
    assert len(d.ids) <= 4 * IncrementalDetokenizer.CONTEXT + 2


class Words:
    """decode([3, 4]) = "w3 w4"; id 2 is </s>."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == 2))


def tracker(**kw) -> OutputTracker:
    p = SamplingParams(**kw)
    return OutputTracker(p, p.max_tokens, IncrementalDetokenizer(Words()), eos_token_ids=[2])


def test_stop_string_cuts_the_text_and_finishes():
    t = tracker(stop=["w5 w"], max_tokens=10)
    assert [t.append(i) for i in (3, 4, 5)] == [False, False, False]
    assert t.append(6) is True
    assert (t.text, t.token_ids, t.finish_reason) == ("w3 w4 ", [3, 4, 5, 6], "stop")


def test_streamed_text_holds_back_a_possible_stop_string():
    t = tracker(stop=["w5 w6"], max_tokens=10)
    got = []
    for i in (3, 4, 5, 6):
        t.append(i)
        got.append(t.take_delta()[1])
    # Text: "w3", "w3 w4", "w3 w4 w5", then "w5 w6" completes: 4 characters held back.
    assert got == ["", "w", "3 w", "4 "]
    assert "".join(got) == t.text == "w3 w4 "


def test_eos_stop_ids_and_length():
    t = tracker(max_tokens=10)
    t.append(3)
    assert t.append(2) and t.finish_reason == "stop" and t.text == "w3"
    t = tracker(max_tokens=10, ignore_eos=True)
    assert not t.append(2)
    t = tracker(max_tokens=10, stop_token_ids=[9])
    assert t.append(9) and t.token_ids == [9] and t.text == ""
    t = tracker(max_tokens=2)
    assert [t.append(3), t.append(4)] == [False, True]
    assert (t.text, t.finish_reason) == ("w3 w4", "length")
