"""The HTTP API against a live server on loopback, driven by the official `openai` client:
outputs equal transformers + peft, streaming equals non-streaming, adapters by `model`,
dynamic load/unload under an adapter root, metrics, API key, and every error case.

Server: tiny Llama "tiny-llama" with adapters a and b (tests/model/llmsetup.py), API key
KEY, the adapter root of liveserver.py (dyn, foreign, broken, escape, ...).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from liveserver import MODEL_NAME, adapter_root, live_server, words
from llmsetup import served_setup

from fastlibra.server.app import resolve_adapter_path
from fastlibra.server.protocol import ApiError

torch.set_num_threads(1)

KEY = "sk-test-key"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return adapter_root(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tmp_path_factory, root):
    with live_server(tmp_path_factory, api_key=KEY, adapter_roots=(root,),
                     metrics_compat="vllm") as srv:
        yield srv


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return served_setup(tmp_path_factory)[2]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes | str):
        return httpx.post(server.url + path, content=body, timeout=30,
                          headers={**headers, "content-type": "application/json"})
    return httpx.post(server.url + path, json=body, timeout=30, headers=headers)


def error_of(resp: httpx.Response) -> dict:
    return resp.json()["error"]


# -- generation ------------------------------------------------------------------------
@pytest.mark.parametrize("model,adapter", [(MODEL_NAME, None), ("a", "a"), ("b", "b")])
def test_completion_equals_transformers_peft_greedy(client, ref, model, adapter):
    prompt = [5, 17, 33, 40, 9, 12]
    r = client.completions.create(model=model, prompt=words(prompt), max_tokens=6,
                                  temperature=0, extra_body=NO_EOS)
    assert r.choices[0].text == " " + words(ref.greedy(prompt, adapter, 6))
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 6)
    assert r.model == model and r.object == "text_completion"


def test_token_id_prompts_and_several_prompts_in_one_call(client, ref):
    r = client.completions.create(model="a", prompt=[[5, 6, 7], [8, 9, 10, 11]], max_tokens=3,
                                  temperature=0, extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == " " + words(ref.greedy([8, 9, 10, 11], "a", 3))
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 6


def test_streaming_equals_non_streaming_and_ends_with_usage(client):
    args = dict(model="b", prompt=words([20, 21, 22, 23, 24]), max_tokens=7, temperature=0,
                extra_body=NO_EOS)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    # The same prompt again: its prefix is cached now, and the usage says so.
    again = client.completions.create(**args)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_renders_the_template_and_streams_role_then_content(client):
    messages = [{"role": "system", "content": "w030 w031"},
                {"role": "user", "content": "w005 w006 w007"}]
    chat = client.chat.completions.create(model="a", messages=messages, max_tokens=5,
                                          temperature=0, extra_body=NO_EOS)
    # the template: system -> w010, user -> w011, generation prompt w012
    plain = client.completions.create(model="a", prompt="w010 w030 w031 w011 w005 w006 w007 "
                                      "w012", max_tokens=5, temperature=0, extra_body=NO_EOS)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == 8 and chat.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=5,
                                                 temperature=0, extra_body=NO_EOS,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_and_seeded_sampling(client):
    greedy = client.completions.create(model=MODEL_NAME, prompt="w050 w051", max_tokens=6,
                                       temperature=0, extra_body=NO_EOS).choices[0].text
    third = greedy.split()[2]
    cut = client.completions.create(model=MODEL_NAME, prompt="w050 w051", max_tokens=6,
                                    temperature=0, stop=[third], extra_body=NO_EOS)
    assert cut.choices[0].finish_reason == "stop"
    assert third not in cut.choices[0].text.split()
    a, b = (client.completions.create(model="b", prompt="w050", max_tokens=8, temperature=1.0,
                                      seed=7, extra_body=NO_EOS).choices[0].text
            for _ in range(2))
    assert a == b


def test_models_lists_the_base_model_and_its_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert {MODEL_NAME, "a", "b"} <= set(models)
    assert models["a"].parent == MODEL_NAME


# -- errors ----------------------------------------------------------------------------
def test_unknown_model_is_404_naming_the_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="w005", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "'nope'" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("field,value", [
    ("temperature", 5), ("top_p", 0), ("max_tokens", 0), ("n", 0), ("top_k", -5),
    ("stop", [""]), ("prompt", ""), ("prompt", [-1]), ("seed", "x"), ("logprobs", 21),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
    ("logit_bias", {"abc": 1}), ("logit_bias", {"999": 1}), ("logit_bias", {"5": 200}),
    ("min_tokens", 3), ("best_of", 2), ("stream_options", {"include_usage": "maybe"}),
])
def test_invalid_parameters_are_400_naming_the_field(server, field, value):
    body = {"model": MODEL_NAME, "prompt": "w005 w006", "max_tokens": 2, field: value}
    resp = post(server, "/v1/completions", body)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"].split(".")[0] == field and err["type"] == "invalid_request_error"


def test_malformed_bodies_are_400(server):
    assert post(server, "/v1/completions", b"{not json").status_code == 400
    assert post(server, "/v1/completions", {"prompt": "w005"}).status_code == 400  # no model
    resp = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": [200]})
    assert resp.status_code == 400 and "outside the vocabulary" in error_of(resp)["message"]
    resp = post(server, "/v1/chat/completions",
                {"model": "a", "messages": [{"role": "user", "content": [{"type": "image"}]}]})
    assert resp.status_code == 400 and error_of(resp)["param"] == "messages[0].content"
    resp = httpx.get(server.url + "/v1/nowhere")
    assert resp.status_code == 404 and "error" in resp.json()


def test_prompt_longer_than_the_context_is_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt=words([5] * 300), max_tokens=2)
    msg = e.value.body["message"]
    assert "300 tokens" in msg and "256 tokens" in msg
    assert e.value.body["code"] == "context_length_exceeded"


def test_api_key_is_checked_on_every_v1_route(server):
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
        resp = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "w005"}, key)
        assert resp.status_code == 401 and error_of(resp)["type"] == "authentication_error"
        assert post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "dyn"},
                    key).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


# -- adapters at run time ----------------------------------------------------------------
def test_load_serve_and_unload_an_adapter_at_run_time(server, client, ref, root):
    resp = post(server, "/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": "dyn"})
    assert resp.status_code == 200, resp.text
    assert "dyn" in {m.id for m in client.models.list().data}
    prompt = [7, 8, 9, 10]
    out = client.completions.create(model="dyn", prompt=words(prompt), max_tokens=4,
                                    temperature=0, extra_body=NO_EOS)
    assert out.choices[0].text == " " + words(ref.greedy(prompt, "a", 4))  # dyn is a copy of a
    again = post(server, "/v1/load_lora_adapter",
                 {"lora_name": "dyn", "lora_path": str(root / "dyn")})
    assert again.status_code == 400 and "already loaded" in error_of(again)["message"]

    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "dyn"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="dyn", prompt="w005", max_tokens=2)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "dyn"}).status_code == 404
    assert "dyn" not in server.llm.cache.adapters


@pytest.mark.parametrize("path,status,says", [
    ("../dyn", 403, "'..'"),
    ("/etc", 403, "not under an allowed adapter root"),
    ("escape", 403, "not under an allowed adapter root"),
    ("foreign", 400, "adapter_model.safetensors"),
    ("broken", 400, "adapter_model.safetensors: not a readable safetensors file"),
    ("missing", 400, "adapter directory not found"),
])
def test_load_refuses_escapes_and_bad_adapters(server, path, status, says):
    resp = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
    assert resp.status_code == status, resp.text
    assert says in error_of(resp)["message"]
    assert "x" not in server.llm.cache.adapters


def test_dynamic_loading_is_off_without_a_root(root):
    with pytest.raises(ApiError) as e:
        resolve_adapter_path(str(root / "dyn"), ())
    assert e.value.status == 403 and "--adapter-root" in e.value.message


def test_unloading_an_adapter_in_use_lets_its_requests_finish(server, client):
    assert post(server, "/v1/load_lora_adapter",
                {"lora_name": "busy", "lora_path": "dyn"}).status_code == 200
    # 200 tokens: the unload must land while the stream still runs, on a loaded machine too
    stream = client.completions.create(model="busy", prompt="w005 w006", max_tokens=200,
                                       temperature=0, extra_body=NO_EOS, stream=True,
                                       stream_options={"include_usage": True})
    first = next(iter(stream))
    resp = post(server, "/v1/unload_lora_adapter", {"lora_name": "busy"})
    assert resp.status_code == 200 and "finish first" in resp.text
    with pytest.raises(openai.NotFoundError):  # no new requests meanwhile
        client.completions.create(model="busy", prompt="w005", max_tokens=2)
    rest = list(stream)
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert text and rest[-2].choices[0].finish_reason == "length"
    assert rest[-1].usage.completion_tokens == 200
    server.wait_idle()
    assert "busy" not in server.llm.cache.adapters
    server.engine.call(server.llm.cache.check_invariants).result()


# -- metrics and disconnects --------------------------------------------------------------
def scrape(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def scrape_around(server, client, adapter: str, prompt: str) -> tuple[dict, dict]:
    """/metrics before and after one 3-token request to the base model and one to
    `adapter`."""
    before = scrape(server)
    for model in (MODEL_NAME, adapter):
        client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0,
                                  extra_body=NO_EOS)
    return before, scrape(server)


def test_metrics_move_after_requests(server, client):
    label = f'{{model_name="{MODEL_NAME}"}}'
    before, after = scrape_around(server, client, "a", "w061 w062 w063 w064 w065 w066")
    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count"):
        assert after[f"fastlibra:{name}{label}"] == before.get(f"fastlibra:{name}{label}", 0) + 2
    assert after[f"fastlibra:prompt_tokens_total{label}"] >= \
        before.get(f"fastlibra:prompt_tokens_total{label}", 0) + 12
    assert after[f"fastlibra:prefix_cache_queries_total{label}"] > \
        before.get(f"fastlibra:prefix_cache_queries_total{label}", 0)
    assert after[f"fastlibra:num_requests_running{label}"] == 0
    pools = {k for k in after if k.startswith("fastlibra:pool_blocks")}
    assert any('kind="adapter"' in k for k in pools) and any('kind="free"' in k for k in pools)
    assert any(k.startswith("fastlibra:swap_bytes_total") for k in after)
    assert f"fastlibra:device_cache_hit_rate{label}" in after


def test_metrics_compat_vllm_exports_vllms_names(server, client):
    label = f'{{model_name="{MODEL_NAME}"}}'
    before, after = scrape_around(server, client, "b", "w081 w082 w083 w084 w085")

    def moved(name: str) -> float:
        return after[f"vllm:{name}"] - before.get(f"vllm:{name}", 0)

    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count", "request_prompt_tokens_count"):
        assert moved(name + label) == 2
    assert moved(f"prompt_tokens_total{label}") == 10
    assert moved(f"generation_tokens_total{label}") == 6
    assert moved(f'request_success_total{{finished_reason="length",model_name="{MODEL_NAME}"}}') == 2
    assert moved(f"prefix_cache_queries_total{label}") == 10
    assert after[f"vllm:num_requests_running{label}"] == 0
    assert after[f"vllm:num_requests_waiting{label}"] == 0
    # adapter b and the KV just cached sit in the device pool
    assert 0 < after[f"vllm:gpu_cache_usage_perc{label}"] == \
        after[f"fastlibra:pool_usage_perc{{model_name=\"{MODEL_NAME}\",pool=\"device\"}}"]


def test_tokenize_detokenize_and_version(server, client):
    def post(path: str, body: dict, key: str | None = KEY) -> httpx.Response:
        return httpx.post(server.url + path, json=body,
                          headers={"Authorization": f"Bearer {key}"} if key else {})

    assert httpx.get(server.url + "/version").json() == {"version": "0.1.0"}
    out = post("/tokenize", {"model": "a", "prompt": "w005 w006",
                             "return_token_strs": True}).json()
    assert out == {"count": 2, "max_model_len": 256, "tokens": [5, 6],
                   "token_strs": ["w005", "w006"]}
    messages = [{"role": "user", "content": "w005 w006"}]
    out = post("/tokenize", {"model": MODEL_NAME, "messages": messages}).json()
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1)
    assert out["tokens"] == [11, 5, 6, 12] and chat.usage.prompt_tokens == out["count"]
    assert post("/detokenize", {"tokens": [5, 6]}).json() == {"prompt": "w005 w006"}

    bad = post("/tokenize", {"model": "nope", "prompt": "w005"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
    bad = post("/tokenize", {"prompt": "w005", "messages": messages})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    bad = post("/detokenize", {"tokens": [5, 999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert "999" in bad.json()["error"]["message"]
    assert post("/tokenize", {"prompt": "w005"}, key=None).status_code == 401
    assert post("/tokenize", {"prompt": "w005"}).json()["tokens"] == [5]  # still serving


def test_metrics_show_the_profile_the_cost_model_prices_misses_with(server, client):
    label = f'{{model_name="{MODEL_NAME}"}}'
    client.completions.create(model="a", prompt="w061 w062 w063", max_tokens=2,
                              temperature=0, extra_body=NO_EOS)
    got = scrape(server)
    p = server.llm.cache.cost.hw
    assert p is server.llm.calibration.profile and p.name == "calibrated-cpu"
    for name, value in (("h2d_bytes_per_second", p.h2d_bandwidth),
                        ("d2h_bytes_per_second", p.d2h_bandwidth),
                        ("disk_bytes_per_second", p.disk_bandwidth),
                        ("prefill_seconds_per_token", p.prefill_per_token),
                        ("prefill_base_seconds", p.prefill_base)):
        assert got[f"fastlibra:calibrated_{name}{label}"] == pytest.approx(value, rel=1e-6)
    assert got[f"fastlibra:calibration_updates_total{label}"] == \
        server.llm.calibration.updates


def test_client_disconnect_mid_stream_frees_blocks_at_once(server):
    body = {"model": "b", "prompt": "w070 w071 w072 w073", "max_tokens": 200, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
    # The connection is closed here, long before 200 tokens.
    server.wait_idle(timeout=5)
    assert not server.llm.cache.running
    server.engine.call(server.llm.cache.check_invariants).result()


def test_n_choices_stream_interleaved_and_count_the_prompt_once(client):
    args = dict(model="a", prompt="w050 w051", max_tokens=4, temperature=1.0, n=3, seed=5,
                extra_body=NO_EOS)
    whole = client.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (2, 12)
    texts: dict[int, str] = {}
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]  # seeds: 5, 6, 7
