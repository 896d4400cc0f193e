"""Tool calls in chat completions: tools reach the chat template; tool_choice auto parses
the model's own calls (hermes tags, Llama 3.1 JSON), required and a named function are
enforced through structured output; streaming sends OpenAI's tool-call deltas; bad tools
or tool_choice are a 400 naming the field. Server: the byte-tokenizer random Llama
(llmsetup.byte_setup, "bytes", adapter "lora-0") with the hermes parser (a Llama would
default to llama3_json); a random model writes no call of its own, so `auto` is driven by
a guided_choice that spells one."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from liveserver import byte_server

from fastlibra.server.tools import ToolCalling

torch.set_num_threads(1)

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 8},
                          "unit": {"enum": ["C", "F"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["zone"],
             "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with byte_server(tmp_path_factory, tool_call_parser="hermes") as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def streamed(chunks) -> tuple[str, dict[int, dict], str | None]:
    """Content, tool calls by index (id, name, arguments joined) and the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("before", ["", "Let me check. "])
def test_auto_parses_a_hermes_call_streaming_and_not(client, before):
    kw = dict(model="lora-0", messages=USER, tools=TOOLS, tool_choice="auto", max_tokens=200,
              extra_body={"guided_choice": [before + CALL]})
    choice = client.chat.completions.create(**kw).choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == (before.strip() or None)
    content, calls, finish = streamed(client.chat.completions.create(**kw, stream=True))
    assert content == before and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "unit": "C"})]


def test_auto_without_a_call_is_plain_content(client):
    choice = client.chat.completions.create(
        model="bytes", messages=USER, tools=TOOLS, max_tokens=20,
        extra_body={"guided_choice": ["It is sunny."]}).choices[0]
    assert choice.message.content == "It is sunny." and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_a_tool_with_valid_arguments(client, stream):
    out = client.chat.completions.create(model="lora-0", messages=USER, tools=TOOLS,
                                         tool_choice="required", max_tokens=300,
                                         temperature=0.8, seed=2, stream=stream)
    if stream:
        _, by_index, finish = streamed(out)
        calls = [(c["name"], c["arguments"]) for c in by_index.values()]
    else:
        choice = out.choices[0]
        finish = choice.finish_reason
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert finish == "tool_calls" and calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])


def test_a_named_function_is_called_and_its_arguments_stream(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="bytes", messages=USER, tools=TOOLS,
                                         tool_choice=choice, max_tokens=100, temperature=0.7,
                                         seed=5)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    chunks = list(client.chat.completions.create(model="bytes", messages=USER, tools=TOOLS,
                                                 tool_choice=choice, max_tokens=100,
                                                 temperature=0.7, seed=5, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2  # the arguments arrive piece by piece
    _, calls, _ = streamed(chunks)
    assert calls[0]["arguments"] == call.function.arguments


def test_tools_and_earlier_calls_reach_the_chat_template(client):
    plain = client.chat.completions.create(model="bytes", messages=USER, max_tokens=1)
    none = client.chat.completions.create(model="bytes", messages=USER, tools=TOOLS,
                                          tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools' JSON
    assert not none.choices[0].message.tool_calls
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    after = client.chat.completions.create(model="bytes", messages=history, max_tokens=1)
    assert after.usage.prompt_tokens > plain.usage.prompt_tokens + len(CALL)


@pytest.mark.parametrize("extra,param,words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not in tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "a tool is"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined with response_format"),
    ({"tool_choice": "always"}, "tool_choice", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "nope"}}}], "tool_choice": "required"}, "tool_choice", "Invalid type"),
])
def test_bad_tools_are_400_naming_the_field(server, extra, param, words):
    body = {"model": "bytes", "messages": USER, "tools": TOOLS, "max_tokens": 5} | extra
    resp = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"].split(".")[0] == param and words in err["message"]
    ok = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "bytes", "messages": USER, "tools": TOOLS, "max_tokens": 80,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"


def test_llama3_json_calls_parse_and_stream():
    tools = ToolCalling(TOOLS, "auto", "llama3_json")
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}; '
            '{"name": "get_time", "parameters": {"zone": "CET"}}')
    content, calls = tools.parse(text)
    assert content is None and [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "F"}), ("get_time", {"zone": "CET"})]
    stream = tools.stream()
    sent = [stream.push(text[i:i + 7], i + 7 >= len(text)) for i in range(0, len(text), 7)]
    assert all(out == ("", []) for out in sent[:-1])  # held: a call started
    assert [d["function"]["name"] for d in sent[-1][1]] == ["get_weather", "get_time"]
    assert tools.parse("The answer is {not a call}") == ("The answer is {not a call}", [])
    plain = tools.stream()
    assert plain.push("Hello", False) == ("Hello", []) and plain.push(" {x}", True)[0] == " {x}"


def test_hermes_stream_holds_only_what_may_be_a_tag():
    stream = ToolCalling(TOOLS, "auto", "hermes").stream()
    assert stream.push("a <", False) == ("a ", [])  # "<" might still become a tag
    assert stream.push(" b is true", False) == ("< b is true", [])  # it did not
    assert stream.push(" <tool", False) == (" ", [])
    content, calls = stream.push(CALL[5:], True)
    assert content == "" and calls[0]["function"]["name"] == "get_weather"
