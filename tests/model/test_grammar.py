"""Structured output in the engine (llguidance): outputs match their JSON schema, regex or
choice, constrained rows share a batch with free rows without changing them, a grammar
compiles once per schema, and a bad schema is an error naming the field before anything
is queued. Model: the byte-tokenizer random Llama of llmsetup.byte_setup."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from llmsetup import byte_setup

from fastlibra.llm import LLM
from fastlibra.model.sampling import SamplingParams, SamplingParamsError, StructuredOutput

torch.set_num_threads(1)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    base, adapters = byte_setup(tmp_path_factory)
    return LLM(base, adapters, device_memory=2 << 20, host_memory=2 << 20, device="cpu",
               dtype="float32")


def params(spec: StructuredOutput | None = None, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.9, "seed": 3, "max_tokens": 80, **kw},
                          structured=spec)


def test_outputs_match_schema_regex_and_choice_with_and_without_adapter(llm):
    for adapter in (None, "lora-0"):
        out = llm.generate(["a", "b"], params(StructuredOutput(json=SCHEMA)), adapter=adapter)
        for o in out:
            assert o.finish_reason == "stop"  # EOS once the object is complete
            jsonschema.validate(json.loads(o.text), SCHEMA)
        (o,) = llm.generate("c", params(StructuredOutput(regex=r"[a-z]{3}-[0-9]{2}")),
                            adapter=adapter)
        assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", o.text)
        (o,) = llm.generate("d", params(StructuredOutput(choice=("yes", "no", "maybe"))),
                            adapter=adapter)
        assert o.text in ("yes", "no", "maybe")
        (o,) = llm.generate("e", params(StructuredOutput(json_object=True), max_tokens=200),
                            adapter=adapter)
        assert o.finish_reason == "length" or isinstance(json.loads(o.text), dict)


def test_free_rows_in_a_constrained_batch_are_unchanged(llm):
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    (alone,) = llm.generate("free prompt", free)
    constrained = params(StructuredOutput(json=SCHEMA))
    mixed = llm.generate(["json please", "free prompt", "more json"],
                         [constrained, free, constrained])
    assert mixed[1].token_ids == alone.token_ids
    for o in (mixed[0], mixed[2]):
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert not re.fullmatch(r"\{.*\}", alone.text)  # unconstrained, it is no JSON


def test_a_grammar_compiles_once_per_schema(llm):
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"],
              "additionalProperties": False}
    same = json.loads(json.dumps(schema, sort_keys=True))  # equal, keys in another order
    before = llm.grammars.compiles
    for s in (schema, same, schema):
        (o,) = llm.generate("q", params(StructuredOutput(json=s)))
        assert json.loads(o.text)["k"] in ("x", "y")
    assert llm.grammars.compiles == before + 1


def test_bad_constraints_are_errors_naming_the_field_and_queue_nothing(llm):
    with pytest.raises(SamplingParamsError, match="Invalid type: nope") as e:
        llm.generate("q", params(StructuredOutput(json={"type": "nope"})))
    assert e.value.field == "structured_output"
    with pytest.raises(SamplingParamsError, match="unclosed group"):
        llm.generate("q", params(StructuredOutput(regex="(ab")))
    with pytest.raises(SamplingParamsError, match="exactly one of"):
        StructuredOutput(regex="a", choice=("b",))
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured=StructuredOutput(regex="a+"))
    assert not llm.has_unfinished
