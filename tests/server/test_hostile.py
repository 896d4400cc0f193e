"""Hostile inputs against a live server (issue 18): each gets its own 4xx (or its own error
event in its stream), streams running beside it finish exactly as they do alone, no
error body shows a path of the server's, nothing is registered by a refused load, and
the server log holds no traceback.

Server: tiny-llama with adapters a and b, API key KEY, the adapter root of liveserver.py
(dyn, foreign, broken, escape, huge, nan), a 256 KiB device pool, 8 MiB body limit.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from liveserver import MODEL_NAME, adapter_root, live_server

torch.set_num_threads(1)

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
WITNESSES = [  # six streams: every model, greedy and seeded sampling
    {"model": MODEL_NAME, "prompt": "w020 w021 w022 w023", "temperature": 0},
    {"model": "a", "prompt": "w030 w031 w032", "temperature": 0},
    {"model": "b", "prompt": "w040 w041 w042 w043 w044", "temperature": 0},
    {"model": MODEL_NAME, "prompt": "w050", "temperature": 0.8, "seed": 3},
    {"model": "a", "prompt": "w060 w061", "temperature": 0.8, "seed": 4},
    {"model": "b", "prompt": "w070 w071 w072", "temperature": 0.8, "seed": 5},
]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = adapter_root(tmp_path_factory)
    with live_server(tmp_path_factory, api_key=KEY, adapter_roots=(root,)) as srv:
        srv.root = root
        srv.private = str(tmp_path_factory.getbasetemp())
        yield srv


@pytest.fixture(scope="module")
def logs(server):
    """Every record of the server's loggers (after uvicorn configured its own)."""
    handler = Records()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


@pytest.fixture(autouse=True)
def no_traceback(logs):
    start = len(logs.records)
    yield
    bad = [r for r in logs.records[start:] if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [logging.Formatter().format(r) for r in bad]


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(len(WITNESSES)) as p:
        yield p


def stream(url: str, body: dict, started: threading.Event | None = None,
           max_tokens: int = 8) -> tuple[str, list[float]]:
    """A streamed completion's text and the seconds between its chunks; sets `started`
    once the first chunk is in."""
    body = {**body, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    parts: list[str] = []
    times: list[float] = []
    with httpx.Client(timeout=60) as c, \
            c.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            assert "error" not in data, data
            times.append(time.perf_counter())
            parts.append(data["choices"][0]["text"])
            if started is not None:
                started.set()
    return "".join(parts), [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest.fixture(scope="module")
def alone(server, logs):
    """Each witness's text with nothing else running."""
    return [stream(server.url, w)[0] for w in WITNESSES]


def beside(server, pool, witnesses, hostile):
    """Start the witness streams, run `hostile()` once each has its first token, and
    return (its result, the witnesses' texts)."""
    events = [threading.Event() for _ in witnesses]
    futures = [pool.submit(stream, server.url, w, e) for w, e in zip(witnesses, events,
                                                                        strict=True)]
    for e, f in zip(events, futures, strict=True):
        while not e.wait(0.05) and not f.done():
            pass  # a witness that fails before its first token shows in f.result()
    result = hostile()
    return result, [f.result(timeout=60)[0] for f in futures]


def send(server, path: str, body, key: str | None = KEY,
         content_type: str = "application/json") -> httpx.Response:
    """`body` as JSON (ensure_ascii, so lone surrogates and NaN go as JSON escapes), or
    bytes / an iterator of bytes (chunked) as they are."""
    headers = {"content-type": content_type} | ({"Authorization": f"Bearer {key}"}
                                                if key else {})
    content = json.dumps(body).encode() if isinstance(body, dict | list) else body
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def adapters_of(server) -> list[str]:
    return server.engine.call(lambda: server.llm.adapter_names).result()


# -- the hostile suite -----------------------------------------------------------------
DROP = object()


def comp(**kw) -> dict:
    body = {"model": MODEL_NAME, "prompt": "w005 w006", "max_tokens": 4} | kw
    return {k: v for k, v in body.items() if v is not DROP}


def chat(**kw) -> dict:
    body = {"model": "a", "messages": [{"role": "user", "content": "w005"}],
            "max_tokens": 4} | kw
    return {k: v for k, v in body.items() if v is not DROP}


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


C, CH, LOAD, UNLOAD = ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                       "/v1/unload_lora_adapter")
BIG = 9 * 2**20  # over the 8 MiB body limit
CASES = [
    # seeds: 0 .. 2**64 - 1, including seed + n - 1
    ("seed-2^64", C, comp(seed=2**64, temperature=1), 400, "seed"),
    ("seed-negative", C, comp(seed=-1, temperature=1), 400, "seed"),
    ("seed-plus-n-overflows", C, comp(seed=2**64 - 1, n=2, temperature=1), 400, "seed"),
    ("seed-2^70-stream", C, comp(seed=2**70, temperature=1, stream=True), 400, "seed"),
    ("seed-float", C, comp(seed=1.5), 400, "seed"),
    ("seed-string", C, comp(seed="7"), 400, "seed"),
    ("seed-bool", C, comp(seed=True), 400, "seed"),
    ("chat-seed-2^64", CH, chat(seed=2**64, temperature=1), 400, "seed"),
    # sampling fields
    ("temperature-negative", C, comp(temperature=-1), 400, "temperature"),
    ("temperature-5", C, comp(temperature=5), 400, "temperature"),
    ("temperature-nan", C, comp(temperature=float("nan")), 400, "temperature"),
    ("temperature-inf", C, comp(temperature=float("inf")), 400, "temperature"),
    ("temperature-string", C, comp(temperature="hot"), 400, "temperature"),
    ("top-p-0", C, comp(top_p=0), 400, "top_p"),
    ("top-p-1.5", C, comp(top_p=1.5), 400, "top_p"),
    ("top-p-nan", C, comp(top_p=float("nan")), 400, "top_p"),
    ("top-k-minus-5", C, comp(top_k=-5), 400, "top_k"),
    ("top-k-float", C, comp(top_k=1.5), 400, "top_k"),
    ("max-tokens-0", C, comp(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", C, comp(max_tokens=-3), 400, "max_tokens"),
    ("max-tokens-string", C, comp(max_tokens="4"), 400, "max_tokens"),
    ("max-tokens-float", C, comp(max_tokens=1e10), 400, "max_tokens"),
    ("n-0", C, comp(n=0), 400, "n"),
    ("n-17", C, comp(n=17), 400, "n"),
    ("n-string", C, comp(n="2"), 400, "n"),
    ("stop-empty", C, comp(stop=""), 400, "stop"),
    ("stop-list-empty-string", C, comp(stop=[""]), 400, "stop"),
    ("stop-17-strings", C, comp(stop=["w009"] * 17), 400, "stop"),
    ("stop-number", C, comp(stop=5), 400, "stop"),
    ("stop-token-ids-negative", C, comp(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("stop-token-ids-string", C, comp(stop_token_ids="2"), 400, "stop_token_ids"),
    ("ignore-eos-string", C, comp(ignore_eos="maybe"), 400, "ignore_eos"),
    ("stream-list", C, comp(stream=[1]), 400, "stream"),
    ("stream-options-bad", C, comp(stream_options={"include_usage": "maybe"}), 400,
     "stream_options"),
    # prompts
    ("prompt-empty", C, comp(prompt=""), 400, "prompt"),
    ("prompt-empty-list", C, comp(prompt=[]), 400, "prompt"),
    ("prompt-negative-id", C, comp(prompt=[-1]), 400, "prompt"),
    ("prompt-id-past-vocab", C, comp(prompt=[128]), 400, "prompt"),
    ("prompt-id-2^64", C, comp(prompt=[2**64]), 400, "prompt"),
    ("prompt-nested-empty", C, comp(prompt=[[]]), 400, "prompt"),
    ("prompt-one-empty-of-two", C, comp(prompt=[[5], []]), 400, "prompt"),
    ("prompt-three-levels", C, comp(prompt=[[[5]]]), 400, "prompt"),
    ("prompt-65-prompts", C, comp(prompt=["w005"] * 65), 400, "prompt"),
    ("prompt-null", C, comp(prompt=None), 400, "prompt"),
    ("prompt-number", C, comp(prompt=5), 400, "prompt"),
    ("prompt-object", C, comp(prompt={"text": "w005"}), 400, "prompt"),
    ("prompt-lone-surrogate", C, comp(prompt="\udfff"), 400, "prompt"),
    ("prompt-surrogate-inside", C, comp(prompt="w005 \ud800 w006"), 400, "prompt"),
    ("prompt-surrogate-second-of-two", C, comp(prompt=["w005", "w006 \udfff"]), 400, "prompt"),
    ("prompt-300-words", C, comp(prompt="w005 " * 300), 400, "prompt"),
    ("prompt-300-ids", C, comp(prompt=[5] * 300), 400, "prompt"),
    ("prompt-one-too-long-of-two", C, comp(prompt=["w005", "w006 " * 300]), 400, "prompt"),
    ("prompt-too-long-stream", C, comp(prompt="w005 " * 300, stream=True), 400, "prompt"),
    ("prompt-missing", C, comp(prompt=DROP), 400, "prompt"),
    # model
    ("model-empty", C, comp(model=""), 400, "model"),
    ("model-unknown", C, comp(model="nope"), 404, "model"),
    ("model-null", C, comp(model=None), 400, "model"),
    ("model-number", C, comp(model=5), 400, "model"),
    ("model-100k-chars", C, comp(model="m" * 100_000), 404, "model"),
    ("model-dotdot", C, comp(model="../a"), 404, "model"),
    ("model-missing", C, comp(model=DROP), 400, "model"),
    ("chat-model-unknown", CH, chat(model="nope"), 404, "model"),
    # chat
    ("messages-empty", CH, chat(messages=[]), 400, "messages"),
    ("messages-null", CH, chat(messages=None), 400, "messages"),
    ("messages-bad-role", CH, chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages"),
    ("messages-image-part", CH, chat(messages=user([{"type": "image_url"}])), 400,
     "messages"),
    ("messages-lone-surrogate", CH, chat(messages=user("\udfff")), 400, "messages"),
    ("messages-surrogate-in-part", CH, chat(messages=user([{"type": "text",
                                                              "text": "w005 \udfff"}])),
     400, "messages"),
    ("messages-surrogate-stream", CH, chat(messages=user("\ud800"), stream=True), 400,
     "messages"),
    ("messages-257", CH, chat(messages=user("w005") * 257), 400, "messages"),
    ("messages-content-number", CH, chat(messages=user(5)), 400, "messages"),
    ("messages-300-words", CH, chat(messages=user("w005 " * 300)), 400, "messages"),
    ("tools", CH, chat(tools=[{"type": "function"}]), 400, "tools"),
    ("max-completion-tokens-0", CH, chat(max_completion_tokens=0), 400,
     "max_completion_tokens"),
    ("chat-temperature-nan", CH, chat(temperature=float("nan")), 400, "temperature"),
    # bodies that are not requests
    ("body-truncated", C, b"{", 400, None),
    ("body-list", C, b"[]", 400, None),
    ("body-null", C, b"null", 400, None),
    ("body-number", C, b"123", 400, None),
    ("body-string", C, b'"w005"', 400, None),
    ("body-empty", C, b"", 400, None),
    ("body-not-utf8", C, b"\xff\xfe\x00{", 400, None),
    ("body-nested-100k", C, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("body-over-limit", C, b"x" * BIG, 413, None),
    ("body-over-limit-chunked", C, iter([b"x" * (BIG // 2)] * 3), 413, None),
    ("chat-body-over-limit", CH, b" " * BIG, 413, None),
    # loading adapters: names
    ("name-1mb", LOAD, {"lora_name": "n" * 2**20, "lora_path": "dyn"}, 400, "lora_name"),
    ("name-is-the-model-id", LOAD, {"lora_name": MODEL_NAME, "lora_path": "dyn"}, 400,
     "lora_name"),
    ("name-with-nul", LOAD, {"lora_name": "a\x00b", "lora_path": "dyn"}, 400, "lora_name"),
    ("name-with-newline", LOAD, {"lora_name": "a\nb", "lora_path": "dyn"}, 400,
     "lora_name"),
    ("name-leading-space", LOAD, {"lora_name": " dyn", "lora_path": "dyn"}, 400,
     "lora_name"),
    ("name-lone-surrogate", LOAD, {"lora_name": "\udfff", "lora_path": "dyn"}, 400,
     "lora_name"),
    ("name-empty", LOAD, {"lora_name": "", "lora_path": "dyn"}, 400, "lora_name"),
    ("name-already-loaded", LOAD, {"lora_name": "a", "lora_path": "dyn"}, 400, "lora_name"),
    ("name-number", LOAD, {"lora_name": 5, "lora_path": "dyn"}, 400, "lora_name"),
    # loading adapters: paths and files
    ("path-dotdot", LOAD, {"lora_name": "x", "lora_path": "../dyn"}, 403, "lora_path"),
    ("path-etc", LOAD, {"lora_name": "x", "lora_path": "/etc"}, 403, "lora_path"),
    ("path-symlink-out", LOAD, {"lora_name": "x", "lora_path": "escape"}, 403, "lora_path"),
    ("path-nul", LOAD, {"lora_name": "x", "lora_path": "dyn\x00"}, 403, "lora_path"),
    ("path-missing-dir", LOAD, {"lora_name": "x", "lora_path": "missing"}, 400, "lora_path"),
    ("path-broken-file", LOAD, {"lora_name": "x", "lora_path": "broken"}, 400, "lora_path"),
    ("path-other-model", LOAD, {"lora_name": "x", "lora_path": "foreign"}, 400, "lora_path"),
    ("path-too-big-for-pool", LOAD, {"lora_name": "x", "lora_path": "huge"}, 400,
     "lora_path"),
    ("path-nan-weights", LOAD, {"lora_name": "x", "lora_path": "nan"}, 400, "lora_path"),
    ("path-empty", LOAD, {"lora_name": "x", "lora_path": ""}, 400, "lora_path"),
    ("path-number", LOAD, {"lora_name": "x", "lora_path": 5}, 400, "lora_path"),
    # unloading, keys
    ("unload-unknown", UNLOAD, {"lora_name": "nope"}, 404, "lora_name"),
    ("unload-empty", UNLOAD, {"lora_name": ""}, 400, "lora_name"),
    ("unload-the-model-id", UNLOAD, {"lora_name": MODEL_NAME}, 404, "lora_name"),
]


def test_the_suite_has_a_hundred_inputs():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("path,body,status,param", [pytest.param(*c[1:], id=c[0])
                                                     for c in CASES])
def test_a_hostile_input_fails_alone(server, pool, alone, path, body, status, param):
    before = adapters_of(server)
    resp, texts = beside(server, pool, WITNESSES[:1], lambda: send(server, path, body))
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert param is None or err["param"].split(".")[0].split("[")[0] == param, err
    assert server.private not in resp.text
    assert texts == alone[:1]
    assert adapters_of(server) == before


def test_a_wrong_key_fails_alone(server, pool, alone):
    resp, texts = beside(server, pool, WITNESSES[:1],
                         lambda: send(server, C, comp(), key="wrong"))
    assert resp.status_code == 401 and texts == alone[:1]


def test_unknown_adapters_do_not_list_the_others(server):
    resp = send(server, C, comp(model="nope"))
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "unknown adapter 'nope'"


def test_error_bodies_carry_no_server_paths(server):
    for path in ("broken", "foreign", "missing", "huge", "/etc"):
        resp = send(server, LOAD, {"lora_name": "x", "lora_path": path})
        message = resp.json()["error"]["message"]
        assert str(server.root) not in message and server.private not in message
        assert str(server.root.resolve()) not in message
    resp = send(server, LOAD, {"lora_name": "x", "lora_path": "broken"})
    assert resp.json()["error"]["message"].startswith(
        "broken/adapter_model.safetensors: not a readable safetensors file")
    resp = send(server, LOAD, {"lora_name": "x", "lora_path": "nan"})
    assert resp.json()["error"]["message"] == (
        "nan/adapter_model.safetensors: layers.1.mlp.down_proj.lora_B has 1 non-finite "
        "values (NaN or inf) in float32")


def test_an_adapter_too_big_for_the_pool_is_a_400_naming_it(server):
    resp = send(server, LOAD, {"lora_name": "x", "lora_path": "huge"})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "lora_path" and err["message"].startswith("huge: adapter 'x' needs")


def test_the_model_path_is_not_an_adapter_name(server):
    resp = send(server, LOAD, {"lora_name": str(server.cfg.model_dir), "lora_path": "dyn"})
    assert resp.status_code == 400 and "served model's name or path" in resp.text


# -- failures inside a step, beside six streams ----------------------------------------
def test_out_of_range_seeds_fail_alone_beside_six_streams(server, pool, alone):
    def hostile():
        return [send(server, C, comp(seed=2**64, temperature=1)),
                send(server, C, comp(seed=2**64 - 1, n=2, temperature=1)),
                send(server, CH, chat(seed=-5, temperature=1, stream=True))]

    resps, texts = beside(server, pool, WITNESSES, hostile)
    assert [r.status_code for r in resps] == [400, 400, 400]
    assert {r.json()["error"]["param"] for r in resps} == {"seed"}
    assert texts == alone


def test_non_finite_logits_fail_alone_beside_six_streams(server, pool, alone):
    """An adapter whose weights turned to NaN on the device (after its load was checked):
    its sampled request gets a 400 naming it, its stream an error event; six streams
    beside them finish as alone; once it is unloaded its freed blocks poison nothing."""
    assert send(server, LOAD, {"lora_name": "poison", "lora_path": "dyn"}).status_code == 200
    assert send(server, C, comp(model="poison")).status_code == 200  # now on device

    def poison():
        llm = server.llm
        node = llm.cache.adapters["poison"]
        llm.runner.kv.data[[b + llm.mover.adapter_block_offset for b in node.blocks]] = \
            float("nan")

    server.engine.call(poison).result()

    def hostile():
        plain = send(server, C, comp(model="poison", temperature=1, seed=1))
        with httpx.stream("POST", server.url + C, headers=AUTH, timeout=60,
                          json=comp(model="poison", stream=True, temperature=0)) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        return plain, r.status_code, events

    (plain, status, events), texts = beside(server, pool, WITNESSES, hostile)
    assert plain.status_code == 400
    assert plain.json()["error"]["code"] == "adapter_failed"
    assert "adapter 'poison' produced non-finite logits" in plain.json()["error"]["message"]
    assert status == 200 and events[-1]["error"]["code"] == "adapter_failed"
    assert texts == alone
    assert send(server, UNLOAD, {"lora_name": "poison"}).status_code == 200
    server.wait_idle()
    assert [stream(server.url, w)[0] for w in WITNESSES] == alone
    server.engine.call(server.llm.cache.check_invariants).result()


def test_an_adapter_directory_deleted_after_loading_fails_alone(server, pool, alone):
    shutil.copytree(server.root / "dyn", server.root / "gone")
    try:
        assert send(server, LOAD, {"lora_name": "gone", "lora_path": "gone"}).status_code == 200

        def to_disk():  # no tier keeps a copy: the next use reads the directory
            server.llm.cache.clear()
            server.llm.mover.sync_adapters(server.llm.cache)
            return server.llm.cache.adapters["gone"].tier.name

        assert server.engine.call(to_disk).result() == "DISK"
    finally:
        shutil.rmtree(server.root / "gone")
    resp, texts = beside(server, pool, WITNESSES,
                         lambda: send(server, C, comp(model="gone")))
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "adapter_failed" and "adapter directory not found" in err["message"]
    assert server.private not in resp.text
    assert texts == alone
    assert send(server, C, comp(model="gone")).status_code == 404  # unloaded
    assert [stream(server.url, w)[0] for w in WITNESSES] == alone
    server.engine.call(server.llm.cache.check_invariants).result()


def test_3mb_prompts_do_not_stall_a_running_stream(server, pool):
    """A 3 MB prompt is refused from its head alone (its first 2,044 characters have more
    tokens than the context); one whose head hides its length (a long first word) is
    tokenised whole, off the engine thread (~3 s here). Meanwhile the stream's largest
    gap between tokens stays under a second."""
    started = threading.Event()
    future = pool.submit(stream, server.url, WITNESSES[0], started, 120)
    started.wait(30)
    plain = send(server, C, comp(prompt="w005 " * 600_000))
    hidden = send(server, C, comp(prompt="x" * 3000 + " w005" * 600_000))
    _, gaps = future.result(timeout=60)
    for resp in (plain, hidden):
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "context_length_exceeded"
    assert "its first 2044 characters alone have 409" in plain.json()["error"]["message"]
    assert "the prompt has 600001 tokens" in hidden.json()["error"]["message"]
    assert max(gaps) < 1.0, max(gaps)


def test_a_prompt_long_in_characters_but_short_in_tokens_is_served(server):
    resp = send(server, C, comp(prompt="w005 " + "x" * 5000 + " w006", max_tokens=2))
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 3
