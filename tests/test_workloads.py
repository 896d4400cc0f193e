"""Workload generators, the JSONL trace format and the public-trace converters."""

from __future__ import annotations

import json
import os
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from fastlibra.config import ConfigError
from fastlibra.traces import (
    TraceError,
    alibaba_popularity,
    convert_trace,
    load_trace,
    save_trace,
)
from fastlibra.workloads import GENERATORS, WorkloadSpec, iter_turns, make_workload

TRACES = Path(os.environ.get("FASTLIBRA_TRACES", "/work/shared/traces"))
MOONCAKE = TRACES / "mooncake-fast25" / "conversation_trace.jsonl"
AZURE = TRACES / "azure-llm-inference-2023" / "AzureLLMInferenceTrace_conv.csv"
SERVEGEN = TRACES / "servegen-bailian" / "language" / "m-large"
ALIBABA = TRACES / "alibaba-genai-lora-2026" / "data_trace_processed.csv"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fingerprint(reqs):
    return [(r.request_id, r.arrival, r.adapter, r.session, r.think_s, r.max_new_tokens,
             tuple(r.prompt), tuple(r.output or ())) for r in iter_turns(reqs)]


def spec(name: str, **kw) -> WorkloadSpec:
    kw.setdefault("duration", 120.0)
    kw.setdefault("rate", 0.5)
    return WorkloadSpec(name=name, **kw)


# -- generators ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", GENERATORS)
def test_deterministic_per_seed(name):
    a = make_workload(spec(name, seed=3))
    assert a and fingerprint(a) == fingerprint(make_workload(spec(name, seed=3)))
    b = make_workload(spec(name, seed=4))
    assert fingerprint(a) != fingerprint(b)
    assert [r.arrival for r in a] == sorted(r.arrival for r in a)
    for r in iter_turns(a):
        assert all(0 <= t < 32000 for t in r.prompt + r.output)
        assert r.max_new_tokens == len(r.output)


@pytest.mark.parametrize("name", ["chatbot", "translation", "agent"])
def test_zipf_skew(name):
    dur = 150.0 if name == "agent" else 300.0
    reqs = make_workload(spec(name, zipf=1.2, num_adapters=8, rate=2.0, duration=dur))
    counts = Counter(r.adapter for r in reqs)
    assert counts.most_common(1)[0][0] == "lora-0"
    assert counts["lora-0"] > 2 * counts["lora-7"]
    flat = make_workload(spec(name, zipf=0.0, num_adapters=8, rate=2.0, duration=dur))
    assert max(Counter(r.adapter for r in flat).values()) < counts["lora-0"]


def test_chatbot_turns_extend_prompt_and_answer():
    s = spec("chatbot", rate=1.0, num_adapters=4)
    reqs = make_workload(s)
    turns = [len(list(iter_turns([r]))) for r in reqs]
    assert max(turns) > 1 and max(turns) <= s.max_turns
    assert 2.5 < sum(turns) / len(turns) < 5.5
    for first in reqs:
        prev = first
        while prev.next_turn is not None:
            nxt = prev.next_turn
            done = prev.prompt + prev.output
            assert nxt.prompt[:len(done)] == done and len(nxt.prompt) > len(done)
            assert (nxt.adapter, nxt.session) == (first.adapter, first.session)
            assert prev.think_s >= 0
            assert len(nxt.prompt) + len(nxt.output) <= s.max_context
            prev = nxt
        assert prev.think_s == 0.0
    # Sessions of one adapter share exactly its system prompt; other adapters share nothing.
    by = {}
    for r in reqs:
        by.setdefault(r.adapter, []).append(r.prompt)
    for prompts in by.values():
        shared = {common_prefix(a, b) for a, b in zip(prompts, prompts[1:], strict=False)}
        assert len(shared) <= 1 and all(100 <= n <= 300 for n in shared)
    heads = [p[0][:2] for p in by.values()]
    assert len(set(map(tuple, heads))) == len(heads)


def test_translation_shares_instruction_prefix():
    reqs = make_workload(spec("translation", rate=2.0, num_adapters=4))
    by = {}
    for r in reqs:
        assert r.next_turn is None
        by.setdefault(r.adapter, []).append(r)
    for rs in by.values():
        shared = min(common_prefix(rs[0].prompt, r.prompt) for r in rs[1:])
        assert 200 <= shared <= 500
        assert all(50 <= len(r.prompt) - shared <= 150 for r in rs)
    firsts = [rs[0].prompt for rs in by.values()]
    assert all(common_prefix(a, b) <= 1 for a in firsts for b in firsts if a is not b)


def test_agent_context_shared_per_user():
    s = spec("agent", rate=0.2, num_adapters=4, duration=200.0)
    reqs = make_workload(s)
    ctx = {}
    for first in reqs:
        steps = list(iter_turns([first]))
        assert 1 <= len(steps) <= 8
        for a, b in zip(steps, steps[1:], strict=False):
            assert b.prompt[:len(a.prompt) + len(a.output)] == a.prompt + a.output
            assert 1.0 <= a.think_s <= 3.0
        for r in steps:
            ctx.setdefault(r.adapter, []).append(r.prompt)
    assert any(len(p) > 1 for p in ctx.values())
    for prompts in ctx.values():
        shared = min(common_prefix(prompts[0], p) for p in prompts)
        assert 2000 <= shared
        assert shared <= 6000 or len({len(p) for p in prompts}) == 1


def test_drift_hot_set_changes():
    s = spec("drift", num_adapters=16, zipf=1.2, rate=2.0, duration=400.0)
    reqs = make_workload(s)
    q1 = Counter(r.adapter for r in reqs if r.arrival < 100)
    q4 = Counter(r.adapter for r in reqs if r.arrival >= 300)
    assert q1.most_common(1)[0][0] == "lora-0" and q4.most_common(1)[0][0] == "lora-12"
    top1 = {a for a, _ in q1.most_common(3)}
    top4 = {a for a, _ in q4.most_common(3)}
    assert not top1 & top4


def test_agent_drift_moves_the_busiest_user():
    drift, plain = (make_workload(spec(name, num_adapters=16, zipf=1.2, rate=0.5,
                                       duration=400.0)) for name in ("agent-drift", "agent"))
    # the same bursts; in the first phase the same users, in the last shifted by 12
    assert [r.arrival for r in drift] == [r.arrival for r in plain]
    assert [r.adapter for r in drift if r.arrival < 100] == \
        [r.adapter for r in plain if r.arrival < 100]
    last = [(Counter(r.adapter for r in reqs if r.arrival >= 300).most_common(1)[0][0])
            for reqs in (drift, plain)]
    assert last == ["lora-12", "lora-0"]


@pytest.mark.parametrize("kw, msg", [
    ({"name": "chat"}, "name must be one of"),
    ({"num_adapters": 0}, "num_adapters"),
    ({"rate": 0.0}, "rate"),
    ({"zipf": -1.0}, "zipf"),
    ({"popularity": (1.0, 2.0)}, "popularity has 2 weights"),
    ({"max_context": 1000}, "max_context=1000"),
    ({"user_len": (10, 5)}, "user_len"),
    ({"num_adapters": True}, "num_adapters must be an int"),
])
def test_spec_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        WorkloadSpec(**kw)


# -- JSONL format ---------------------------------------------------------------------------

def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_jsonl_round_trip(tmp_path):
    reqs = make_workload(spec("chatbot", duration=60.0, rate=0.5, num_adapters=3))
    n = save_trace(reqs, tmp_path / "t.jsonl")
    assert n == len(list(iter_turns(reqs)))
    back = load_trace(tmp_path / "t.jsonl", closed_loop=True)
    assert fingerprint(back) == fingerprint(reqs)
    flat = load_trace(tmp_path / "t.jsonl")
    assert len(flat) == n and all(r.next_turn is None for r in flat)


def test_generated_prompt_modes(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [
        {"arrival": 1.0, "adapter": "a", "prompt_len": 50, "prefix_id": "sys", "prefix_len": 30,
         "output_len": 5, "id": "x", "session": "s"},
        {"arrival": 0.5, "adapter": "a", "prompt_len": 40, "prefix_id": "sys", "prefix_len": 30,
         "output_len": 5},
        {"arrival": 2.0, "adapter": "a", "prompt_len": 70, "parent": "x", "output_len": 3},
        {"arrival": 3.0, "prompt_len": 20, "hash_ids": [7, 8], "block_size": 16, "output_len": 1},
        {"arrival": 4.0, "prompt_len": 40, "hash_ids": [7, 8, 9], "block_size": 16,
         "output_len": 2},
        {"arrival": 5.0, "adapter": None, "prompt": [1, 2, 3], "output": [4, 5]},
    ])
    r = {x.request_id: x for x in load_trace(p)}
    assert [x.request_id for x in load_trace(p)][:2] == ["L2", "x"]  # sorted by arrival
    assert common_prefix(r["x"].prompt, r["L2"].prompt) == 30
    assert r["L3"].prompt[:55] == r["x"].prompt + r["x"].output and len(r["L3"].prompt) == 70
    assert r["L3"].session == "s"
    assert len(r["L4"].prompt) == 20 and len(r["L5"].prompt) == 40
    assert common_prefix(r["L4"].prompt, r["L5"].prompt) == 20
    assert (r["L6"].prompt, r["L6"].output, r["L6"].adapter) == ([1, 2, 3], [4, 5], None)
    assert fingerprint(load_trace(p)) == fingerprint(load_trace(p))
    assert fingerprint(load_trace(p, seed=1)) != fingerprint(load_trace(p))


GOOD = {"arrival": 0.0, "adapter": "lora-0", "prompt_len": 8, "output_len": 4}


@pytest.mark.parametrize("bad, msg", [
    ('{"arrival": 1.0, "prompt_len": 8,', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"prompt_len": 8, "output_len": 4}, "missing key 'arrival'"),
    ({"arrival": "soon", "prompt_len": 8, "output_len": 4}, "'arrival' must be a finite number"),
    ({"arrival": -1, "prompt_len": 8, "output_len": 4}, "'arrival' must be >= 0"),
    ({"arrival": 1, "prompt_len": 8, "output_len": -3}, "'output_len' must be >= 1"),
    ({"arrival": 1, "prompt_len": -8, "output_len": 3}, "'prompt_len' must be >= 1"),
    ({"arrival": 1, "prompt_len": 8.5, "output_len": 3}, "'prompt_len' must be an integer"),
    ({"arrival": 1, "prompt_len": True, "output_len": 3}, "'prompt_len' must be an integer"),
    ({"arrival": 1, "prompt_len": 8}, "missing key 'output_len'"),
    ({"arrival": 1, "output_len": 3}, "exactly one of 'prompt' and 'prompt_len'"),
    ({"arrival": 1, "prompt": [1], "prompt_len": 1, "output_len": 3}, "exactly one of"),
    ({"arrival": 1, "prompt": [1, 99999], "output_len": 3}, "'prompt' holds 99999"),
    ({"arrival": 1, "prompt": [], "output_len": 3}, "non-empty list"),
    ({"arrival": 1, "adapter": 3, "prompt_len": 8, "output_len": 3}, "'adapter' must be"),
    ({"arrival": 1, "prompt_len": 8, "output_len": 3, "lenght": 2}, "unknown key"),
    ({"arrival": 1, "prompt_len": 8, "output_len": 3, "prefix_id": "p"},
     "missing key 'prefix_len'"),
    ({"arrival": 1, "prompt_len": 2000, "output_len": 3, "hash_ids": [1, 2]}, "exceeds 2 hash_ids"),
    ({"arrival": 1, "prompt_len": 8, "output_len": 3, "parent": "nope"}, "parent 'nope'"),
    ({"arrival": 1, "prompt_len": 8, "output_len": 3, "id": "a"}, "duplicate id 'a'"),
    ({"arrival": 1, "prompt": [1], "output": [2, 3], "output_len": 3}, "'output_len' 3 != len"),
])
def test_malformed_line_names_line_number(tmp_path, bad, msg):
    p = write_lines(tmp_path / "bad.jsonl", [dict(GOOD, id="a"), "", bad, GOOD])
    with pytest.raises(TraceError, match=msg) as e:
        load_trace(p)
    assert str(e.value).startswith(f"{p}:3: ")


# -- converters on the real traces ----------------------------------------------------------

def test_mooncake_conversion_sessions(tmp_path):
    src = tmp_path / "head.jsonl"
    with need(MOONCAKE).open() as f:
        src.write_text("".join(islice(f, 500)))
    dst = tmp_path / "mc.jsonl"
    assert convert_trace("mooncake", src, dst, num_adapters=8, zipf=1.0, seed=0) == 500
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    raw = [json.loads(x) for x in src.read_text().splitlines()]
    reqs = {r.request_id: r for r in load_trace(dst)}
    assert len(reqs) == 500
    sessions = Counter(x["session"] for x in lines)
    assert sum(1 for n in sessions.values() if n > 1) >= 20
    adapter_of = {}
    n_child = 0
    for x, src_row in zip(lines, raw, strict=True):
        assert x["prompt_len"] == src_row["input_length"] and x["hash_ids"] == src_row["hash_ids"]
        assert adapter_of.setdefault(x["session"], x["adapter"]) == x["adapter"]
        r = reqs[x["id"]]
        assert len(r.prompt) == x["prompt_len"]
        if "parent" in x:
            n_child += 1
            p = reqs[x["parent"]]
            full = (len(p.prompt) // 512) * 512
            assert full >= 1024 and r.prompt[:full] == p.prompt[:full]
            done = (p.prompt + p.output)[:len(r.prompt)]
            assert r.prompt[:len(done)] == done  # the next turn extends prompt + answer
    assert n_child >= 40
    # Every conversation request starts with block 0: the same 512 tokens everywhere.
    heads = {tuple(r.prompt[:512]) for r in reqs.values()}
    assert len(heads) == 1
    # Requests sharing k leading hash ids share at least k * 512 tokens.
    a, b = lines[0], lines[1]
    k = common_prefix(a["hash_ids"], b["hash_ids"])
    assert common_prefix(reqs[a["id"]].prompt, reqs[b["id"]].prompt) >= k * 512
    adapters = Counter(adapter_of.values())
    assert adapters.most_common(1)[0][0] == "lora-0"


def test_azure_conversion(tmp_path):
    dst = tmp_path / "az.jsonl"
    n = convert_trace("azure", need(AZURE), dst, num_adapters=4, zipf=1.0, seed=0,
                      max_requests=300, time_scale=0.5)
    assert n == 300
    rows = [x.split(",") for x in AZURE.read_text().splitlines()[1:301]]
    reqs = load_trace(dst)
    by = {r.request_id: r for r in reqs}
    assert reqs[0].arrival == 0.0
    for i, row in enumerate(rows):
        r = by[f"az{i}"]
        assert (len(r.prompt), r.max_new_tokens) == (int(row[1]), int(row[2]))
    span = reqs[-1].arrival
    assert 0.5 * 50 < span < 0.5 * 120  # 300 conv requests are about 54 s of trace
    counts = Counter(r.adapter for r in reqs)
    assert counts.most_common(1)[0][0] == "lora-0"
    assert max(common_prefix(a.prompt, b.prompt) for a, b in zip(reqs, reqs[1:], strict=False)) <= 1


def test_servegen_conversion_drifts(tmp_path):
    dst = tmp_path / "sg.jsonl"
    n = convert_trace("servegen", need(SERVEGEN), dst, num_adapters=16, zipf=0.0, seed=0,
                      time_scale=0.01, num_windows=144, rate=3.0)
    reqs = load_trace(dst)
    assert n == len(reqs) and 0.5 * 3.0 * 864 < n < 2 * 3.0 * 864
    assert 0 <= reqs[0].arrival and reqs[-1].arrival < 864
    per_half = [Counter(r.adapter for r in reqs if (r.arrival < 432) == first) for first in (1, 0)]
    shares = [{a: c / sum(h.values()) for a, c in h.items()} for h in per_half]
    assert max(abs(shares[0].get(a, 0) - shares[1].get(a, 0)) for a in shares[0]) > 0.02
    by = {}
    for r in reqs:
        by.setdefault(r.adapter, []).append(r.prompt)
    for prompts in by.values():
        assert min(common_prefix(prompts[0], p) for p in prompts) >= 100
    capped = convert_trace("servegen", SERVEGEN / "chunk-0-trace.csv", dst, num_adapters=1,
                           zipf=0.0, seed=0, time_scale=0.01, max_requests=50)
    assert capped == 50


def test_alibaba_popularity_feeds_a_workload():
    w = alibaba_popularity(need(ALIBABA), 32)
    assert len(w) == 32 and abs(sum(w) - 1) < 1e-9 and list(w) == sorted(w, reverse=True)
    reqs = make_workload(spec("translation", num_adapters=32, popularity=w, rate=2.0))
    assert Counter(r.adapter for r in reqs).most_common(1)[0][0] == "lora-0"


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown trace kind"):
        convert_trace("burstgpt", tmp_path / "x", tmp_path / "y", num_adapters=1, zipf=1.0, seed=0)
