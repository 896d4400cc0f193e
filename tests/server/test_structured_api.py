"""Structured output over HTTP with the official client: response_format json_schema /
json_object and vLLM's guided_json / guided_regex / guided_choice, streaming and not,
each output checked with `jsonschema` or the regex; bad constraints are a 400 naming the
field and the server keeps serving. Server: the byte-tokenizer random Llama of
llmsetup.byte_setup ("bytes"), adapter "lora-0"."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch
from liveserver import byte_server

torch.set_num_threads(1)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"type": "string", "maxLength": 10},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
USER = [{"role": "user", "content": "Plan a trip."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with byte_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_output_satisfies_the_schema(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}
    out = client.chat.completions.create(model="lora-0", messages=USER, max_tokens=60,
                                         temperature=1.0, seed=4, n=2, stream=stream,
                                         response_format=fmt)
    texts = ["", ""]
    for chunk in (out if stream else [out]):
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if stream else c.message.content
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_guided_fields(client):
    out = client.chat.completions.create(model="bytes", messages=USER, max_tokens=120,
                                         temperature=0, response_format={"type": "json_object"})
    choice = out.choices[0]
    assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content),
                                                          dict)
    done = client.completions.create(model="lora-0", prompt="Weather:", max_tokens=60,
                                     temperature=0.7, seed=1,
                                     extra_body={"guided_json": json.dumps(SCHEMA)})
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMA)
    code = client.completions.create(model="bytes", prompt="Code:", max_tokens=20,
                                     extra_body={"guided_regex": r"[A-Z]{2}[0-9]{3}"})
    assert re.fullmatch(r"[A-Z]{2}[0-9]{3}", code.choices[0].text)
    picked = client.chat.completions.create(
        model="lora-0", messages=USER, max_tokens=10, stream=True,
        extra_body={"guided_choice": ["Paris", "Rome", "Oslo"]})
    assert "".join(c.choices[0].delta.content or "" for c in picked
                   if c.choices) in ("Paris", "Rome", "Oslo")


@pytest.mark.parametrize("extra,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}}, "response_format", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "json_schema.schema"),
    ({"guided_regex": "(ab"}, "guided_regex", "unclosed group"),
    ({"guided_json": "{not json"}, "guided_json", "invalid"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "one output constraint"),
    ({"guided_choice": []}, "guided_choice", ""),
])
def test_bad_constraints_are_400_naming_the_field(server, extra, param, words):
    body = {"model": "bytes", "messages": USER, "max_tokens": 5} | extra
    resp = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"]
    ok = httpx.post(server.url + "/v1/completions", json={
        "model": "bytes", "prompt": "x", "max_tokens": 3, "guided_choice": ["yes", "no"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no")
