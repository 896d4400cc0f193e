"""From logits to tokens to text: sampling parameters, the batch sampler, streaming
detokenisation and stop conditions.

    logits [B, vocab] ─Sampler─► one token per row ─OutputTracker─► token_ids, text,
    (logit_bias, min_tokens,      (+ logprobs of the   (IncrementalDetokenizer: only whole
     repetition / frequency /      raw logits)          characters; stop ids / EOS / stop
     presence penalties, then                           strings / max_tokens -> finish)
     temperature, top-k, top-p,
     a torch.Generator per request)

The processing order is vLLM's: logit bias and min_tokens first, then the penalties
(repetition over prompt and output, frequency and presence over the output), then
temperature and truncation. Rows with default parameters skip the processing entirely.
Logprobs, like vLLM's default, are those of the model's raw logits (before any of it).

Reproducibility: a request with a `seed` draws from its own generator, consumed once per
token, so its output does not depend on what else is in the batch (as long as the
logits do not; batched matmuls may differ in the last bits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match (exactly one field): a JSON schema, any JSON object, a
    regular expression, one of some strings, or a Lark grammar. `model/grammar.py`
    compiles it (llguidance) and masks the logits of the rows that carry it."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [f for f in ("json", "regex", "choice", "grammar")
                 if getattr(self, f) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise SamplingParamsError("structured_output", "give exactly one of json, "
                                      "json_object, regex, choice and grammar; got "
                                      f"{', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(self.json, dict | str):
            raise SamplingParamsError("structured_output", "json must be a JSON schema "
                                      "(an object, or its text)")
        for f in ("regex", "grammar"):
            if getattr(self, f) is not None and not isinstance(getattr(self, f), str):
                raise SamplingParamsError("structured_output", f"{f} must be a string")
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or any(not isinstance(c, str) or not c for c in choice):
                raise SamplingParamsError("structured_output",
                                          "choice must be a list of non-empty strings")
            object.__setattr__(self, "choice", choice)

    @property
    def key(self) -> str:
        """The same constraint, the same key (the compiled-grammar cache's)."""
        return json.dumps([self.json, self.json_object, self.regex, self.choice, self.grammar],
                          sort_keys=True)

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it before softmax. Below
    GREEDY_BELOW it is greedy too: dividing by 1e-300 would overflow to inf/nan."""
    top_k: int | None = None
    """Keep only the k most likely tokens; None = all."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's own generator (0 .. 2**64 - 1, what torch.Generator takes);
    None = the global torch RNG."""
    max_tokens: int = 16
    """Generated tokens at most (finish_reason "length")."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text is cut before the first one and the request finishes."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that finish the request (kept in token_ids, not in the text)."""
    ignore_eos: bool = False
    """Keep generating after the model's end-of-sequence token."""
    min_tokens: int = 0
    """EOS and stop_token_ids cannot be sampled before this many tokens."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (-2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (-2..2)."""
    repetition_penalty: float = 1.0
    """Logits of tokens in the prompt or output: positive ones divided by it, negative
    ones multiplied (> 0; 1 = off)."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids (-100..100)."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many most likely (0..MAX_LOGPROBS)."""
    structured: StructuredOutput | None = None
    """Constrain the output to a schema, regex, choice or grammar."""

    def __post_init__(self) -> None:
        def bad(field: str, want: str) -> SamplingParamsError:
            return SamplingParamsError(
                field, f"SamplingParams.{field} must be {want}, got {getattr(self, field)!r}")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise bad("temperature", "a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 1):
            raise bad("top_k", "None or an integer >= 1")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise bad("seed", f"None or an integer in 0..{MAX_SEED}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise bad("stop_token_ids", "a list of token ids (integers >= 0)")
        object.__setattr__(self, "stop_token_ids", ids)

        def number(field: str, lo: float, hi: float) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise bad(field, f"a number in [{lo}, {hi}]")

        number("presence_penalty", -2, 2)
        number("frequency_penalty", -2, 2)
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 10:
            raise bad("repetition_penalty", "in (0, 10] (1 = off)")
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= self.max_tokens:
            raise bad("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)
                               or not 0 <= lp <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if self.logit_bias is not None:
            try:
                bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
            except (TypeError, ValueError):
                raise bad("logit_bias", "a map of token ids to numbers") from None
            if any(k < 0 or not -100 <= v <= 100 for k, v in bias.items()):
                raise bad("logit_bias", "a map of token ids (>= 0) to numbers in [-100, 100]")
            object.__setattr__(self, "logit_bias", bias or None)
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise bad("structured", "None or a StructuredOutput")
            if self.min_tokens:
                raise bad("min_tokens", "0 with structured output (the grammar decides "
                          "where the output may end)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        """Anything to do to the logits before temperature (penalties, bias, min_tokens)."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty
                    or self.frequency_penalty or self.repetition_penalty != 1
                    or self.structured)


GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20
"""vLLM's default --max-logprobs, and OpenAI's limit for top_logprobs."""
MAX_SEED = 2**64 - 1


GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class TokenLogprobs:
    """The logprob of one sampled token and of the most likely tokens at its position."""

    token_id: int
    logprob: float
    rank: int
    """1 = the most likely token."""
    top: tuple[tuple[int, float], ...]
    """(token id, logprob) of the `logprobs` most likely tokens, best first."""


@torch.inference_mode()
def token_logprobs(logits: torch.Tensor, tokens: Sequence[int],
                   counts: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """Logprobs of `tokens[i]` under row i of the raw `logits` [B, vocab], with the
    `counts[i]` most likely tokens; None for rows that did not ask (counts[i] None)."""
    out: list[TokenLogprobs | None] = [None] * len(tokens)
    rows = [i for i, k in enumerate(counts) if k is not None]
    if not rows:
        return out
    lp = logits[rows].float().log_softmax(-1)
    k = max(counts[i] for i in rows)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    picked = torch.tensor([tokens[i] for i in rows], device=lp.device)
    chosen = lp.gather(1, picked[:, None])[:, 0]
    ranks = (lp > chosen[:, None]).sum(-1) + 1
    for j, i in enumerate(rows):
        n = counts[i]
        out[i] = TokenLogprobs(tokens[i], float(chosen[j]), int(ranks[j]), tuple(zip(
            top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True)))
    return out


class Sampler:
    """Picks one token per row of a logits batch; keeps each seeded request's generator
    and each constrained request's grammar matcher. `eos_token_ids` are what `min_tokens`
    holds back (with each request's stop ids); `grammars` (`grammar.GrammarCompiler`)
    compiles structured-output constraints."""

    def __init__(self, eos_token_ids: Iterable[int] = (), grammars=None) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._matchers: dict[str, object] = {}
        self.eos_token_ids = frozenset(eos_token_ids)
        self.grammars = grammars

    def release(self, key: str) -> None:
        """The request is done: forget its generator and matcher."""
        self._generators.pop(key, None)
        self._matchers.pop(key, None)

    def _generator(self, key: str, params: SamplingParams,
                   device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        g = self._generators.get(key)
        if g is None:
            g = self._generators[key] = torch.Generator(device=device).manual_seed(params.seed)
        return g

    def _process(self, row: torch.Tensor, p: SamplingParams, prompt: Sequence[int],
                 output: Sequence[int]) -> None:
        """Bias, min_tokens and penalties applied to one float32 row in place."""
        dev = row.device
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=dev)
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=dev))
        if len(output) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            if banned:
                row[torch.tensor(sorted(banned), device=dev)] = -math.inf
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(prompt) | set(output)), device=dev)
            v = row[seen]
            row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if output and (p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.tensor(list(output), device=dev).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               keys: Sequence[str],
               history: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None
               ) -> list[int | Exception]:
        """logits [B, vocab]; `params[i]`, `keys[i]` (request ids) and `history[i]` (prompt
        and output ids so far, for penalties and min_tokens) belong to row i. A row that
        fails alone (its generator, its draw) gets its exception in place of a token, as
        `asyncio.gather(return_exceptions=True)` does: the other rows keep theirs. Rows
        must be finite (the caller fails non-finite rows before)."""
        if not (logits.shape[0] == len(params) == len(keys)):
            raise ValueError(f"{logits.shape[0]} logits rows, {len(params)} params, "
                             f"{len(keys)} keys")
        special = [i for i, p in enumerate(params) if p.processes_logits]
        constrained = [i for i in special if params[i].structured is not None]
        if special:
            if history is None:
                raise ValueError("penalties and min_tokens need each row's history")
            logits = logits.float().clone()  # the raw logits stay as they were (logprobs)
            for i in special:
                self._process(logits[i], params[i], *history[i])
        if constrained:
            matchers = [self._matcher(keys[i], params[i]) for i in constrained]
            rows = logits[constrained]
            self.grammars.mask(rows, matchers)
            logits[constrained] = rows
        out = self._pick(logits, params, keys)
        for i in constrained:
            m = self._matchers[keys[i]]
            if not m.is_stopped() and isinstance(out[i], int):  # a finished grammar: EOS
                m.consume_token(out[i])
        return out

    def _matcher(self, key: str, params: SamplingParams):
        m = self._matchers.get(key)
        if m is None:
            if self.grammars is None:
                raise SamplingParamsError("structured_output", "structured output needs "
                                          "the model's tokenizer")
            m = self._matchers[key] = self.grammars.matcher(params.structured)
        return m

    def _pick(self, logits: torch.Tensor, params: Sequence[SamplingParams],
              keys: Sequence[str]) -> list[int | Exception]:
        """Greedy rows by argmax, the others by temperature, top-k, top-p."""
        out: list[int | Exception] = [0] * len(params)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy) == len(params):  # no index lists to upload
            return logits.argmax(-1).tolist()
        vocab, dev = logits.shape[-1], logits.device
        picks = torch.zeros(len(params), dtype=torch.long, device=dev)
        if greedy:
            picks[greedy] = logits[greedy].argmax(-1)
        rest = [i for i, p in enumerate(params) if not p.greedy]
        temps = torch.tensor([params[i].temperature for i in rest], device=dev)
        x = logits[rest].float() / temps[:, None]
        # Sorted descending (ties keep index order, so top_k=1 is the argmax).
        x, idx = x.sort(dim=-1, descending=True, stable=True)  # [R, vocab]
        ks = torch.tensor([min(params[i].top_k or vocab, vocab) for i in rest], device=dev)
        x = x.masked_fill(torch.arange(vocab, device=dev)[None, :] >= ks[:, None], -math.inf)
        probs = x.softmax(-1)
        ps = torch.tensor([params[i].top_p for i in rest], device=dev)
        # Drop a token when the mass before it already reaches top_p (the first stays).
        drop = (probs.cumsum(-1) - probs >= ps[:, None]) & (ps[:, None] < 1)
        drop[:, 0] = False  # even when top_p rounds to 0 in float32
        probs = probs.masked_fill(drop, 0.0)
        for j, i in enumerate(rest):
            try:
                g = self._generator(keys[i], params[i], dev)
                picks[i:i + 1] = idx[j, torch.multinomial(probs[j], 1, generator=g)]
            except RuntimeError as e:
                out[i] = e
        # The step's one host sync (a per-row int() would wait for the GPU once per row).
        return [o if isinstance(o, Exception) else t
                for o, t in zip(out, picks.tolist(), strict=True)]


class IncrementalDetokenizer:
    """Text of a growing token sequence, emitted only as whole characters.

    Decodes a short window (a few tokens before the last emitted one, then everything
    after it) so that merged tokens (SentencePiece leading spaces, byte-level BPE pieces
    of one multi-byte character) come out right; a window that ends in U+FFFD (an
    incomplete UTF-8 sequence) waits for the next token."""

    CONTEXT = 5

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # Keep the window short: only ids from prefix_offset on are ever decoded.
            if self.prefix_offset > 4 * self.CONTEXT:
                del self.ids[:self.prefix_offset]
                self.read_offset -= self.prefix_offset
                self.prefix_offset = 0
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return now[len(before):]


class OutputTracker:
    """One request's generated tokens and text, and whether (and why) it has finished.

    finish_reason: "stop" (a stop token id, EOS, or a stop string: the text is cut before
    it), "length" (max tokens), "abort" (set by the caller); None while running."""

    def __init__(self, params: SamplingParams, max_tokens: int,
                 detokenizer: IncrementalDetokenizer | None,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.max_tokens = max_tokens
        self.detok = detokenizer
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= set(eos_token_ids)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        """One per token of `token_ids` when the request asked for logprobs."""
        self.text = ""
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._sent_ids = 0
        self._sent_chars = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> bool:
        """Add one sampled token (and its logprobs, if asked); True when finished."""
        assert not self.finished, "token after finish"
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            assert logprobs is not None and logprobs.token_id == token_id
            self.logprobs.append(logprobs)
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return True
        if self.detok is not None:
            self._add_text(self.detok.push(token_id))
        if not self.finished and len(self.token_ids) >= self.max_tokens:
            if self.detok is not None:
                self._add_text(self.detok.flush())
            if not self.finished:
                self.finish_reason = "length"
        return self.finished

    def _add_text(self, delta: str) -> None:
        if not delta:
            return
        start = len(self.text)
        self.text += delta
        if len(self.token_ids) < self.params.min_tokens:
            return
        hits = [i for s in self.params.stop
                if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    def take_delta(self) -> tuple[list[int], str, list[TokenLogprobs] | None]:
        """Token ids, text and logprobs (None if not asked) not handed out yet. While
        running, the last characters that could be the start of a stop string are held
        back."""
        end = len(self.text) if self.finished else max(self._sent_chars,
                                                       len(self.text) - self._hold)
        ids, text = self.token_ids[self._sent_ids:], self.text[self._sent_chars:end]
        lps = None if self.logprobs is None else self.logprobs[self._sent_ids:]
        self._sent_ids, self._sent_chars = len(self.token_ids), end
        return ids, text, lps
