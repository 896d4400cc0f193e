"""From logits to tokens to text: sampling parameters, the batch sampler, streaming
detokenisation and stop conditions.

    logits [B, vocab] ─Sampler─► one token per row ─OutputTracker─► token_ids, text,
    (temperature, top-k, top-p,                       (IncrementalDetokenizer: only whole
     a torch.Generator per request)                    characters; stop ids / EOS / stop
                                                       strings / max_tokens -> finish)

Reproducibility: a request with a `seed` draws from its own generator, consumed once per
token, so its output does not depend on what else is in the batch (as long as the
logits do not; batched matmuls may differ in the last bits).
"""

from __future__ import annotations

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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


GREEDY_BELOW = 1e-5
MAX_SEED = 2**64 - 1


GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    """Picks one token per row of a logits batch; keeps each seeded request's generator."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def release(self, key: str) -> None:
        """The request is done: forget its generator."""
        self._generators.pop(key, None)

    def _generator(self, key: str, params: SamplingParams,
                   device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        g = self._generators.get(key)
        if g is None:
            g = self._generators[key] = torch.Generator(device=device).manual_seed(params.seed)
        return g

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               keys: Sequence[str]) -> list[int | Exception]:
        """logits [B, vocab]; `params[i]` and `keys[i]` (request ids) belong to row i. A
        row that fails alone (its generator, its draw) gets its exception in place of a
        token, as `asyncio.gather(return_exceptions=True)` does: the other rows keep
        theirs. Rows must be finite (the caller fails non-finite rows before)."""
        if not (logits.shape[0] == len(params) == len(keys)):
            raise ValueError(f"{logits.shape[0]} logits rows, {len(params)} params, "
                             f"{len(keys)} keys")
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
        self.text = ""
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._sent_ids = 0
        self._sent_chars = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> bool:
        """Add one sampled token; True when the request is finished."""
        assert not self.finished, "token after finish"
        self.token_ids.append(token_id)
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
        hits = [i for s in self.params.stop
                if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    def take_delta(self) -> tuple[list[int], str]:
        """Token ids and text not handed out yet. While running, the last characters that
        could be the start of a stop string are held back."""
        end = len(self.text) if self.finished else max(self._sent_chars,
                                                       len(self.text) - self._hold)
        ids, text = self.token_ids[self._sent_ids:], self.text[self._sent_chars:end]
        self._sent_ids, self._sent_chars = len(self.token_ids), end
        return ids, text
