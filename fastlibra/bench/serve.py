"""`fastlibra bench serve`: replay a multi-turn multi-adapter workload against any
OpenAI-compatible server (`fastlibra serve`, vLLM, SGLang) over HTTP and measure what a
client sees, so engines can be compared on the same machine with the same requests.

    models     GET /v1/models: the base is `--model` or the first id; the workload's
               adapters go to `--adapters` or, by default, every other listed id. Rule:
               workload adapter "lora-i" -> served[i mod len(served)], None -> the base
               (the base id may be listed in --adapters to give it a share)
    requests   POST /v1/completions, stream, include_usage, temperature 0, ignore_eos,
               max_tokens = the turn's answer length
    prompts    workload token ids t (drawn in [0, --vocab)) become id
               first + t mod (vocab - first), with first = --first-word, so no special
               token is sent; `words` sends them as text, `--word-format` per id
               (default "w{:03d}": the word-level vocab w003..w127 of our tiny test
               models), `ids` sends the id list
    sessions   first turns are sent at their arrival times (open loop); turn k+1 is sent
               think_s after turn k finished (closed loop), with prompt = turn k's prompt
               + its answer + the new user message. The answer is the text the server
               returned (`words`) or, since the API returns no token ids, the workload's
               scripted answer ids (`ids`: the reused prefix ends at turn k's prompt)
    measured   TTFT = send -> first chunk carrying text; TPOT = (last token - first
               token) / (usage.completion_tokens - 1); E2E = send -> end of stream;
               cached prompt tokens from usage.prompt_tokens_details.cached_tokens;
               a turn waiting for a --max-concurrency slot is not yet sent

An error (HTTP status other than 200, an error object in the stream, a broken
connection) ends its session: its follow-ups need its answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import httpx

from fastlibra.bench.report import run_facts, write_json
from fastlibra.engine.request import Request
from fastlibra.workloads import iter_turns, make_workload, session_spec

PROGRESS_S = 5.0
DEFAULT_CONTEXT = 4096  # when the server does not report max_model_len


def _status(msg: str) -> None:
    print(f"[bench serve] {msg}", file=sys.stderr, flush=True)


# -- what to send ----------------------------------------------------------------------
@dataclass(frozen=True)
class Prompts:
    """Workload token ids as prompts the server can read (module docstring, `prompts`)."""

    format: str
    vocab: int
    first_word: int
    word_format: str

    def __post_init__(self) -> None:
        if self.format not in ("words", "ids"):
            raise ValueError(f"--prompt-format must be words or ids, got {self.format!r}")
        if not 0 <= self.first_word < self.vocab:
            raise ValueError(f"--first-word {self.first_word} must be in [0, --vocab "
                             f"{self.vocab})")
        try:
            self.word_format.format(self.first_word)
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"--word-format {self.word_format!r} cannot format a token id "
                             f"({e}); use e.g. 'w{{:03d}}'") from None

    def ids(self, tokens: list[int]) -> list[int]:
        span = self.vocab - self.first_word
        return [self.first_word + t % span for t in tokens]

    def first(self, tokens: list[int]) -> str | list[int]:
        ids = self.ids(tokens)
        return ids if self.format == "ids" else " ".join(map(self.word_format.format, ids))

    def follow_up(self, prompt: str | list[int], answer: str, scripted: list[int],
                  user: list[int]) -> str | list[int]:
        if self.format == "ids":
            return prompt + self.ids(scripted) + self.ids(user)
        if answer:
            prompt += answer if answer[:1].isspace() else " " + answer
        return f"{prompt} {self.first(user)}" if user else prompt


def resolve_models(listing: dict, model: str | None,
                   adapters: list[str] | None) -> tuple[str, list[str]]:
    """(base id, served adapter ids) from a GET /v1/models body and the flags."""
    ids = [m["id"] for m in listing.get("data", []) if isinstance(m, dict) and "id" in m]
    if model is None and not ids:
        raise ValueError("GET /v1/models lists no model; pass --model NAME")
    base = model or ids[0]
    if adapters is None:
        return base, [i for i in ids if i != base]
    unknown = [a for a in adapters if a not in ids and a != base]
    if ids and unknown:
        raise ValueError(f"--adapters {', '.join(unknown)}: not served (GET /v1/models "
                         f"lists {', '.join(ids)})")
    return base, list(adapters)


def model_for(adapter: str | None, base: str, served: list[str]) -> str:
    """The module docstring's rule: "lora-i" -> served[i mod len(served)], None -> base."""
    if adapter is None or not served:
        return base
    return served[int(adapter.rsplit("-", 1)[1]) % len(served)]


# -- one request -----------------------------------------------------------------------
@dataclass
class Record:
    """One turn as the client saw it; times in seconds from the start of the run."""

    id: str
    session: str | None
    model: str
    adapter: str | None
    due: float
    sent: float
    status: int | str = 200
    """HTTP status, "stream" (an error object or a malformed chunk in the stream) or
    "connection" (refused, reset, timed out)."""
    error: str | None = None
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None


async def _send(client: httpx.AsyncClient, body: dict, rec: Record,
                t0: float) -> tuple[Record, str]:
    """POST one streaming completion; fill `rec`, return it and the answer's text."""
    start = time.perf_counter()
    rec.sent = start - t0
    text: list[str] = []
    first = last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.status = resp.status_code
                rec.error = (await resp.aread()).decode(errors="replace")[:500]
                return rec, ""
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    rec.status, rec.error = "stream", f"not JSON: {data[:300]}"
                    return rec, ""
                if "error" in chunk:
                    rec.status, rec.error = "stream", json.dumps(chunk["error"])[:500]
                    return rec, ""
                for choice in chunk.get("choices") or ():
                    if choice.get("text"):
                        text.append(choice["text"])
                        first = first if first is not None else now
                        last = now
                    elif choice.get("finish_reason") and first is not None:
                        last = now
                usage = chunk.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.output_tokens = usage.get("completion_tokens")
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                        "cached_tokens")
    except httpx.TransportError as e:
        rec.status, rec.error = "connection", f"{type(e).__name__}: {e}"
        return rec, ""
    end = time.perf_counter()
    rec.e2e = end - start
    if first is not None:
        rec.ttft = first - start
        if rec.output_tokens and rec.output_tokens > 1:
            rec.tpot = (last - first) / (rec.output_tokens - 1)
    return rec, "".join(text)


# -- the run ---------------------------------------------------------------------------
class Run:
    """Sessions replayed in real time; counters for the progress line."""

    def __init__(self, client: httpx.AsyncClient, prompts: Prompts, base: str,
                 served: list[str], max_concurrency: int | None) -> None:
        self.client, self.prompts, self.base, self.served = client, prompts, base, served
        self.slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.records: list[Record] = []
        self.sent = self.in_flight = self.errors = 0
        self.t0 = 0.0

    async def session(self, turn: Request) -> None:
        prompt = self.prompts.first(turn.prompt)
        due = turn.arrival
        while True:
            await asyncio.sleep(max(0.0, due - (time.perf_counter() - self.t0)))
            rec, answer = await self.request(turn, prompt, due)
            nxt = turn.next_turn
            if rec.error is not None or nxt is None:
                return
            scripted = turn.output or []
            user = nxt.prompt[len(turn.prompt) + len(scripted):]
            prompt = self.prompts.follow_up(prompt, answer, scripted, user)
            due = time.perf_counter() - self.t0 + turn.think_s
            turn = nxt

    async def request(self, turn: Request, prompt, due: float) -> tuple[Record, str]:
        model = model_for(turn.adapter, self.base, self.served)
        body = {"model": model, "prompt": prompt, "max_tokens": turn.max_new_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        rec = Record(turn.request_id, turn.session, model, turn.adapter, due, due)
        if self.slots is not None:
            await self.slots.acquire()
        self.sent += 1
        self.in_flight += 1
        try:
            rec, answer = await _send(self.client, body, rec, self.t0)
        finally:
            self.in_flight -= 1
            if self.slots is not None:
                self.slots.release()
        self.errors += rec.error is not None
        self.records.append(rec)
        return rec, answer

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            _status(f"t={time.perf_counter() - self.t0:.0f} s: sent {self.sent}, done "
                    f"{len(self.records)}, in flight {self.in_flight}, errors {self.errors}")

    async def run(self, firsts: list[Request]) -> float:
        """Every session to its end; the wall seconds it took."""
        self.t0 = time.perf_counter()
        reporter = asyncio.ensure_future(self.progress())
        try:
            await asyncio.gather(*(self.session(r) for r in firsts))
        finally:
            reporter.cancel()
        return time.perf_counter() - self.t0


async def _list_models(client: httpx.AsyncClient, url: str) -> dict:
    """GET /v1/models, or a ValueError saying why the server cannot be used."""
    try:
        resp = await client.get("/v1/models")
    except httpx.TransportError as e:
        raise ValueError(f"cannot reach {url} ({type(e).__name__}: {e}); is the server "
                         "running there?") from None
    if resp.status_code != 200:
        raise ValueError(f"GET {url}/v1/models answered {resp.status_code}: "
                         f"{resp.text[:300]}")
    try:
        return resp.json()
    except json.JSONDecodeError:
        raise ValueError(f"GET {url}/v1/models did not answer JSON: {resp.text[:300]}") from None


async def _bench(args, prompts: Prompts) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency,
                          max_keepalive_connections=args.max_concurrency)
    timeout = httpx.Timeout(connect=10.0, read=args.timeout, write=args.timeout, pool=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=timeout) as client:
        listing = await _list_models(client, args.url)
        base, served = resolve_models(listing, args.model, args.adapters)
        context = args.max_context or next(
            (m["max_model_len"] for m in listing.get("data", [])
             if m.get("id") == base and m.get("max_model_len")), DEFAULT_CONTEXT)
        firsts = make_workload(session_spec(args, name=args.workload,
                                            num_adapters=args.num_adapters,
                                            max_context=context))
        turns = sum(1 for _ in iter_turns(firsts))
        _status(f"{args.url}: base {base!r}, adapters {', '.join(served) or '(none)'}; "
                f"{len(firsts)} sessions, {turns} turns, max context {context}")
        run = Run(client, prompts, base, served, args.max_concurrency)
        wall = await run.run(firsts)
    return {"base": base, "adapters": served, "max_context": context, "turns": turns,
            "wall_s": wall, "records": run.records}


# -- the numbers -----------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values (JSON has no nan)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(records: list[Record], wall: float) -> dict:
    ok = [r for r in records if r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    ttft = [1e3 * r.ttft for r in ok if r.ttft is not None]
    tpot = [1e3 * r.tpot for r in ok if r.tpot is not None]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    return {
        "requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
        "errors_by_status": errors, "wall_s": wall,
        "ttft_mean_ms": _mean(ttft), "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p90_ms": _pct(ttft, 90), "ttft_p99_ms": _pct(ttft, 99),
        "tpot_mean_ms": _mean(tpot), "tpot_p50_ms": _pct(tpot, 50),
        "tpot_p99_ms": _pct(tpot, 99),
        "e2e_mean_ms": _mean([1e3 * r.e2e for r in ok if r.e2e is not None]),
        "request_throughput": len(ok) / wall,
        "output_throughput": out_tokens / wall,
        "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "cached_tokens": cached,
        "cached_fraction": cached / prompt_tokens if prompt_tokens else 0.0,
    }


def _fmt(values, digits: int) -> str:
    return " / ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def table(s: dict) -> str:
    rows = [
        ("requests (completed / errors)", f"{s['completed']} / {s['errors']}"
         + (f"  {s['errors_by_status']}" if s["errors"] else "")),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("TTFT mean / p50 / p90 / p99", _fmt([s["ttft_mean_ms"], s["ttft_p50_ms"],
                                               s["ttft_p90_ms"], s["ttft_p99_ms"]], 1) + " ms"),
        ("TPOT mean / p50 / p99", _fmt([s["tpot_mean_ms"], s["tpot_p50_ms"],
                                         s["tpot_p99_ms"]], 2) + " ms"),
        ("E2E mean", _fmt([s["e2e_mean_ms"]], 1) + " ms"),
        ("throughput", f"{s['request_throughput']:.2f} req/s, "
         f"{s['output_throughput']:.1f} output tok/s"),
        ("cached prompt tokens", f"{s['cached_tokens']} of {s['prompt_tokens']} "
         f"({100 * s['cached_fraction']:.1f} %)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_serve_bench(args) -> int:
    prompts = Prompts(args.prompt_format, args.vocab, args.first_word, args.word_format)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    res = asyncio.run(_bench(args, prompts))
    summary = summarize(res["records"], res["wall_s"])
    print(f"bench serve: {args.url} ({args.workload}, {args.num_adapters} workload adapters "
          f"-> {', '.join(res['adapters']) or res['base']}; {res['turns']} turns)")
    print(table(summary))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("command", "bench",
                                                                   "api_key")}
        write_json(args.json, {
            "config": config, "base": res["base"], "adapters": res["adapters"],
            "max_context": res["max_context"], "summary": summary, "machine": run_facts(),
            "requests": [asdict(r) for r in res["records"]]})
    return 0
