"""The OpenAI wire format: request bodies (validated by pydantic, so FastAPI publishes
them in the OpenAPI schema), response and stream-chunk builders, and errors.

Fields follow OpenAI's API and vLLM's extensions (`top_k`, `min_tokens`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos`, `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`). Fields we accept but cannot honour
(`best_of`, `suffix`, `echo` with `logprobs`, `tools`) are refused with a 400 naming the
field rather than silently ignored; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from fastlibra.model.sampling import (
    MAX_LOGPROBS,
    SamplingParams,
    SamplingParamsError,
    StructuredOutput,
    TokenLogprobs,
)

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
Prompt = NonEmptyStr | Annotated[list[TokenId], Field(min_length=1)]


class ApiError(Exception):
    """An error answered in OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object or json_schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: NonEmptyStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    """vLLM's extension: -1 or 0 = all tokens."""
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    seed: StrictInt | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=16)] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    presence_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    """vLLM's extension: > 1 discourages tokens of the prompt and output."""
    logit_bias: dict[str, float] | None = None
    best_of: Any = None
    """Refused unless left out: one sequence is sampled per choice."""
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[NonEmptyStr], Field(min_length=1)] | None = None
    guided_grammar: StrictStr | None = None
    """vLLM's structured-output fields; guided_grammar is a Lark grammar here."""

    def structured(self) -> tuple[StructuredOutput | None, str | None]:
        """The output constraint and the field that gave it (at most one may)."""
        given: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ApiError(400, "response_format json_schema needs json_schema.schema",
                               param="response_format")
            given.append(("response_format", {"json": rf.json_schema.json_schema}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, {key: getattr(self, name)}))
        if not given:
            return None, None
        if len(given) > 1:
            raise ApiError(400, f"give one output constraint, not {given[0][0]} and "
                           f"{given[1][0]}", param=given[1][0])
        name, spec = given[0]
        try:
            return StructuredOutput(**spec), name
        except SamplingParamsError as e:
            raise ApiError(400, f"{name}: {e}", param=name) from None

    def num_logprobs(self) -> int | None:
        """How many top logprobs per token (None = no logprobs)."""
        return None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.best_of not in (None, False):
            raise ApiError(400, "best_of is not supported by this server", param="best_of")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        max_tokens = self.max_tokens or default_max_tokens
        if self.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({self.min_tokens}) is above max_tokens "
                           f"({max_tokens})", param="min_tokens")
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k if self.top_k is not None and self.top_k > 0 else None,
            seed=self.seed, max_tokens=max_tokens,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None
            else self.repetition_penalty,
            logit_bias=self.logit_bias, logprobs=self.num_logprobs(),
            structured=self.structured()[0])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Logprobs = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


class CompletionRequest(_Sampling):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=64)]
    logprobs: Logprobs | None = None
    echo: bool = False
    suffix: str | None = None

    def num_logprobs(self) -> int | None:
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo with logprobs (the prompt's logprobs) is not supported "
                           "by this server; use one or the other", param="echo")
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        if self.suffix:
            raise ApiError(400, "suffix is not supported by this server", param="suffix")
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None
    """An assistant's earlier calls (OpenAI's form), rendered by the chat template."""
    tool_call_id: StrictStr | None = None
    name: StrictStr | None = None

    def text(self, index: int) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported",
                               param=f"messages[{index}].content")
            out.append(part["text"])
        return "".join(out)

    def for_template(self, index: int) -> dict:
        """The message as chat templates take it: a tool call's arguments as an object
        (OpenAI sends them as JSON text), extra keys only when present."""
        msg: dict[str, Any] = {"role": self.role, "content": self.text(index)}
        if self.tool_calls:
            msg["tool_calls"] = [_call_for_template(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            msg["name"] = self.name
        return msg


def _call_for_template(call: dict) -> dict:
    if not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    """Accepted: every call the model writes is returned."""
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template(i) for i, m in enumerate(self.messages)]

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a `prompt`, or chat `messages` rendered by the template."""

    model_config = ConfigDict(extra="ignore")

    model: NonEmptyStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def conversation(self) -> list[dict[str, str]] | None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", "prompt")
        if self.messages is None:
            return None
        return [m.for_template(i) for i, m in enumerate(self.messages)]


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize body."""

    model_config = ConfigDict(extra="ignore")

    model: NonEmptyStr | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 20)]


class LoadLoraRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: NonEmptyStr
    lora_path: NonEmptyStr


class UnloadLoraRequest(BaseModel):
    """vLLM's /v1/unload_lora_adapter body (lora_int_id is accepted and unused)."""

    lora_name: NonEmptyStr
    lora_int_id: int | None = None


# -- responses -------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str | None, finish_reason: str | None, *, delta: bool,
                first: bool = False, logprobs: dict | None = None,
                tool_calls: list[dict] | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text} if first or not delta \
        else {"content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "delta" if delta else "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}


def completion_logprobs(lps: list[TokenLogprobs], token: Callable[[int], str],
                        offset: int) -> dict:
    """The completions API's logprobs: token strings, their logprobs, the top ones (the
    sampled token included, as OpenAI and vLLM do) and each token's offset in the text."""
    tokens = [token(lp.token_id) for lp in lps]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token(t): v for t, v in lp.top} | {tok: lp.logprob}
                             for lp, tok in zip(lps, tokens, strict=True)],
            "text_offset": offsets if lps else []}


def chat_logprobs(lps: list[TokenLogprobs], token: Callable[[int], str]) -> dict:
    """The chat API's logprobs: per token its string, logprob, UTF-8 bytes and top ones."""
    def entry(t: int, v: float) -> dict:
        s = token(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}

    return {"content": [entry(lp.token_id, lp.logprob) | {
        "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}


def envelope(kind: str, rid: str, model: str, choices: list[dict],
             usage_: dict | None = None) -> dict:
    """One response or stream chunk: kind is text_completion, chat.completion or
    chat.completion.chunk."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}
