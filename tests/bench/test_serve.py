"""`fastlibra bench serve` against our live server on loopback (tiny-llama with adapters
a and b): a short multi-turn run, the adapter rule, and an unreachable URL."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from liveserver import MODEL_NAME, live_server

from fastlibra.bench.serve import Prompts, model_for, resolve_models
from fastlibra.cli import main

torch.set_num_threads(1)

LISTING = {"data": [{"id": MODEL_NAME, "max_model_len": 256}, {"id": "a"}, {"id": "b"}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # room for every session's KV on the device, so follow-ups find their history
    with live_server(tmp_path_factory, device_memory=4 << 20, host_memory=4 << 20) as s:
        yield s


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    """One 2.5 s run over a, b and the base; (JSON result, adapters the engine served)."""
    served: list[str | None] = []
    server.engine.on_finish.append(lambda out: served.append(out.adapter))
    path = tmp_path_factory.mktemp("bench") / "serve.json"
    code = main(["bench", "serve", "--url", server.url, "--duration", "2.5", "--rate", "3",
                 "--num-adapters", "3", "--adapters", f"a,b,{MODEL_NAME}", "--think", "0.1",
                 "--mean-turns", "3", "--system-len", "24", "--user-len", "8",
                 "--answer-len", "4", "--seed", "1", "--json", str(path)])
    assert code == 0
    server.wait_idle()
    return json.loads(path.read_text()), served


def test_run_completes_without_errors(run):
    res, _ = run
    s = res["summary"]
    assert s["errors"] == 0 and s["errors_by_status"] == {}
    assert s["requests"] == s["completed"] == len(res["requests"]) > 0
    assert all(r["ttft"] > 0 and r["e2e"] >= r["ttft"] for r in res["requests"])
    assert all(r["output_tokens"] > 0 for r in res["requests"])
    for key in ("ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_mean_ms",
                "tpot_p50_ms", "tpot_p99_ms", "e2e_mean_ms", "request_throughput",
                "output_throughput", "cached_tokens", "wall_s"):
        assert s[key] > 0, key
    assert {"machine", "config", "base", "adapters"} <= res.keys()
    assert res["machine"]["cpu_count"] >= 1
    assert res["base"] == MODEL_NAME and res["adapters"] == ["a", "b", MODEL_NAME]


def test_requests_spread_over_base_and_adapters(run):
    res, served = run
    # lora-0 -> a, lora-1 -> b, lora-2 -> the base (adapter None in the engine)
    assert set(served) == {"a", "b", None}
    assert sorted(served, key=str) == sorted(
        (None if r["model"] == MODEL_NAME else r["model"] for r in res["requests"]), key=str)
    assert {r["model"] for r in res["requests"]} == {"a", "b", MODEL_NAME}


def test_follow_ups_reuse_their_history(run):
    res, _ = run
    follow_ups = [r for r in res["requests"] if not r["id"].endswith("-0")]
    assert follow_ups
    # a follow-up's prompt starts with its previous turn's prompt and answer, whose KV
    # the device kept: more cached tokens than the shared system prompt alone could give
    assert max(r["cached_tokens"] for r in follow_ups) > 36


def test_refused_requests_are_counted_by_status(server, tmp_path, capsys):
    # "ghost" as the base and the only adapter: every first turn is answered 404 and
    # ends its session
    path = tmp_path / "ghost.json"
    assert main(["bench", "serve", "--url", server.url, "--model", "ghost", "--adapters",
                 "ghost", "--duration", "1", "--rate", "5", "--seed", "2",
                 "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    s = res["summary"]
    assert s["requests"] == s["errors"] == s["errors_by_status"]["404"] > 0
    assert s["completed"] == 0 and s["ttft_mean_ms"] is None
    assert all(r["id"].endswith("-0") and "ghost" in r["error"] for r in res["requests"])
    assert "{'404': " in capsys.readouterr().out


def test_adapter_rule():
    base, served = resolve_models(LISTING, None, None)
    assert (base, served) == (MODEL_NAME, ["a", "b"])
    assert [model_for(f"lora-{i}", base, served) for i in range(5)] == ["a", "b", "a", "b", "a"]
    assert model_for(None, base, served) == MODEL_NAME
    assert resolve_models(LISTING, "a", None) == ("a", [MODEL_NAME, "b"])
    with pytest.raises(ValueError, match="--adapters c: not served"):
        resolve_models(LISTING, None, ["a", "c"])


def test_prompts_avoid_special_tokens():
    words = Prompts("words", vocab=128, first_word=3, word_format="w{:03d}")
    assert words.first([0, 2, 124, 125, 200]) == "w003 w005 w127 w003 w078"
    assert words.follow_up("w003", " w009 w010", [7], [1]) == "w003 w009 w010 w004"
    ids = Prompts("ids", vocab=128, first_word=3, word_format="w{:03d}")
    assert ids.follow_up([3], "ignored", [7], [1]) == [3, 10, 4]
    with pytest.raises(ValueError, match="--word-format"):
        Prompts("words", vocab=128, first_word=3, word_format="w{name}")


def test_unreachable_server_is_a_clear_error(capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on it now
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--duration", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot reach http://127.0.0.1:{port}" in err and "is the server running" in err
