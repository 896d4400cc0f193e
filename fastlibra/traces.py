"""Trace replay (our JSONL format) and converters from public traces into it.

JSONL trace format (one JSON object per line; blank lines are skipped)
----------------------------------------------------------------------
Required:
  arrival     number >= 0   seconds from the trace start (lines may be in any order;
                            load_trace returns requests sorted by arrival, stable)
  output_len  int >= 1      tokens to generate (optional when `output` is given; then it
                            must equal len(output))
  and exactly one of
  prompt      [int, ...]    explicit prompt token ids, non-empty, each in [0, vocab_size)
  prompt_len  int >= 1      prompt length; the tokens are generated deterministically
                            (from the loader's seed) as follows:
                              * alone: a fresh token stream unique to the line;
                              * with `prefix_id` (string) and `prefix_len` (int >= 0): the
                                first min(prefix_len, prompt_len) tokens are the stream
                                named prefix_id (identical for every line naming it), the
                                rest is fresh;
                              * with `hash_ids` ([int >= 0, ...]) and optional `block_size`
                                (int >= 1, default 512): block id h expands to block_size
                                tokens that depend only on h (the first line defining h
                                fixes them), blocks are concatenated and truncated to
                                prompt_len, which must be <= len(hash_ids) * block_size.
                                Lines sharing k leading ids share >= k * block_size tokens.
                              * with `parent` (see below) and neither of the above: the
                                parent's prompt + the parent's output, then fresh tokens,
                                truncated to prompt_len.
Optional:
  adapter     string|null   LoRA adapter name; null or absent = base model
  output      [int, ...]    scripted output tokens (default: a fresh stream of output_len)
  id          string        request id, unique in the file (default "L<line number>")
  session     string|null   conversation label, copied to Request.session; with
                            load_trace(closed_loop=True) the lines of a session, in file
                            order, become one next_turn chain (only the first is returned)
  parent      string        id of an earlier line this one continues (its previous turn);
                            sets `session` to the parent's when absent. With `hash_ids`, a
                            block id seen for the first time takes, at each of its
                            positions, the parent's prompt + output token there (fresh
                            tokens after it), so a next turn that extends its parent's
                            blocks extends the parent's prompt and answer exactly. With
                            explicit `prompt` it only links; not allowed with `prefix_id`.
  think_s     number >= 0   closed loop only: delay between the previous turn of the
                            session finishing and this line arriving (default: the gap
                            between the two lines' arrivals)
  meta        any           ignored
Any other key is an error. A malformed line raises TraceError("<file>:<line>: <problem>").
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np

from fastlibra.engine.request import Request
from fastlibra.workloads import VOCAB_SIZE, RankSampler, TokenStreams, lognormal_int, zipf_weights

_KEYS = {"arrival", "adapter", "prompt", "prompt_len", "prefix_id", "prefix_len", "hash_ids",
         "block_size", "output", "output_len", "id", "session", "parent", "think_s", "meta"}
_BLOCK, _PREFIX = 2, 3  # TokenStreams domains (fresh streams use 1)


def _json_objects(path: Path):
    """(1-based line number, object) for every non-blank line of a JSONL file."""
    with path.open() as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TraceError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


class TraceError(ValueError):
    """A trace file is malformed; the message names the file, the 1-based line and the problem."""


class _Line:
    def __init__(self, path: Path, lineno: int, obj: dict) -> None:
        self.where, self.obj = f"{path}:{lineno}", obj

    def error(self, msg: str) -> TraceError:
        return TraceError(f"{self.where}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.obj

    def integer(self, key: str, lo: int, default=None, required=False):
        if key not in self.obj:
            if required:
                raise self.error(f"missing key {key!r}")
            return default
        v = self.obj[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.error(f"{key!r} must be an integer, got {v!r}")
        if v < lo:
            raise self.error(f"{key!r} must be >= {lo}, got {v}")
        return v

    def number(self, key: str, default=None, required=False):
        if key not in self.obj:
            if required:
                raise self.error(f"missing key {key!r}")
            return default
        v = self.obj[key]
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise self.error(f"{key!r} must be a finite number, got {v!r}")
        if v < 0:
            raise self.error(f"{key!r} must be >= 0, got {v}")
        return float(v)

    def text(self, key: str, nullable: bool = True):
        v = self.obj.get(key)
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v:
            raise self.error(f"{key!r} must be a non-empty string{' or null' if nullable else ''}, "
                             f"got {v!r}")
        return v

    def int_list(self, key: str, hi: int | None):
        v = self.obj[key]
        if not isinstance(v, list) or not v:
            raise self.error(f"{key!r} must be a non-empty list of integers")
        for x in v:
            ok = isinstance(x, int) and not isinstance(x, bool) and x >= 0
            if not ok or (hi is not None and x >= hi):
                rng = f"[0, {hi})" if hi is not None else ">= 0"
                raise self.error(f"{key!r} holds {x!r}, not an integer in {rng}")
        return v


def load_trace(path, *, seed: int = 0, vocab_size: int = VOCAB_SIZE, closed_loop: bool = False,
               max_requests: int | None = None) -> list[Request]:
    """Read a JSONL trace (format: module docstring) into Requests sorted by arrival.

    Open loop by default: every line arrives at its `arrival`. `max_requests` keeps the
    first lines of the file. Generated tokens are a pure function of (file, seed).
    """
    path = Path(path)
    toks = TokenStreams(seed, vocab_size)
    blocks: dict[int, tuple[int, list[int]]] = {}
    by_id: dict[str, Request] = {}
    rows: list[tuple[Request, float | None]] = []
    for lineno, obj in _json_objects(path):
        if max_requests is not None and len(rows) >= max_requests:
            break
        ln = _Line(path, lineno, obj)
        req, think = _parse(ln, lineno, toks, blocks, by_id)
        by_id[req.request_id] = req
        rows.append((req, think))
    if not closed_loop:
        reqs = [r for r, _ in rows]
    else:
        last: dict[str, Request] = {}
        reqs = []
        for r, think in rows:
            prev = last.get(r.session) if r.session is not None else None
            if prev is None:
                reqs.append(r)
            else:
                prev.next_turn = r
                prev.think_s = think if think is not None else max(0.0, r.arrival - prev.arrival)
            if r.session is not None:
                last[r.session] = r
    reqs.sort(key=lambda r: r.arrival)
    return reqs


def _parse(ln: _Line, lineno: int, toks: TokenStreams, blocks,
           by_id) -> tuple[Request, float | None]:
    unknown = sorted(set(ln.obj) - _KEYS)
    if unknown:
        raise ln.error(f"unknown key(s) {unknown}")
    arrival = ln.number("arrival", required=True)
    adapter = ln.text("adapter")
    rid = ln.text("id", nullable=False) if ln.has("id") else f"L{lineno}"
    if rid in by_id:
        raise ln.error(f"duplicate id {rid!r}")
    parent = None
    if ln.has("parent"):
        pid = ln.text("parent", nullable=False)
        parent = by_id.get(pid)
        if parent is None:
            raise ln.error(f"parent {pid!r} is not the id of an earlier line")
    session = ln.text("session") if ln.has("session") else (parent.session if parent else None)
    think = ln.number("think_s")
    vocab = toks.vocab_size

    if ln.has("output"):
        output = ln.int_list("output", vocab)
        n_out = ln.integer("output_len", 1, default=len(output))
        if n_out != len(output):
            raise ln.error(f"'output_len' {n_out} != len(output) {len(output)}")
    else:
        n_out = ln.integer("output_len", 1, required=True)
        output = None

    if ln.has("prompt") == ln.has("prompt_len"):
        raise ln.error("exactly one of 'prompt' and 'prompt_len' is required")
    for key, needs in (("prefix_id", "prompt_len"), ("hash_ids", "prompt_len"),
                       ("prefix_len", "prefix_id"), ("block_size", "hash_ids")):
        if ln.has(key) and not ln.has(needs):
            raise ln.error(f"{key!r} needs {needs!r}")
    if ln.has("prefix_id") and ln.has("hash_ids"):
        raise ln.error("'prefix_id' and 'hash_ids' are mutually exclusive")
    if ln.has("prefix_id") and parent is not None:
        raise ln.error("'prefix_id' and 'parent' are mutually exclusive")
    inherited = (parent.prompt + parent.output) if parent is not None else []

    if ln.has("prompt"):
        prompt = ln.int_list("prompt", vocab)
    else:
        n = ln.integer("prompt_len", 1, required=True)
        if ln.has("prefix_id"):
            name = ln.obj["prefix_id"]
            if not isinstance(name, str) or not name:
                raise ln.error(f"'prefix_id' must be a non-empty string, got {name!r}")
            k = min(n, ln.integer("prefix_len", 0, required=True))
            key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
            prompt = toks.take(key, k, domain=_PREFIX) + toks.fresh(n - k)
        elif ln.has("hash_ids"):
            prompt = _expand_blocks(ln, n, toks, blocks, inherited)
        else:
            prompt = inherited[:n] + toks.fresh(n - min(n, len(inherited)))
    if output is None:
        output = toks.fresh(n_out)
    req = Request(rid, prompt, n_out, arrival=arrival, adapter=adapter, output=output,
                  session=session)
    return req, think


def _expand_blocks(ln: _Line, n: int, toks: TokenStreams, blocks,
                   inherited: list[int]) -> list[int]:
    ids = ln.int_list("hash_ids", None)
    bs = ln.integer("block_size", 1, default=512)
    if n > len(ids) * bs:
        raise ln.error(f"'prompt_len' {n} exceeds {len(ids)} hash_ids x block_size {bs}")
    prompt: list[int] = []
    for p, h in enumerate(ids):
        if len(prompt) >= n:
            break
        got = blocks.get(h)
        if got is None:
            body = toks.take(h, bs, domain=_BLOCK)
            seg = inherited[p * bs:(p + 1) * bs]
            if seg:
                body = seg + body[len(seg):]
            got = blocks[h] = (bs, body)
        elif got[0] != bs:
            raise ln.error(f"hash id {h} was defined with block_size {got[0]}, here {bs}")
        prompt.extend(got[1])
    del prompt[n:]
    return prompt


def save_trace(requests, path) -> int:
    """Write Requests (and their next_turn chains) as JSONL with explicit tokens; returns
    the number of lines. `load_trace(path, closed_loop=True)` rebuilds the chains."""
    n = 0
    with Path(path).open("w") as f:
        for first in requests:
            session = first.session or (first.request_id if first.next_turn else None)
            r = first
            prev = None
            while r is not None:
                rec = {"id": r.request_id, "arrival": r.arrival, "adapter": r.adapter,
                       "prompt": list(r.prompt)}
                if r.output is not None:
                    rec["output"] = list(r.output)
                rec["output_len"] = r.max_new_tokens if r.output is None else len(r.output)
                if session is not None:
                    rec["session"] = session
                if prev is not None:
                    rec["think_s"] = prev.think_s
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
                n += 1
                prev, r = r, r.next_turn
    return n


# -- converters --------------------------------------------------------------------------

def _popularity(num_adapters: int, zipf: float, popularity) -> RankSampler:
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if popularity is not None:
        if len(popularity) != num_adapters:
            raise ValueError(
                f"popularity has {len(popularity)} weights for {num_adapters} adapters")
        return RankSampler(popularity)
    return RankSampler(zipf_weights(num_adapters, zipf))


def _dump(f, rec: dict) -> None:
    f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def convert_mooncake(src, dst, *, num_adapters: int, zipf: float, seed: int,
                     max_requests: int | None = None, time_scale: float = 1.0,
                     popularity=None, min_shared_blocks: int = 2) -> int:
    """Mooncake FAST'25 JSONL (timestamp ms, input_length, output_length, hash_ids of
    512-token prefix-chained blocks) -> our JSONL; returns the number of requests written.

    arrival = timestamp / 1000 * time_scale. Each line keeps prompt_len=input_length,
    hash_ids, block_size=512, output_len=max(1, output_length), id "mc<row>" (0-based).
    Sessions: request j continues the latest earlier request i whose full blocks
    (hash_ids[:input_length // 512]) are a prefix of j's hash_ids, are at least
    `min_shared_blocks` blocks long (the conversation trace's block 0 is a system prompt
    shared by all) and j.input_length > i.input_length; the longest such i wins. Then j
    gets i's session and parent=i (so j's prompt extends i's prompt and output exactly,
    see the format); otherwise j opens a new session. Shared templates are counted as
    sessions too. Adapters are drawn per session, in order of session opening, with
    numpy default_rng(seed) from Zipf(zipf) (or `popularity`) over ranks; rank r is
    "lora-r".
    """
    src, draw = Path(src), _popularity(num_adapters, zipf, popularity)
    rng = np.random.default_rng(seed)
    index: dict[int, tuple[int, int]] = {}  # last full block id -> (position, row)
    lengths: list[int] = []
    sessions: list[int] = []
    adapters: list[int] = []
    with Path(dst).open("w") as out:
        for lineno, obj in _json_objects(src):
            if max_requests is not None and len(lengths) >= max_requests:
                break
            ln = _Line(src, lineno, obj)
            ts = ln.number("timestamp", required=True)
            n_in = ln.integer("input_length", 1, required=True)
            n_out = ln.integer("output_length", 0, required=True)
            if not ln.has("hash_ids"):
                raise ln.error("missing key 'hash_ids'")
            h = ln.int_list("hash_ids", None)
            if n_in > len(h) * 512:
                raise ln.error(f"input_length {n_in} exceeds {len(h)} blocks of 512")
            row = len(lengths)
            parent = None
            for p in range(len(h) - 1, min_shared_blocks - 2, -1):
                e = index.get(h[p])
                if e is not None and e[0] == p and lengths[e[1]] < n_in:
                    parent = e[1]
                    break
            if parent is None:
                sessions.append(len(adapters))
                adapters.append(draw(rng))
            else:
                sessions.append(sessions[parent])
            lengths.append(n_in)
            full = min(n_in // 512, len(h))
            if full >= max(1, min_shared_blocks):
                index[h[full - 1]] = (full - 1, row)
            rec = {"id": f"mc{row}", "arrival": ts / 1000.0 * time_scale,
                   "adapter": f"lora-{adapters[sessions[row]]}", "prompt_len": n_in,
                   "hash_ids": h, "block_size": 512, "output_len": max(1, n_out),
                   "session": f"mc-s{sessions[row]}"}
            if parent is not None:
                rec["parent"] = f"mc{parent}"
            _dump(out, rec)
    return len(lengths)


def _azure_time(s: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> POSIX seconds (7 fractional digits kept)."""
    whole, _, frac = s.strip().partition(".")
    return datetime.fromisoformat(whole).timestamp() + (float("0." + frac) if frac else 0.0)


def convert_azure(src, dst, *, num_adapters: int, zipf: float, seed: int,
                  max_requests: int | None = None, time_scale: float = 1.0,
                  popularity=None) -> int:
    """Azure LLM inference 2023 CSV (TIMESTAMP, ContextTokens, GeneratedTokens) -> our JSONL.

    arrival = (TIMESTAMP - first row's TIMESTAMP) * time_scale; prompt_len=ContextTokens
    and output_len=GeneratedTokens, each clamped to >= 1; no prefixes (fresh prompts).
    The adapter of each request (rows are independent) is drawn, in row order, with numpy
    default_rng(seed) from Zipf(zipf) (or `popularity`) over ranks; rank r is "lora-r".
    """
    src, draw = Path(src), _popularity(num_adapters, zipf, popularity)
    rng = np.random.default_rng(seed)
    n, t0 = 0, None
    with src.open(newline="") as f, Path(dst).open("w") as out:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise TraceError(f"{src}:1: expected header TIMESTAMP,ContextTokens,GeneratedTokens, "
                             f"got {header}")
        for lineno, row in enumerate(reader, 2):
            if max_requests is not None and n >= max_requests:
                break
            try:
                t = _azure_time(row[0])
                n_in, n_out = int(row[1]), int(row[2])
            except (ValueError, IndexError) as e:
                raise TraceError(f"{src}:{lineno}: bad row {row!r} ({e})") from None
            t0 = t if t0 is None else t0
            _dump(out, {"id": f"az{n}", "arrival": max(0.0, (t - t0) * time_scale),
                        "adapter": f"lora-{draw(rng)}", "prompt_len": max(1, n_in),
                        "output_len": max(1, n_out)})
            n += 1
    return n


def _read_servegen(path: Path) -> list[tuple[float, float, str, float]]:
    rows = []
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            try:
                rows.append((float(row[1]), float(row[2]), row[3], float(row[4])))
            except (ValueError, IndexError) as e:
                raise TraceError(f"{path}:{lineno}: bad row {row!r} ({e})") from None
    return rows


def convert_servegen(src, dst, *, num_adapters: int, zipf: float = 0.0, seed: int,
                     max_requests: int | None = None, time_scale: float = 1.0,
                     rate: float = 4.0, start_window: int = 0, num_windows: int | None = None,
                     window_s: float = 600.0, system_len: tuple[int, int] = (100, 300),
                     user_mean: float = 600.0, answer_mean: float = 250.0,
                     length_sigma: float = 0.8, max_context: int = 4096) -> int:
    """ServeGen per-client rate windows (dir of chunk-<client>-trace.csv, or one file) ->
    our JSONL. Popularity comes from the data, so `zipf` is ignored.

    Clients: the `num_adapters` clients with the most requests over the whole file set
    (sum of window rates; ties by client number); the r-th is "lora-r". Windows
    start_window .. start_window + num_windows - 1 (default: all) are replayed, window w
    compressed to [ (w - start_window) * window_s * time_scale, ... + window_s * time_scale ).
    Rates: client c's rate in window w becomes rate_cw * rate / mean_w(sum_c rate_cw), so
    the kept clients together average `rate` req/s of compressed time while keeping
    their shares and diurnal shape (hot clients change over time: the drift).
    Arrivals: a renewal process per client and window whose inter-arrival times follow
    the window's pattern (Gamma or Weibull with the given shape, no pattern: exponential),
    rescaled to mean 1/rate; the first arrival is a uniform fraction of one gap in.
    Lengths (the per-window length PDFs are not in the snapshot): every adapter has a
    system prompt (prefix_id = adapter, prefix_len ~ uniform(system_len)); the user part
    ~ lognormal(user_mean, length_sigma), output ~ lognormal(answer_mean, length_sigma)
    (<= max_context / 4), clipped so prompt + output <= max_context. Randomness: numpy
    default_rng(seed); `max_requests` keeps the earliest arrivals.
    """
    if max_context - max_context // 4 - system_len[1] < 1:
        raise ValueError(f"max_context={max_context} is too small for system_len={system_len}")
    src = Path(src)
    files = sorted(src.glob("chunk-*-trace.csv")) if src.is_dir() else [src]
    if not files:
        raise TraceError(f"{src}: no chunk-*-trace.csv files")
    clients = {}
    for p in files:
        m = re.match(r"chunk-(\d+)-trace\.csv$", p.name)
        clients[int(m.group(1)) if m else len(clients)] = _read_servegen(p)
    ranked = sorted(clients, key=lambda c: (-sum(r[0] for r in clients[c]), c))[:num_adapters]
    if len(ranked) < num_adapters:
        raise ValueError(f"{src} has {len(ranked)} clients, fewer than num_adapters={num_adapters}")
    n_win = min(len(clients[c]) for c in ranked) - start_window
    n_win = n_win if num_windows is None else min(n_win, num_windows)
    if n_win <= 0:
        raise ValueError(f"no windows left after start_window={start_window}")
    win = [[clients[c][start_window + w] for w in range(n_win)] for c in ranked]
    mean_total = sum(r[0] for rows in win for r in rows) / n_win
    if mean_total <= 0:
        raise ValueError("the selected clients send no requests in the selected windows")
    scale, span = rate / mean_total, window_s * time_scale
    rng = np.random.default_rng(seed)
    arrivals: list[tuple[float, int]] = []
    for w in range(n_win):
        if max_requests is not None and len(arrivals) >= max_requests:
            break  # windows are processed in time order: later ones only add later arrivals
        for a, rows in enumerate(win):
            r, _cv, pattern, shape = rows[w]
            lam = r * scale
            t, end = w * span, (w + 1) * span
            first = True
            while lam > 0:
                if pattern == "Gamma" and shape > 0:
                    gap = rng.gamma(shape, 1.0 / shape)
                elif pattern == "Weibull" and shape > 0:
                    gap = rng.weibull(shape) / math.gamma(1.0 + 1.0 / shape)
                else:
                    gap = rng.exponential()
                gap /= lam
                t += gap * rng.random() if first else gap
                first = False
                if t >= end:
                    break
                arrivals.append((float(t), a))
    arrivals.sort()
    if max_requests is not None:
        del arrivals[max_requests:]
    sys_len = [int(rng.integers(system_len[0], system_len[1] + 1)) for _ in ranked]
    with Path(dst).open("w") as out:
        for i, (t, a) in enumerate(arrivals):
            n_out = lognormal_int(rng, answer_mean, length_sigma, 1, max(1, max_context // 4))
            user = lognormal_int(rng, user_mean, length_sigma, 1, max_context - n_out - sys_len[a])
            _dump(out, {"id": f"sg{i}", "arrival": t, "adapter": f"lora-{a}",
                        "prompt_len": sys_len[a] + user, "prefix_id": f"lora-{a}",
                        "prefix_len": sys_len[a], "output_len": n_out})
    return len(arrivals)


def alibaba_popularity(path, num_adapters: int) -> tuple[float, ...]:
    """Adapter weights from GenTD26 data_trace_processed.csv: the invocation counts of the
    `num_adapters` most used LoRA ids (every id in a request's lora_args counts once),
    most used first, normalised. Pass as `popularity=` to a converter or WorkloadSpec."""
    counts: Counter[str] = Counter()
    pat = re.compile(r"'modelVersionId':\s*'([^']+)'")
    with Path(path).open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if "lora_args" not in header:
            raise TraceError(f"{path}:1: no 'lora_args' column in header {header}")
        col = header.index("lora_args")
        for row in reader:
            if len(row) > col:
                counts.update(pat.findall(row[col]))
    top = [c for _, c in counts.most_common(num_adapters)]
    if len(top) < num_adapters:
        raise ValueError(f"{path} has {len(top)} distinct LoRA ids, fewer than {num_adapters}")
    total = sum(top)
    return tuple(c / total for c in top)


CONVERTERS = {"mooncake": convert_mooncake, "azure": convert_azure, "servegen": convert_servegen}


def convert_trace(kind: str, src, dst, *, num_adapters: int, zipf: float, seed: int,
                  max_requests: int | None = None, time_scale: float = 1.0, **options) -> int:
    """Convert a public trace of `kind` (mooncake, azure, servegen) into our JSONL at dst;
    returns the number of requests. `options` go to the converter (e.g. popularity=)."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown trace kind {kind!r}; expected one of {sorted(CONVERTERS)}")
    return CONVERTERS[kind](src, dst, num_adapters=num_adapters, zipf=zipf, seed=seed,
                            max_requests=max_requests, time_scale=time_scale, **options)
