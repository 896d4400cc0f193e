"""Fuzzing the HTTP API from the server's own OpenAPI schema (schemathesis): whatever a
client sends — valid, edge or malformed (negative mode) — the answer is never a 5xx, and
the engine is left with no request running and its invariants intact."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from liveserver import MODEL_NAME, live_server
from schemathesis import GenerationMode

torch.set_num_threads(1)

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODELS = (MODEL_NAME, "a", "b", "unknown")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-root")
    with live_server(tmp_path_factory, api_key=KEY, adapter_roots=(root,)) as srv:
        yield srv


def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return [op.ok() for op in schema.get_all_operations()]


def test_the_schema_covers_every_route(server):
    paths = {(op.method.upper(), op.path) for op in operations(server)}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"), ("POST", "/v1/load_lora_adapter"),
            ("POST", "/v1/unload_lora_adapter"), ("GET", "/health")} <= paths


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_the_server_answer_5xx(server, mode):
    for op in operations(server):
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # nothing to get wrong: GET routes take no parameters
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                # mostly a model that exists, so generation itself gets fuzzed too
                case.body["model"] = MODELS[len(case.body["model"]) % len(MODELS)]
            response = case.call(headers=AUTH, timeout=60)
            assert response.status_code < 500, (case.path, case.body, response.text)

        call()
    server.wait_idle(timeout=60)
    server.engine.call(server.llm.cache.check_invariants).result()
