"""`fastlibra serve --replicas 2` on a local Ray cluster, CPU only: the tiny served model
(liveserver.py) on two replicas behind the ingress, exercised with the official openai
client and raw HTTP, and compared with a single in-process server and engine."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace

import httpx
import openai
import pytest
import ray
from liveserver import MODEL_NAME, LiveServer, adapter_root, served_setup
from ray import serve

from fastlibra.llm import LLM
from fastlibra.model.sampling import SamplingParams
from fastlibra.server import ServerConfig
from fastlibra.server.cluster import (
    REPLICA,
    REPLICA_HEADER,
    ClusterConfig,
    ClusterServer,
    merge_metrics,
    prompt_tokens,
    start_ray,
)

KEY = "sk-cluster-test"
APP = "fastlibra-test"
pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_cfg(tmp_path_factory) -> ServerConfig:
    base, adapters, _ = served_setup(tmp_path_factory)
    return ServerConfig(base, dict(adapters), served_model_name=MODEL_NAME,
                        device_memory=256 * 1024, host_memory=256 * 1024, dtype="float32",
                        device="cpu", block_size=4, api_key=KEY,
                        adapter_roots=(adapter_root(tmp_path_factory),))


@pytest.fixture(scope="module")
def ray_serve(server_cfg):
    """A local Ray cluster with Serve's proxy on a free port, for the whole module."""
    cfg = ClusterConfig(replace(server_cfg, port=_free_port()), replicas=2, replica_cpus=0.5,
                        routing_stats_period_s=0.5, app_name=APP, ingress="ray")
    start_ray(cfg)
    try:
        yield cfg
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_serve):
    """Two replicas behind the ingress in this process (the default), the fastlibra
    router, residency published every half second."""
    cfg = replace(ray_serve, ingress="local", server=replace(ray_serve.server,
                                                             port=_free_port()))
    server = ClusterServer(cfg).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_the_ray_ingress_serves_the_same_api_behind_rays_proxy(ray_serve):
    cfg = replace(ray_serve, ingress="ray", app_name=f"{APP}-ray")
    server = ClusterServer(cfg).start()
    try:
        c = client(server.url)
        out = c.completions.create(model="a", prompt="w003 w004", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
        stream = c.completions.create(model="b", prompt="w005", max_tokens=3, stream=True,
                                    temperature=0, extra_body={"ignore_eos": True})
        assert sum(1 for ch in stream if ch.choices and ch.choices[0].text) == 3
        r = post(server.url, "/v1/load_lora_adapter", {"lora_name": "lx", "lora_path": "dyn"})
        assert r.status_code == 200 and len(tiers(server.url)["lx"]) == 2
    finally:
        server.stop()


@pytest.fixture(scope="module")
def single(server_cfg):
    """The same settings as one in-process server: what the cluster must match."""
    server = LiveServer(server_cfg).start()
    try:
        yield server
    finally:
        server.stop()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, timeout=60,
                      headers=headers | {"content-type": "application/json"}, **kw)


def tiers(url: str) -> dict[str, set[str]]:
    """adapter -> the replicas whose /metrics list it in some tier."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("fastlibra:lora_adapter_tier{") and line.endswith(" 1.0"):
            labels = dict(p.split("=", 1) for p in line[line.index("{") + 1:
                                                         line.index("}")].split(","))
            out.setdefault(labels["adapter"].strip('"'), set()).add(
                labels["replica"].strip('"'))
    return out


def answer(url: str, model: str) -> str:
    """Two greedy tokens past EOS, so a served request always has text."""
    return client(url).completions.create(model=model, prompt="w003", max_tokens=2,
                                          temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


# -- the OpenAI surface ----------------------------------------------------------------
def test_the_openai_client_streams_and_completes_through_the_ingress(cluster):
    c = client(cluster)
    assert {m.id for m in c.models.list().data} >= {MODEL_NAME, "a", "b"}
    out = c.completions.create(model="a", prompt="w003 w004 w005", max_tokens=6,
                               temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    chunks = list(c.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "w007 w008"}], max_tokens=5,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) == 5 and chunks[-1].usage.completion_tokens == 5


def test_greedy_output_equals_a_single_engines(cluster, server_cfg):
    llm = LLM(server_cfg.model_dir, dict(server_cfg.adapters), dtype="float32", device="cpu",
              block_size=4, device_memory=256 * 1024, host_memory=256 * 1024)
    prompt = "w010 w011 w012 w013"
    for adapter in (None, "a", "b"):
        (want,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8),
                               adapter=adapter)
        for _ in range(3):  # whichever replica serves it
            got = client(cluster).completions.create(
                model=adapter or MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
            assert got.choices[0].text == want.text


def test_bad_input_gets_the_single_servers_errors(cluster, single):
    single_url = single.url
    cases = [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", {"prompt": "w003"}),
        ("/v1/completions", {"model": "nope", "prompt": "w003"}),
        ("/v1/completions", {"model": "a", "prompt": "w003", "n": 0}),
        ("/v1/chat/completions", {"model": "a", "messages": []}),
        ("/v1/completions", {"model": "a", "prompt": [99999]}),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../a"}),
        ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}),
    ]
    for path, body in cases:
        want, got = post(single_url, path, body), post(cluster, path, body)
        assert (got.status_code, got.json()) == (want.status_code, want.json()), (path, body)
    assert post(cluster, "/v1/completions", {"model": "a", "prompt": "w003"},
                key="wrong").status_code == 401
    huge = b" " * (single.cfg.max_request_bytes + 1)
    assert post(cluster, "/v1/completions", huge).status_code == 413


# -- adapters across replicas ----------------------------------------------------------
def test_an_adapter_load_and_unload_reach_every_replica(cluster):
    replicas = wait_for(lambda: tiers(cluster).get("a"), what="metrics")
    assert len(replicas) == 2
    r = post(cluster, "/v1/load_lora_adapter", {"lora_name": "dyn-api", "lora_path": "dyn"})
    assert r.status_code == 200, r.text
    assert tiers(cluster)["dyn-api"] == replicas
    for _ in range(4):
        assert answer(cluster, "dyn-api")
    bad = post(cluster, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "broken"})
    assert bad.status_code == 400 and "bad" not in tiers(cluster)
    r = post(cluster, "/v1/unload_lora_adapter", {"lora_name": "dyn-api"})
    assert r.status_code == 200 and "dyn-api" not in tiers(cluster)


def test_the_resolver_loads_a_named_adapter_from_the_root_everywhere(cluster):
    assert answer(cluster, "dyn")
    assert len(tiers(cluster)["dyn"]) == 2
    for _ in range(3):  # a symlink out of the root stays out, asked again or not
        with pytest.raises(openai.NotFoundError):
            client(cluster).completions.create(model="escape", prompt="w003", max_tokens=2)
    assert "escape" not in tiers(cluster)


# -- routing ---------------------------------------------------------------------------
def test_a_request_lands_where_its_adapter_and_prefix_are_cached(cluster):
    c = client(cluster)
    history = " ".join(f"w{i:03d}" for i in range(40, 72))  # 32 words: 8 blocks

    def served_by(model: str, prompt: str) -> str:
        raw = c.completions.with_raw_response.create(model=model, prompt=prompt,
                                                     max_tokens=2, temperature=0)
        return raw.headers[REPLICA_HEADER]

    home = served_by("a", history)
    turns = [served_by("a", f"{history} w{100 + k:03d} w{110 + k:03d}") for k in range(6)]
    assert turns == [home] * 6
    # the same words under the other adapter share no KV: that request is not tied there
    others = {served_by("b", f"w{200 + k:03d} " * 12) for k in range(6)}
    assert others  # served; where is the router's choice


# -- failure ---------------------------------------------------------------------------
def test_a_replica_killed_mid_stream_ends_that_stream_with_an_error(cluster):
    loaded = post(cluster, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "dyn"})
    assert loaded.status_code == 200, loaded.text
    body = {"model": "a", "prompt": "w003 w004", "max_tokens": 4000, "ignore_eos": True,
            "stream": True, "temperature": 0}
    headers = {"authorization": f"Bearer {KEY}"}
    events = []
    with httpx.stream("POST", f"{cluster}/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        victim = r.headers[REPLICA_HEADER]
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{REPLICA}#{victim}", namespace="serve"))
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2][len("data: "):])
    assert error.get("error", {}).get("code") == "replica_unavailable", (len(events), error)

    def two_running():
        reps = serve.status().applications[APP].deployments[REPLICA].replica_states
        return reps.get("RUNNING", 0) == 2
    wait_for(two_running, timeout=120, what="Ray Serve to replace the replica")
    for _ in range(6):
        assert answer(cluster, "a")
    # the new replica learned the adapter loaded at run time, from the adapter book
    assert wait_for(lambda: len(tiers(cluster).get("late", ())) == 2, what="late on both")


# -- pure parts ------------------------------------------------------------------------
def test_merged_metrics_label_each_replica_and_stay_valid_prometheus():
    from prometheus_client.parser import text_string_to_metric_families

    one = ("# HELP x_total requests\n# TYPE x_total counter\nx_total{model=\"m\"} 3.0\n"
           "# HELP g a gauge\n# TYPE g gauge\ng 1.5\n")
    merged = merge_metrics({"r1": one, "r2": one.replace("3.0", "4.0")})
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    counts = {s.labels["replica"]: s.value for s in families["x"].samples
              if s.name == "x_total"}
    assert counts == {"r1": 3.0, "r2": 4.0}
    assert {s.labels["replica"] for s in families["g"].samples} == {"r1", "r2"}


def test_the_ingress_routes_by_the_tokens_the_replica_will_see(single):
    tok, llm = single.llm.tokenizer, single.llm
    assert prompt_tokens({"prompt": [5, 6, 7]}, tok) == (5, 6, 7)
    assert prompt_tokens({"prompt": [[5, 6], [7]]}, tok) == (5, 6)
    assert prompt_tokens({"prompt": "w003 w004"}, tok) == tuple(llm.encode("w003 w004"))
    assert prompt_tokens({"prompt": ["w005", "w006"]}, tok) == tuple(llm.encode("w005"))
    chat = [{"role": "user", "content": "w007"}]
    assert prompt_tokens({"messages": chat}, tok) == tuple(llm.encode(llm.render_chat(chat)))
    assert prompt_tokens({"prompt": {"odd": 1}}, tok) == ()


def test_a_cluster_config_refuses_what_cannot_run(server_cfg):
    for bad in (dict(replicas=0), dict(router="random"), dict(replica_cpus=-1),
                dict(routing_stats_period_s=0)):
        with pytest.raises(ValueError):
            ClusterConfig(replace(server_cfg), **bad)
