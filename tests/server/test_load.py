"""Load: 500 streamed requests at concurrency 32 over the base model and two adapters,
with a small device pool (swapping and preemption happen) and a fifth of the clients
hanging up mid-stream. Every other request completes; afterwards the pools hold only
cached nodes: no block of a running request is left behind (I3)."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import torch
from liveserver import MODEL_NAME, live_server, words

torch.set_num_threads(1)

REQUESTS = 500
CONCURRENCY = 32
MODELS = (MODEL_NAME, "a", "b")


async def one(client: httpx.AsyncClient, i: int, rng: random.Random) -> str:
    """'done', 'hung up' or a description of what went wrong."""
    session = rng.randrange(24)  # shared prefixes: sessions repeat their first words
    prompt = words([3 + session] * 4 + [rng.randrange(3, 128) for _ in range(rng.randint(1, 12))])
    hang_up_after = rng.randint(1, 3) if rng.random() < 0.2 else None
    body = {"model": MODELS[session % 3], "prompt": prompt, "max_tokens": rng.randint(2, 10),
            "temperature": rng.choice([0, 0.8]), "seed": i, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return f"status {resp.status_code}: {await resp.aread()}"
        chunks = 0
        finish = None
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return f"error in stream: {data}"
            for choice in data["choices"]:
                finish = choice["finish_reason"] or finish
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return "hung up"  # leaving the block closes the connection
        return "done" if finish == "length" else f"ended with {finish!r}"


def test_500_streams_at_concurrency_32_with_disconnects_leave_no_running_blocks(
        tmp_path_factory):
    with live_server(tmp_path_factory, device_memory=128 * 1024,
                     host_memory=256 * 1024) as server:
        async def run() -> list[str]:
            rng = random.Random(0)
            gate = asyncio.Semaphore(CONCURRENCY)
            limits = httpx.Limits(max_connections=CONCURRENCY)
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=limits) as client:
                async def gated(i: int) -> str:
                    async with gate:
                        return await one(client, i, random.Random(rng.random()))
                return await asyncio.gather(*(gated(i) for i in range(REQUESTS)))

        outcomes = asyncio.run(run())
        problems = [o for o in outcomes if o not in ("done", "hung up")]
        assert not problems, problems[:5]
        assert outcomes.count("hung up") > 50 and outcomes.count("done") > 350

        server.wait_idle(timeout=30)
        llm = server.llm
        assert not llm.cache.running and not llm.engine.scheduler.running
        usage = server.engine.call(llm.cache.usage).result()
        assert all(kinds.get("kv_running", 0) == 0 for kinds in usage.values()), usage
        server.engine.call(llm.cache.check_invariants).result()
        stats = llm.cache.stats
        assert stats.device_hit_tokens > 0  # sessions' shared prefixes were reused
        assert stats.swap_outs > 0 and stats.host_hit_tokens > 0  # the pool was tight
        aborted = server.app.state.metrics.registry.get_sample_value(
            "fastlibra:request_success_total",
            {"model_name": MODEL_NAME, "finished_reason": "abort"})
        assert aborted > 0  # hang-ups reached the engine as aborts, not as finished runs
