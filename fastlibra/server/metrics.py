"""Prometheus metrics for /metrics, named like vLLM's under a `fastlibra:` prefix, and
with `--metrics-compat vllm` also under vLLM's own `vllm:` names where they mean the same
here (so vLLM's dashboards work unchanged).

Per-request histograms are observed when a request finishes (on the engine thread, via
`AsyncLLM.on_finish`). Engine-wide numbers (queue, hit rates, swap bytes, pool usage by
kind) are an `LLM.stats()` snapshot taken on the engine thread when /metrics is scraped
(`render`), between two steps: no step pays for them, and no scrape races a step. Each
server has its own registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fastlibra.cache import Tier
from fastlibra.calibrate import Calibration
from fastlibra.llm import LLM, AsyncLLM, EngineStats, Output

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


REQUEST_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
                         20000, 50000, 100000)

METRICS_COMPAT = ("vllm",)
"""Other servers' metric names `/metrics` can export beside ours (`--metrics-compat`)."""


class _RequestMetrics:
    """Per-request histograms and counters under one prefix (fastlibra, or vllm)."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        labels = ["model_name"]
        self.ttft = Histogram(f"{prefix}:time_to_first_token_seconds",
                              "Time from arrival to the first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram(f"{prefix}:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              labels, buckets=TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram(f"{prefix}:e2e_request_latency_seconds",
                             "Time from arrival to finish.", labels,
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(f"{prefix}:prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=registry)
        self.generation_tokens = Counter(f"{prefix}:generation_tokens",
                                         "Tokens generated.", labels, registry=registry)
        self.finished = Counter(f"{prefix}:request_success",
                                "Finished requests by finish reason.",
                                [*labels, "finished_reason"], registry=registry)
        self.request_prompt = Histogram(f"{prefix}:request_prompt_tokens",
                                        "Prompt tokens per request.", labels,
                                        buckets=REQUEST_TOKEN_BUCKETS, registry=registry)
        self.request_generation = Histogram(f"{prefix}:request_generation_tokens",
                                            "Generated tokens per request.", labels,
                                            buckets=REQUEST_TOKEN_BUCKETS, registry=registry)

    def observe(self, m: str, out: Output) -> None:
        if out.ttft is not None:
            self.ttft.labels(m).observe(out.ttft)
        if out.tpot is not None:
            self.tpot.labels(m).observe(out.tpot)
        self.e2e.labels(m).observe(out.e2e)
        self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(m).inc(len(out.token_ids))
        self.finished.labels(m, out.finish_reason).inc()
        self.request_prompt.labels(m).observe(len(out.prompt_token_ids))
        self.request_generation.labels(m).observe(len(out.token_ids))


class ServerMetrics:
    def __init__(self, engine: AsyncLLM, model_name: str, compat: str | None = None) -> None:
        if compat is not None and compat not in METRICS_COMPAT:
            raise ValueError(f"--metrics-compat {compat!r}: choose from "
                             f"{', '.join(METRICS_COMPAT)}")
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.per_request = [_RequestMetrics(p, self.registry)
                            for p in ("fastlibra", *([compat] if compat else []))]
        self.engine = engine
        self._engine_numbers = _EngineCollector(engine.call(engine.llm.stats).result(),
                                                model_name, vllm=compat == "vllm")
        self.registry.register(self._engine_numbers)
        self.registry.register(_CalibrationCollector(engine.llm.calibration, model_name))
        self._residency = _ResidencyCollector(engine.call(lora_residency, engine.llm).result(),
                                              model_name)
        self.registry.register(self._residency)
        engine.on_finish.append(self.observe)

    async def render(self) -> bytes:
        """The exposition text, with engine numbers as of now."""
        self._engine_numbers.snapshot = await self.engine.run(self.engine.llm.stats)
        self._residency.snapshot = await self.engine.run(lora_residency, self.engine.llm)
        return generate_latest(self.registry)

    def observe(self, out: Output) -> None:
        for metrics in self.per_request:
            metrics.observe(self.model_name, out)


class _EngineCollector(Collector):
    """Gauges and counters of the latest engine snapshot (`ServerMetrics.render`)."""

    def __init__(self, snapshot: EngineStats, model_name: str, vllm: bool = False) -> None:
        self.snapshot = snapshot
        self.model_name = model_name
        self.vllm = vllm
        """Also vLLM's names for what has a meaning here (its dashboards work unchanged)."""

    def collect(self):
        s = self.snapshot
        m = [self.model_name]

        def gauge(name: str, doc: str, value: float, prefix: str = "fastlibra"):
            g = GaugeMetricFamily(f"{prefix}:{name}", doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name: str, doc: str, value: float, prefix: str = "fastlibra"):
            c = CounterMetricFamily(f"{prefix}:{name}", doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        yield gauge("num_requests_waiting", "Requests queued, not yet admitted.", s.waiting)
        yield gauge("num_requests_running", "Requests admitted (prefill or decode).",
                    s.running)
        yield gauge("lora_adapters", "Adapters registered and servable.", s.adapters)
        q = s.prompt_tokens
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the cache.", q)
        yield counter("device_prefix_cache_hits", "Prompt tokens whose KV was on device.",
                      s.device_hit_tokens)
        yield counter("host_prefix_cache_hits",
                      "Prompt tokens whose KV was swapped in from host memory.",
                      s.host_hit_tokens)
        yield gauge("device_cache_hit_rate", "Device hit tokens / prompt tokens, cumulative.",
                    s.device_hit_tokens / q if q else 0.0)
        yield gauge("host_cache_hit_rate", "Host hit tokens / prompt tokens, cumulative.",
                    s.host_hit_tokens / q if q else 0.0)
        swap = CounterMetricFamily("fastlibra:swap_bytes",
                                   "Bytes moved between tiers, by kind of move.",
                                   labels=["model_name", "kind"])
        for kind, nbytes in s.bytes_moved.items():
            swap.add_metric([*m, kind], nbytes)
        yield swap
        blocks = GaugeMetricFamily("fastlibra:pool_blocks",
                                   "Blocks per pool by kind (adapter, kv_cached, kv_running, "
                                   "invalid_kv, free).", labels=["model_name", "pool", "kind"])
        usage = GaugeMetricFamily("fastlibra:pool_usage_perc",
                                  "Used fraction of each pool (1 = full).",
                                  labels=["model_name", "pool"])
        for pool, kinds in s.pool_blocks.items():
            for kind, n in kinds.items():
                blocks.add_metric([*m, pool, kind], n)
            total = sum(n for k, n in kinds.items() if k != "invalid_kv")
            usage.add_metric([*m, pool], 1 - kinds.get("free", 0) / total if total else 0.0)
        yield blocks
        yield usage
        yield gauge("block_bytes", "Bytes of one KV block (all layers).", s.block_bytes)
        if self.vllm:
            yield from self._vllm(s, gauge, counter)

    @staticmethod
    def _vllm(s: EngineStats, gauge, counter):
        """vLLM's engine numbers. Its KV cache is our device pool (which adapters share,
        unless the policy has a static adapter region: then the KV part)."""
        yield gauge("num_requests_waiting", "Requests queued, not yet admitted.", s.waiting,
                    "vllm")
        yield gauge("num_requests_running", "Requests admitted (prefill or decode).",
                    s.running, "vllm")
        device = s.pool_blocks.get("device") or s.pool_blocks.get("device-kv", {})
        total = sum(n for k, n in device.items() if k != "invalid_kv")
        used = 1 - device.get("free", 0) / total if total else 0.0
        for name in ("gpu_cache_usage_perc", "kv_cache_usage_perc"):
            yield gauge(name, "Used fraction of the device pool (KV and adapters; 1 = full).",
                        used, "vllm")
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prompt_tokens, "vllm")
        yield counter("prefix_cache_hits", "Prompt tokens whose KV was cached (device, or "
                      "host and swapped in).", s.device_hit_tokens + s.host_hit_tokens, "vllm")


class _CalibrationCollector(Collector):
    """The hardware profile the cache's cost model prices misses with (`calibrate.py`):
    measured at start-up, refined while serving. A profile is replaced whole, never
    changed in place, so reading it off the engine thread is safe."""

    FIELDS = (("h2d_bytes_per_second", "h2d_bandwidth", "Host-to-device copy bandwidth."),
              ("d2h_bytes_per_second", "d2h_bandwidth", "Device-to-host copy bandwidth."),
              ("disk_bytes_per_second", "disk_bandwidth",
               "Adapter read rate from disk (arena bytes per second, parsing included)."),
              ("prefill_seconds_per_token", "prefill_per_token", "Prefill cost per token."),
              ("prefill_base_seconds", "prefill_base", "Fixed cost of a prefill step."))

    def __init__(self, calibration: Calibration, model_name: str) -> None:
        self.calibration = calibration
        self.model_name = model_name

    def collect(self):
        cal = self.calibration
        profile = cal.profile
        for name, attr, doc in self.FIELDS:
            g = GaugeMetricFamily(f"fastlibra:calibrated_{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], getattr(profile, attr))
            yield g
        c = CounterMetricFamily("fastlibra:calibration_updates",
                                "Times a refined profile replaced the one in use.",
                                labels=["model_name"])
        c.add_metric([self.model_name], cal.updates)
        yield c


# -- where adapters are, for routers outside FastLibra --------------------------------------
@dataclass(frozen=True)
class LoraResidency:
    """Where each adapter is and which adapters requests use, as of one moment."""

    tiers: dict[str, Tier]
    running: list[str]
    """Adapters on device, ready to serve (which includes those of running requests)."""
    waiting: list[str]
    """Adapters of queued requests."""
    max_lora: int
    """`--max-loras` (distinct adapters among running requests) when set, as in vLLM;
    else how many adapters of the largest registered size the device pool holds."""


def lora_residency(llm: LLM) -> LoraResidency:
    """Read on the engine thread, between steps (like `LLM.stats`)."""
    cache = llm.cache
    names = llm.adapter_names
    tiers = {n: cache.adapters[n].tier for n in names}
    sched = llm.engine.scheduler
    on_device = {n for n, t in tiers.items() if t is Tier.DEVICE}
    largest = max((cache.adapters[n].num_blocks for n in names), default=0)
    max_lora = sched.cfg.max_loras if sched.cfg.max_loras is not None else \
        cache.device_adapter_pool.capacity // largest if largest else 0
    return LoraResidency(
        tiers, sorted(on_device | {r.adapter for r in sched.running if r.adapter}),
        sorted({r.adapter for r in sched.waiting if r.adapter}), max_lora)


class _ResidencyCollector(Collector):
    """`fastlibra:lora_adapter_tier` (1 for the tier each adapter is in, 0 for the others)
    and, under vLLM's name and labels, `vllm:lora_requests_info` (value: the time of the
    snapshot), which gateways such as llm-d read for LoRA affinity. vLLM lists the adapters
    of running requests as `running_lora_adapters`; the gateway protocol defines it as the
    adapters loaded and ready to serve, which is what we list: everything on device."""

    def __init__(self, snapshot: LoraResidency, model_name: str, clock=time.time) -> None:
        self.snapshot = snapshot
        self.model_name = model_name
        self.clock = clock

    def collect(self):
        s = self.snapshot
        tier = GaugeMetricFamily("fastlibra:lora_adapter_tier",
                                 "1 for the memory tier each adapter is in (device, host, "
                                 "disk), 0 for the others.",
                                 labels=["model_name", "adapter", "tier"])
        for name, where in s.tiers.items():
            for t in Tier:
                tier.add_metric([self.model_name, name, t.name.lower()], float(t is where))
        yield tier
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "running_lora_adapters",
                                         "waiting_lora_adapters"])
        info.add_metric([str(s.max_lora), ",".join(s.running), ",".join(s.waiting)],
                        self.clock())
        yield info
