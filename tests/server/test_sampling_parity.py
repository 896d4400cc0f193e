"""vLLM's sampling extras through the HTTP API, each against transformers + peft on the
same model and adapter (fp32): logprobs / top_logprobs (completions and chat, streaming
and not), echo, presence / frequency / repetition penalties, logit_bias, min_tokens; and
bad combinations are a 400 naming the field while the server keeps serving.

Server: tiny Llama "tiny-llama" with adapters a and b (tests/model/llmsetup.py); the
word tokenizer maps "w005" <-> 5, </s> = 2; the chat template renders a user message
"w005 w006" as [11, 5, 6, 12].
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from liveserver import MODEL_NAME, live_server, words
from llmsetup import served_setup, word
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

torch.set_num_threads(1)

PROMPT = [5, 9, 14, 20, 27, 33]
TOL = 1e-4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return served_setup(tmp_path_factory)[2]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def reference(ref, prompt: list[int], adapter: str | None, n: int, *, presence=0.0,
              frequency=0.0, repetition=1.0, bias=None, min_tokens=0, stop_at_eos=False):
    """Greedy decoding on transformers' logits with vLLM's processing order (bias and
    min_tokens, then repetition over prompt + output, then frequency / presence over the
    output); returns the tokens and, per token, the raw log-softmax row."""
    out, rows = [], []
    for _ in range(n):
        logits = ref.logits(prompt + out, adapter)[-1].float()
        rows.append(logits.log_softmax(-1))
        x = logits.clone()
        for t, b in (bias or {}).items():
            x[t] += b
        if len(out) < min_tokens:
            x[2] = -float("inf")  # </s>
        if repetition != 1:
            x = RepetitionPenaltyLogitsProcessor(repetition)(
                torch.tensor([prompt + out]), x[None])[0]
        for t in set(out):
            x[t] -= frequency * out.count(t) + presence
        out.append(int(x.argmax()))
        if out[-1] == 2 and stop_at_eos:
            break
    return out, rows


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t[1:]) for t in tokens]


def test_completion_logprobs_match_transformers_streaming_and_not(server, client, ref):
    want, rows = reference(ref, PROMPT, "a", 6)
    kw = dict(model="a", prompt=words(PROMPT), max_tokens=6, temperature=0, logprobs=5,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    assert ids_of(whole.tokens) == want
    for t, lp, top, row in zip(want, whole.token_logprobs, whole.top_logprobs, rows,
                               strict=True):
        assert abs(lp - float(row[t])) < TOL
        best = row.topk(5)
        expect = {word(int(i)): float(v) for v, i in zip(best.values, best.indices,
                                                         strict=True)}
        assert set(top) == set(expect) | {word(t)}
        assert all(abs(top[k] - v) < TOL for k, v in expect.items())
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)]
    assert [t for c in streamed for t in c.tokens] == whole.tokens
    assert [v for c in streamed for v in c.token_logprobs] == pytest.approx(
        whole.token_logprobs, abs=TOL)
    assert [o for c in streamed for o in c.text_offset] == whole.text_offset


def test_chat_logprobs_match_transformers_streaming_and_not(server, client, ref):
    chat_ids = [11, 5, 6, 12]
    want, rows = reference(ref, chat_ids, "b", 5)
    kw = dict(model="b", messages=[{"role": "user", "content": "w005 w006"}], max_tokens=5,
              temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert ids_of([c.token for c in content]) == want
    for c, t, row in zip(content, want, rows, strict=True):
        assert abs(c.logprob - float(row[t])) < TOL and c.bytes == list(word(t).encode())
        best = row.topk(3)
        assert ids_of([x.token for x in c.top_logprobs]) == best.indices.tolist()
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(best.values.tolist(),
                                                                      abs=TOL)
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content]


@pytest.mark.parametrize("stream", [False, True])
def test_penalties_and_logit_bias_match_transformers(client, ref, stream):
    # special tokens (<pad> <s> </s>) are kept out: they have no text to compare
    bias = {7: 2.5, 119: -100.0, 0: -100.0, 1: -100.0, 2: -100.0}
    knobs = dict(presence=0.7, frequency=0.9, repetition=1.4, bias=bias)
    want, _ = reference(ref, PROMPT, "a", 12, **knobs)
    plain, _ = reference(ref, PROMPT, "a", 12)
    assert want != plain  # the penalties change this output: the test can fail
    out = client.completions.create(
        model="a", prompt=words(PROMPT), max_tokens=12, temperature=0, stream=stream,
        presence_penalty=0.7, frequency_penalty=0.9,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"ignore_eos": True, "repetition_penalty": 1.4})
    text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
    assert text.split() == [word(t) for t in want]


def test_min_tokens_holds_eos_back(client, ref):
    # </s> is pushed to the top by the bias: without min_tokens it comes at once
    body = dict(model=MODEL_NAME, prompt=words(PROMPT), max_tokens=10, temperature=0,
                logit_bias={"2": 30})
    assert client.completions.create(**body).usage.completion_tokens == 1
    out = client.completions.create(**body, extra_body={"min_tokens": 4})
    want, _ = reference(ref, PROMPT, None, 10, bias={2: 30.0}, min_tokens=4, stop_at_eos=True)
    assert want[-1] == 2 and len(want) == 5
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "stop"
    assert out.choices[0].text.split() == [word(t) for t in want[:-1]]


def test_echo_puts_the_prompt_in_front(client, ref):
    want, _ = reference(ref, PROMPT, "b", 3)
    kw = dict(model="b", prompt=words(PROMPT), max_tokens=3, temperature=0, echo=True,
              extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    assert text.split() == [word(t) for t in PROMPT + want]
    first = next(iter(client.completions.create(**kw, stream=True))).choices[0].text
    assert first.startswith(words(PROMPT))
    ids = client.completions.create(**{**kw, "prompt": PROMPT}).choices[0].text
    assert ids.split() == text.split()


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": 2, "echo": True}, "echo"),
    ("/v1/completions", {"presence_penalty": -2.5}, "presence_penalty"),
    ("/v1/completions", {"logit_bias": {"128": 1}}, "logit_bias"),
    ("/v1/completions", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"frequency_penalty": 9}, "frequency_penalty"),
])
def test_bad_combinations_are_400_naming_the_field_and_serving_goes_on(server, path, extra,
                                                                      param):
    body = {"model": "a", "max_tokens": 2} | extra
    body |= ({"prompt": "w005 w006"} if "chat" not in path
             else {"messages": [{"role": "user", "content": "w005"}]})
    resp = httpx.post(server.url + path, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    ok = httpx.post(server.url + "/v1/completions", json={
        "model": "a", "prompt": "w005", "max_tokens": 2, "logprobs": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["tokens"]) >= 1
    server.wait_idle()
