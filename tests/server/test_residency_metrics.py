"""Adapter residency in /metrics for routers outside FastLibra: `fastlibra:lora_adapter_tier`
and vLLM's `vllm:lora_requests_info` (name and labels as vLLM, read by llm-d gateways)."""

import httpx
import pytest
from liveserver import MODEL_NAME, live_server
from llmsetup import served_setup
from prometheus_client import CollectorRegistry, generate_latest

from fastlibra.cache import Tier
from fastlibra.llm import LLM
from fastlibra.model.sampling import SamplingParams
from fastlibra.server.metrics import LoraResidency, _ResidencyCollector, lora_residency


def test_the_exposition_names_each_adapters_tier_and_the_vllm_lora_gauge():
    registry = CollectorRegistry()
    registry.register(_ResidencyCollector(
        LoraResidency({"sql": Tier.DEVICE, "chat": Tier.DISK}, running=["sql"],
                      waiting=["chat", "sql"], max_lora=12), "m", clock=lambda: 1700.0))
    lines = [ln for ln in generate_latest(registry).decode().splitlines()
             if not ln.startswith("#")]
    assert lines == [
        'fastlibra:lora_adapter_tier{adapter="sql",model_name="m",tier="device"} 1.0',
        'fastlibra:lora_adapter_tier{adapter="sql",model_name="m",tier="host"} 0.0',
        'fastlibra:lora_adapter_tier{adapter="sql",model_name="m",tier="disk"} 0.0',
        'fastlibra:lora_adapter_tier{adapter="chat",model_name="m",tier="device"} 0.0',
        'fastlibra:lora_adapter_tier{adapter="chat",model_name="m",tier="host"} 0.0',
        'fastlibra:lora_adapter_tier{adapter="chat",model_name="m",tier="disk"} 1.0',
        'vllm:lora_requests_info{max_lora="12",running_lora_adapters="sql",'
        'waiting_lora_adapters="chat,sql"} 1700.0',
    ]


def test_residency_follows_the_engine_queued_then_loaded(tmp_path_factory):
    base, adapters, _ = served_setup(tmp_path_factory)
    llm = LLM(base, adapters, device_memory=256 * 1024, host_memory=256 * 1024, block_size=4,
              dtype="float32", device="cpu")
    before = lora_residency(llm)
    assert before.tiers == {"a": Tier.HOST, "b": Tier.HOST}  # read into host at start
    assert (before.running, before.waiting) == ([], [])
    largest = max(llm.cache.adapters[n].num_blocks for n in ("a", "b"))
    assert before.max_lora == llm.cache.device_adapter_pool.capacity // largest
    llm.add_request([5, 6, 7], adapter="b", sampling=SamplingParams(max_tokens=4))
    queued = lora_residency(llm)
    assert (queued.running, queued.waiting) == ([], ["b"])
    llm.step()  # admitted: b is brought to the device (and the idle swapper prefetches a)
    running = lora_residency(llm)
    assert (running.tiers["b"], running.waiting) == (Tier.DEVICE, [])
    assert running.running == [n for n, t in running.tiers.items() if t is Tier.DEVICE]
    llm.close()


def test_max_lora_is_max_loras_when_it_is_set(tmp_path_factory):
    base, adapters, _ = served_setup(tmp_path_factory)
    llm = LLM(base, adapters, device_memory=256 * 1024, host_memory=256 * 1024, block_size=4,
              dtype="float32", device="cpu", max_loras=1)
    assert lora_residency(llm).max_lora == 1
    llm.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory) as srv:
        yield srv


def test_a_scrape_shows_where_each_adapter_is(server):
    httpx.post(server.url + "/v1/completions", timeout=30, json={
        "model": "a", "prompt": "w020 w021 w022", "max_tokens": 2}).raise_for_status()
    text = httpx.get(server.url + "/metrics").text
    tiers = {}
    for line in text.splitlines():
        if line.startswith("fastlibra:lora_adapter_tier{"):
            labels, value = line.rsplit(" ", 1)
            if float(value) == 1.0:
                adapter = labels.split('adapter="')[1].split('"')[0]
                tiers[adapter] = labels.split('tier="')[1].split('"')[0]
            assert f'model_name="{MODEL_NAME}"' in labels
    assert set(tiers) == {"a", "b"} and tiers["a"] == "device"
    on_device = ",".join(sorted(n for n, t in tiers.items() if t == "device"))
    info = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and f'running_lora_adapters="{on_device}"' in info[0]
    assert 'waiting_lora_adapters=""' in info[0]
