"""Structured output: a `StructuredOutput` (JSON schema, any JSON object, regex, choice or
Lark grammar) compiled by llguidance into a token matcher that masks the logits.

    StructuredOutput ─GrammarCompiler.compiled─► LLMatcher (compiled once per constraint,
                                                  kept in an LRU)
                     ─GrammarCompiler.matcher──► a copy per request (its own parse state)
    logits rows of constrained requests ─mask─► -inf on tokens the grammar forbids now
    sampled token ─LLMatcher.consume_token─► next state

Only the rows that carry a constraint are masked; free rows in the same batch are not
touched. llguidance computes a mask in microseconds per row (no per-vocabulary Python
loop), which is why it was chosen over xgrammar, whose wheel also requires torch and
triton pins of its own.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import llguidance
import torch

from fastlibra.model.sampling import SamplingParamsError, StructuredOutput

JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON (", " and ": " separators, no free whitespace): models write it that way,
and a free-whitespace grammar lets a weak model pad forever."""


class GrammarCompiler:
    """Compiles each distinct constraint once (an LRU of `cache_size`) and hands every
    request its own matcher. The llguidance tokenizer is built on first use."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int],
                 cache_size: int = 256) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.cache_size = cache_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiles = 0
        """Grammars compiled so far (each distinct constraint once while cached)."""

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            import llguidance.hf  # imports transformers

            self._tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
        return self._tokenizer

    @staticmethod
    def grammar(spec: StructuredOutput) -> str:
        """llguidance's grammar text for a constraint (not yet checked)."""
        M = llguidance.LLMatcher
        if spec.json is not None:
            return M.grammar_from_json_schema(spec.json, defaults=JSON_OPTIONS)
        if spec.json_object:
            return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if spec.regex is not None:
            return M.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return M.grammar_from_lark("start: " + " | ".join(
                json.dumps(c, ensure_ascii=False) for c in spec.choice))
        return M.grammar_from_lark(spec.grammar)

    def compiled(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """The compiled matcher of `spec` (its start state); SamplingParamsError with
        llguidance's message if the schema, regex or grammar is invalid."""
        key = spec.key
        matcher = self._compiled.get(key)
        if matcher is not None:
            self._compiled.move_to_end(key)
            return matcher
        try:
            grammar = self.grammar(spec)
        except ValueError as e:  # a schema given as text that is not JSON
            raise SamplingParamsError("structured_output", f"invalid: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise SamplingParamsError("structured_output", f"invalid: {error}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SamplingParamsError("structured_output", f"invalid: {matcher.get_error()}")
        self.compiles += 1
        self._compiled[key] = matcher
        if len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher for one request (a copy: the compiled grammar is shared)."""
        return self.compiled(spec).deep_copy()

    def mask(self, logits: torch.Tensor, matchers: list[llguidance.LLMatcher]) -> None:
        """Set to -inf, in place, every token that matcher i forbids in row i [B, vocab].

            bits [B, ceil(vocab / 32)] int32: bit j of word w allows token 32 w + j
        """
        words = (self.vocab_size + 31) // 32
        bits = torch.empty((len(matchers), words), dtype=torch.int32)
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bits[i].data_ptr(), words * 4)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]
        logits.masked_fill_(~allowed.to(logits.device), -torch.inf)
