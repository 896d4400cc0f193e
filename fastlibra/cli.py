"""`fastlibra` command line: one subcommand per job, each a thin shell over a module."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable

from fastlibra.cache import CacheError
from fastlibra.cache.policies import get_policy


def _policies(text: str) -> list[str]:
    return [_policy(p.strip()) for p in text.split(",") if p.strip()]


def _routers(text: str) -> list[str]:
    from fastlibra.router import ROUTERS

    names = [p.strip() for p in text.split(",") if p.strip()]
    for n in names:
        if n not in ROUTERS:
            raise argparse.ArgumentTypeError(
                f"unknown router {n!r}; choose from {', '.join(ROUTERS)}")
    return names


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return values


def _positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` above zero."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


def _policy(text: str) -> str:
    """A policy name, or `NAME~mechanism...` (see `get_policy`)."""
    try:
        get_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _lora_module(text: str) -> tuple[str, str, str | None]:
    """vLLM's --lora-modules item: NAME=PATH, or JSON {"name", "path", "base_model_name"}."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {e}") from None
        unknown = set(spec) - {"name", "path", "base_model_name"}
        if unknown or not isinstance(spec.get("name"), str) or not spec["name"] \
                or not isinstance(spec.get("path"), str) or not spec["path"]:
            raise argparse.ArgumentTypeError(
                f'expected {{"name": ..., "path": ..., "base_model_name": ...}}, got {text!r}'
                + (f" (unknown keys: {', '.join(sorted(unknown))})" if unknown else ""))
        return spec["name"], spec["path"], spec.get("base_model_name")
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH or a JSON object, got {text!r}")
    return name, path, None


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def _bytes(text: str) -> int:
    """'8GiB', '512MiB', '20GB' or a plain number of bytes."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size; use e.g. 8GiB, 512MiB, 20GB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return int(value)


DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""vLLM's --dtype choices; auto = bfloat16 on CUDA, float32 on CPU."""


class _Refused(argparse.Action):
    """A vLLM flag this engine cannot honour: an error naming it, never ignored."""

    def __init__(self, option_strings, dest, hint: str, **kw) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} (a vLLM flag) is not supported: {self.hint}")


VLLM_REFUSED = {
    "--cpu-offload-gb": "weights stay on the device; the host tier (--swap-space) holds "
                        "adapters and KV",
    "--pipeline-parallel-size": "one engine runs on one device",
    "--quantization": "weights load unquantized in --dtype",
    "--kv-cache-dtype": "KV is stored in --dtype",
    "--trust-remote-code": "only Llama, Mistral and Qwen2 architectures load; no model "
                           "code is run from the directory",
}


def _engine_args(parser: argparse.ArgumentParser) -> None:
    """The model, its adapters and the engine's memory: shared by generate and serve.
    Flags spelt as vLLM's mean what vLLM means by them (see the README)."""
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", help="model directory "
                        "(config.json, *.safetensors, tokenizer files)")
    parser.add_argument("--model", default=None, metavar="DIR", help="the same as MODEL")
    parser.add_argument("--lora-modules", "--adapter", nargs="+", action="extend", default=[],
                        type=_lora_module, metavar="NAME=PATH",
                        help="PEFT adapters to serve: NAME=PATH or JSON {\"name\", \"path\", "
                        "\"base_model_name\"} (several, repeatable)")
    parser.add_argument("--enable-lora", action="store_true",
                        help="accepted for vLLM command lines: adapters are always on")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="default auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--device-memory", type=_bytes, default=None,
                        help="device pool for KV and adapters, e.g. 4GiB")
    host = parser.add_mutually_exclusive_group()
    host.add_argument("--host-memory", type=_bytes, default=None, help="host pool, e.g. 8GiB")
    host.add_argument("--swap-space", type=_positive(float), default=None, metavar="GIB",
                      help="host pool in GiB (vLLM's flag; the same as --host-memory)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="without --device-memory on CUDA: the share of the GPU's memory "
                        "this engine may fill (weights, profiled activations, then the pool)")
    parser.add_argument("--block-size", type=_positive(int), default=16)
    parser.add_argument("--policy", type=_policy, default="fastlibra")
    parser.add_argument("--max-loras", type=_positive(int), default=None,
                        help="most distinct adapters in one batch (default: no limit)")
    parser.add_argument("--max-lora-rank", type=_positive(int), default=256)
    parser.add_argument("--max-cpu-loras", type=_positive(int), default=None,
                        help="most adapters kept in host memory, in blocks of the largest "
                        "one given (the host pool grows to hold them if its size is not given)")
    parser.add_argument("--max-model-len", type=_positive(int), default=None,
                        help="context length, prompt + generated (default: 8192, capped by "
                        "the model's max_position_embeddings)")
    parser.add_argument("--max-num-seqs", type=_positive(int), default=256)
    parser.add_argument("--max-num-batched-tokens", type=_positive(int), default=2048)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="keep KV for later requests (default on)")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="price cache misses with the default hardware profile instead "
                        "of measuring this machine at start-up")
    parser.add_argument("--tensor-parallel-size", "-tp", type=_positive(int), default=1,
                        help="only 1: one engine runs on one device")
    for flag, hint in VLLM_REFUSED.items():
        parser.add_argument(flag, action=_Refused, hint=hint)


def _model_dir(args, parser: argparse.ArgumentParser) -> str:
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"two models given: {args.model_tag} and --model {args.model}")
    model = args.model_tag or args.model
    if not model:
        parser.error("the model directory is required (MODEL or --model DIR)")
    return model


def _llm_args(args) -> dict:
    """`LLM` keyword arguments from `_engine_args`'s flags."""
    if args.tensor_parallel_size != 1:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size}: one engine runs "
                         "on one device here (tensor parallelism is not implemented)")
    return dict(device_memory=args.device_memory, host_memory=args.host_memory,
                swap_space=args.swap_space, policy=args.policy, dtype=args.dtype,
                device=args.device, block_size=args.block_size, max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching,
                gpu_memory_utilization=args.gpu_memory_utilization, calibrate=args.calibrate)


def _named_adapters(modules: list[tuple[str, str, str | None]]) -> dict[str, str]:
    names = [name for name, _, _ in modules]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--lora-modules names {', '.join(dup)} twice")
    return {name: path for name, path, _ in modules}


def _session_args(parser: argparse.ArgumentParser) -> None:
    """Multi-turn session workload flags (`workloads.session_spec` reads them)."""
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of session arrivals (default 60; turns run past it)")
    parser.add_argument("--rate", type=float, default=1.0, help="new sessions/s (default 1)")
    parser.add_argument("--think", type=float, default=1.5,
                        help="mean think time between turns, s (default 1.5)")
    parser.add_argument("--mean-turns", type=float, default=4.0)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--system-len", type=int, default=64, help="system prompt tokens (mean)")
    parser.add_argument("--user-len", type=int, default=32, help="user message tokens (mean)")
    parser.add_argument("--answer-len", type=int, default=16, help="answer tokens (mean)")
    parser.add_argument("--seed", type=int, default=0)


REPLAY_SHAPE = {"--hidden": 512, "--layers": 8, "--heads": 8, "--kv-heads": 2,
                "--intermediate": 1376, "--vocab": 4096}
"""The replay's model: where a real LLM spends its step (the decoder layers; Llama-2 7B's
output projection is 2 % of its weights), not in a 32000-word output projection, which was
75 % of the weights of the earlier 256-wide 4-layer default and half of every step, work
no cache policy can save. Here it is 9 %."""


def _workload_args(replay: argparse.ArgumentParser) -> None:
    """`bench replay`'s model, workload and budget flags (shared with `bench fidelity`)."""
    replay.add_argument("--policy", type=_policies, default=["fastlibra", "vllm", "slora"])
    replay.add_argument("--json", metavar="FILE", help="write the results as JSON")
    _session_args(replay)
    replay.add_argument("--adapters", type=int, default=6)
    replay.add_argument("--rank-hi", type=int, default=16, help="rank of even adapters")
    replay.add_argument("--rank-lo", type=int, default=8, help="rank of odd adapters")
    for flag, default in REPLAY_SHAPE.items():
        replay.add_argument(flag, type=int, default=default,
                            help=f"model shape (default {default})")
    replay.add_argument("--conversations", type=int, default=4,
                        help="device budget = adapters + this many 256-token KV contexts")
    replay.add_argument("--device-memory", type=_bytes, default=None,
                        help="device pool bytes (overrides --conversations)")
    replay.add_argument("--host-memory", type=_bytes, default=None,
                        help="host pool bytes (default 8x the device pool)")
    replay.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the engine runs (default cpu)")
    replay.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        default="float32", help="model, KV and adapter dtype (default float32)")
    replay.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    replay.add_argument("--repeats", type=_positive(int), default=1,
                        help="replays per policy, interleaved across policies; numbers are "
                        "their means (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlibra", description="Multi-LoRA serving with a "
                                     "dependency-aware unified LoRA/KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="replay a multi-turn multi-adapter chat on the real "
                          "engine (a tiny random Llama + 6 LoRAs, built once) through each "
                          "cache policy and compare them; or --serve it over HTTP")
    demo.add_argument("--policy", type=_policies, default=["fastlibra", "vllm", "slora", "sglang"],
                      help="comma-separated policies (default fastlibra,vllm,slora,sglang; "
                      "--serve uses the first)")
    demo.add_argument("--seed", type=int, default=0, help="workload seed")
    demo.add_argument("--duration", type=float, default=8.0,
                      help="seconds of chat-session arrivals per policy (default 8; the "
                      "last turns run past it)")
    demo.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    demo.add_argument("--plot", metavar="FILE", default="out/demo.png",
                      help="TTFT CDF and mean TTFT per policy (default out/demo.png)")
    demo.add_argument("--serve", action="store_true",
                      help="serve the demo model and its adapters over HTTP instead")
    demo.add_argument("--host", default="127.0.0.1", help="with --serve (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="with --serve (default 8000)")

    sim = sub.add_parser("simulate", help="compare cache policies on a workload in the "
                         "simulator (model x hardware step-time profile, no GPU needed)")
    sim.add_argument("--workload", default="chatbot",
                     help="chatbot, translation, agent, drift, agent-drift, or trace:PATH (our "
                     "JSONL)")
    sim.add_argument("--model", default="llama-2-7b",
                     help="a model of the table (llama-2-7b, llama-3-8b, llama-2-13b, "
                     "codellama-34b, llama-3-70b) or a Hugging Face model directory")
    sim.add_argument("--hardware", default="a100-80g",
                     help="a100-80g, h100-80g, h800-80g, h200-141g, or a JSON file of GpuSpec "
                     "fields (or `bench fidelity`'s output: this machine, measured)")
    sim.add_argument("--tp", type=int, default=1, help="tensor parallel GPUs")
    sim.add_argument("--num-adapters", type=int, default=100)
    sim.add_argument("--adapter-rank", type=int, default=32)
    sim.add_argument("--zipf", type=float, default=1.0)
    sim.add_argument("--rate", type=_floats, default=[4.0],
                     help="request rate(s), req/s; a comma list plots TTFT vs rate")
    sim.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--policy", type=_policies, default=None,
                     help="cache policies (default fastlibra,vllm,slora,sglang; with "
                     "--replicas: fastlibra)")
    sim.add_argument("--replicas", type=int, default=None,
                     help="simulate this many engines behind a router (one row per router)")
    sim.add_argument("--router", type=_routers,
                     default=["round-robin", "least-loaded", "multiplex", "prefix", "fastlibra"],
                     help="routers compared with --replicas (see fastlibra/router.py)")
    sim.add_argument("--publish-interval", type=float, default=10.0,
                     help="seconds between a replica's residency reports to the router")
    sim.add_argument("--device-memory", type=_bytes, default=None,
                     help="unified device pool, e.g. 20GiB (default: HBM - weights - 8%%)")
    sim.add_argument("--host-memory", type=_bytes, default=256 * 2**30)
    sim.add_argument("--adapters-from-disk", action="store_true",
                     help="every policy starts with all adapters on disk (default: all in "
                          "host memory, read before serving)")
    sim.add_argument("--adapter-share", type=float, default=None,
                     help="static adapter share of device memory for vllm/sglang (default 0.2)")
    sim.add_argument("--output-json", metavar="FILE")
    sim.add_argument("--plot", metavar="DIR", help="write TTFT CDF, TTFT vs rate and "
                     "pool-composition PNGs here")

    conv = sub.add_parser("convert-trace", help="turn a public trace into our JSONL format "
                          "(adapters assigned by a seeded, documented rule)")
    conv.add_argument("kind", choices=["mooncake", "azure", "servegen"])
    conv.add_argument("src", help="trace file (servegen: the folder of chunk CSVs)")
    conv.add_argument("dst", help="output JSONL")
    conv.add_argument("--num-adapters", type=int, default=100)
    conv.add_argument("--zipf", type=float, default=1.0)
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--max-requests", type=int, default=None)
    conv.add_argument("--time-scale", type=float, default=1.0,
                      help="multiply arrival times (servegen: compress days into minutes)")

    gen = sub.add_parser("generate", help="generate text with a local Hugging Face model "
                         "directory and PEFT LoRA adapters on the real model runner")
    _engine_args(gen)
    gen.add_argument("--use-adapter", metavar="NAME", default=None,
                     help="generate with this registered adapter (default: the base model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object: text, token_ids (generated), finish_reason")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, "
                           "models, LoRA load/unload, Prometheus /metrics)")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every /v1 route")
    serve.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                       help="allow /v1/load_lora_adapter to read adapters under DIR "
                       "(repeatable; none = dynamic loading off)")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the base model's id in requests (default: MODEL as given); "
                       "further names are aliases")
    serve.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                       help="a Jinja chat template (file or text) instead of the tokenizer's")
    serve.add_argument("--seed", type=int, default=None,
                       help="seed of the sampling RNG for requests without their own seed")
    serve.add_argument("--tool-call-parser", choices=["hermes", "llama3_json"], default=None,
                       help="the format of tool calls in the model's output for tool_choice "
                       "auto (default: hermes for Qwen2 and Mistral, llama3_json for Llama)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM command lines: tool_choice auto is always on")
    serve.add_argument("--metrics-compat", choices=["vllm"], default=None,
                       help="/metrics also exports vLLM's metric names (vllm:...) where they "
                       "mean the same here")
    serve.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    serve.add_argument("--max-request-bytes", type=_bytes, default=8 * 2**20,
                       help="refuse request bodies above this with a 413 (default 8MiB)")
    ray = serve.add_argument_group("scale-out on Ray Serve (with --replicas)")
    ray.add_argument("--replicas", type=int, default=None,
                     help="serve N engine replicas behind one ingress as a Ray Serve "
                     "application (default: one engine in this process, no Ray)")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (default: start a local one)")
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="Ray CPUs each replica reserves (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=None,
                     help="Ray GPUs each replica reserves (default 1 if CUDA is here, else 0)")
    ray.add_argument("--router", default="fastlibra",
                     choices=["fastlibra", "least-loaded", "round-robin", "multiplex", "prefix"],
                     help="which replica serves a request (default fastlibra: the lowest "
                     "estimated TTFT from adapter tiers, cached prefixes and queues; "
                     "least-loaded is Ray Serve's default)")
    ray.add_argument("--routing-stats-period", type=float, default=2.0, metavar="S",
                     help="seconds between replicas' residency reports (default 2)")
    ray.add_argument("--ingress", choices=["local", "ray"], default="local",
                     help="local: the ingress runs in this process and calls the replicas "
                     "through a Ray Serve handle (default); ray: a Ray Serve deployment "
                     "behind Ray's HTTP proxy (a proxy per node, restarted by Ray), one hop more")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    cache = bsub.add_parser("cache", help="cost of cache bookkeeping per scheduler step")
    cache.add_argument("--adapters", type=int, default=1000)
    cache.add_argument("--kv-blocks", type=int, default=100_000)
    cache.add_argument("--batch", type=int, default=64, help="running requests per step")
    cache.add_argument("--steps", type=int, default=2000, help="measured steps")
    cache.add_argument("--policy", type=_policies, default=["fastlibra"])
    cache.add_argument("--seed", type=int, default=0)
    cache.add_argument("--json", metavar="FILE", help="write the results as JSON")
    mech = bsub.add_parser("mechanisms", help="each cost-model mechanism on and off, on "
                           "held-out seeds and a public trace")
    mech.add_argument("--duration", type=_positive(float), default=60.0,
                      help="seconds of arrivals per cell (default 60)")
    mech.add_argument("--jobs", type=_positive(int), default=2)
    mech.add_argument("--host-ratio", type=_positive(float), default=2.0,
                      help="host pool = this x the device budget (default 2)")
    mech.add_argument("--no-trace", action="store_true",
                      help="skip the Mooncake trace cell (../shared/traces)")
    mech.add_argument("--json", metavar="FILE")

    brouter = bsub.add_parser("routing", help="time of one routing decision per router, on a "
                              "drawn cluster (default 128 replicas, 1,000 adapters)")
    brouter.add_argument("--replicas", type=int, default=128)
    brouter.add_argument("--adapters", type=int, default=1000)
    brouter.add_argument("--sessions-per-replica", type=int, default=50,
                         help="conversations of 500-4,000 tokens cached on each replica")
    brouter.add_argument("--requests", type=int, default=2000, help="decisions timed")
    brouter.add_argument("--router", type=_routers,
                         default=["round-robin", "least-loaded", "multiplex", "prefix",
                                  "fastlibra"])
    brouter.add_argument("--seed", type=int, default=0)
    brouter.add_argument("--json", metavar="FILE", help="write the results as JSON")
    scale = bsub.add_parser("scale", help="1,000 and 2,000 adapters under random, distinct "
                            "and skewed popularity")
    scale.add_argument("--adapters", type=lambda t: [int(x) for x in t.split(",")],
                       default=[1000, 2000])
    scale.add_argument("--model", default="llama-3-8b")
    scale.add_argument("--hardware", default="h100-80g")
    scale.add_argument("--tp", type=int, default=1)
    scale.add_argument("--adapter-rank", type=int, default=32)
    scale.add_argument("--rate", type=float, default=8.0, help="requests/s")
    scale.add_argument("--duration", type=float, default=300.0)
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument("--policy", type=_policies, default=["fastlibra", "vllm", "slora", "sglang"])

    model = bsub.add_parser("model", help="our paged model runner against transformers "
                            "(decode batch 1/16, adapter prefill cost) on a random Llama")
    model.add_argument("--json", metavar="FILE", help="write the results as JSON")
    model.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads for both sides (default 1: on a shared "
                       "machine OpenMP threads that wait on a busy core make steps 10x slower)")
    for flag, default in (("--hidden", 768), ("--layers", 6), ("--heads", 12),
                          ("--kv-heads", 4), ("--intermediate", 2048), ("--vocab", 32000)):
        model.add_argument(flag, type=int, default=default, help=f"model shape (default {default})")
    model.add_argument("--rank", type=int, default=16, help="LoRA rank on q/k/v/o (default 16)")
    model.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="weights, KV and activations on both sides (default float32)")
    model.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decode")
    model.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps")
    model.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")],
                       default=[1, 16], help="decode batch sizes (default 1,16)")
    model.add_argument("--prefill-len", type=int, default=1024,
                       help="tokens of the adapter-cost prefill (default 1024)")
    model.add_argument("--warmup", type=int, default=1, help="untimed runs per measurement")
    model.add_argument("--reps", type=int, default=5, help="timed runs per measurement (median)")
    model.add_argument("--seed", type=int, default=0)

    kern = bsub.add_parser("kernels", help="decode step time through the Triton kernels "
                           "against the torch path on a random model built on the device")
    for flag, default in (("--hidden", 4096), ("--layers", 32), ("--heads", 32),
                          ("--kv-heads", 8), ("--intermediate", 14336), ("--vocab", 128256)):
        kern.add_argument(flag, type=int, default=default,
                          help=f"model shape (default {default}: Llama-3-8B)")
    kern.add_argument("--adapters", type=int, default=50, help="distinct adapters (default 50)")
    kern.add_argument("--rank", type=int, default=16, help="LoRA rank on every linear layer")
    kern.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    kern.add_argument("--chunk", type=int, default=256,
                      help="prefill chunk of the correctness step (default 256)")
    kern.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")],
                      default=[1, 16, 64], help="decode batch sizes (default 1,16,64)")
    kern.add_argument("--block-size", type=int, default=16)
    kern.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    kern.add_argument("--device", default=None, help="default: cuda if present")
    kern.add_argument("--warmup", type=int, default=3)
    kern.add_argument("--reps", type=int, default=10, help="timed steps per measurement")
    kern.add_argument("--json", metavar="FILE", help="write the results as JSON")

    replay = bsub.add_parser("replay", help="a multi-turn multi-adapter chatbot replayed in "
                             "real time on the real engine (random Llama + PEFT adapters), "
                             "once per policy, same device budget")
    _workload_args(replay)
    replay.add_argument("--rates", type=_floats, default=None,
                        help="sweep these session rates instead of --rate: mean TTFT per "
                             "policy and rate, and each policy's peak load (the highest rate "
                             "with mean TTFT < 500 ms)")

    fid = bsub.add_parser("fidelity", help="the simulator against the real engine: bench "
                          "replay per policy, a CPU profile fitted to the real runner, then "
                          "simulate() on the same workload; real vs simulated mean TTFT")
    _workload_args(fid)
    fid.add_argument("--reps", type=int, default=5, help="timed runs per profile point")
    fid.add_argument("--quick-profile", action="store_true",
                     help="fewer profile points (tests)")

    cl = bsub.add_parser("replicas", help="the Ray Serve application on this machine: "
                         "ingress overhead against one in-process server, then the routers "
                         "compared on N replicas under one multi-turn multi-adapter replay")
    _workload_args(cl)
    cl.set_defaults(policy="fastlibra")
    cl.add_argument("--routers", type=_routers, default=["fastlibra", "least-loaded",
                                                       "multiplex", "prefix", "round-robin"],
                    help="comma-separated (default all five)")
    cl.add_argument("--replicas", type=_positive(int), default=2)
    cl.add_argument("--routing-stats-period", type=float, default=2.0, metavar="S")
    cl.add_argument("--overhead-requests", type=int, default=200,
                    help="requests each way for the ingress overhead (0: skip it)")
    cl.add_argument("--plot", metavar="PNG", default=None, help="bar plot of TTFT per router")
    cl.add_argument("--ingress", choices=["local", "ray"], default="local",
                    help="the ingress the routers are compared behind (default local)")

    structured = bsub.add_parser("structured", help="decode throughput of a batch under a "
                                 "JSON schema (llguidance) against the same batch unconstrained")
    structured.add_argument("--batch", type=_positive(int), default=16)
    structured.add_argument("--tokens", type=_positive(int), default=64,
                            help="new tokens per request (default 64)")
    structured.add_argument("--reps", type=_positive(int), default=3)
    structured.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    for flag, default in REPLAY_SHAPE.items():
        if flag != "--vocab":  # the byte tokenizer's
            structured.add_argument(flag, type=int, default=default,
                                    help=f"model shape (default {default}: bench replay's)")
    structured.add_argument("--json", metavar="FILE", help="write the results as JSON")

    bserve = bsub.add_parser("serve", help="replay a multi-turn multi-adapter workload "
                             "against any OpenAI-compatible server (ours, vLLM, SGLang) over "
                             "HTTP: TTFT/TPOT percentiles, throughput, cached tokens")
    bserve.add_argument("--url", default="http://127.0.0.1:8000", help="the server's root")
    bserve.add_argument("--workload", choices=["chatbot", "drift"], default="chatbot")
    bserve.add_argument("--model", default=None,
                        help="the base model's id (default: the first of GET /v1/models)")
    bserve.add_argument("--adapters", default=None,
                        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                        help="comma list of model ids for the workload's adapters (default: "
                        "every other id of GET /v1/models; may include the base id); "
                        "workload adapter lora-i goes to the (i mod count)-th")
    bserve.add_argument("--num-adapters", type=int, default=6,
                        help="adapters in the workload (default 6)")
    _session_args(bserve)
    bserve.add_argument("--max-context", type=int, default=None,
                        help="sessions end before prompt + answer exceed this many tokens "
                        "(default: the server's max_model_len, else 4096)")
    bserve.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight (default: no limit)")
    bserve.add_argument("--prompt-format", choices=["words", "ids"], default="words",
                        help="send prompts as text (words, default) or token-id lists")
    bserve.add_argument("--vocab", type=int, default=128,
                        help="token ids sent are below this (default 128)")
    bserve.add_argument("--first-word", type=int, default=3,
                        help="token ids sent are at least this: no special tokens (default 3)")
    bserve.add_argument("--word-format", default="w{:03d}",
                        help="the word for a token id with --prompt-format words (default "
                        "'w{:03d}': our tiny test models' vocabulary)")
    bserve.add_argument("--timeout", type=float, default=600.0,
                        help="seconds without data before a request fails (default 600)")
    bserve.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    bserve.add_argument("--json", metavar="FILE",
                        help="write the summary, machine, commit and every request as JSON")

    paper = bsub.add_parser("paper", help="the paper's grid in the simulator: pairs x workloads "
                            "x adapters x rates, every policy, vllm-oracle and a lower bound")
    paper.add_argument("--quick", action="store_true",
                       help="one small pair (llama-2-7b, a100), 20/100 adapters, 3 rates, 60 s")
    paper.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")
    paper.add_argument("--json", metavar="FILE", help="write cells and summary as JSON")
    paper.add_argument("--markdown", metavar="FILE",
                       help="write/replace the paper-sweep section of this markdown file")
    paper.add_argument("--plot", metavar="DIR", help="TTFT vs rate PNG per (pair, workload)")
    paper.add_argument("--duration", type=float, default=None,
                       help="seconds of arrivals per run (default: 60 quick, 300 full)")
    paper.add_argument("--workloads", default=None, help="comma list (default: all three)")
    paper.add_argument("--adapters", default=None, help="comma list of adapter counts")
    paper.add_argument("--rates", type=_floats, default=None,
                       help="comma list of req/s for every (pair, workload); skips calibration")
    paper.add_argument("--num-rates", type=int, default=None,
                       help="rates per (pair, workload) from calibration (default 3 quick, 4 full)")
    paper.add_argument("--pairs", default=None,
                       help="comma list of model:hardware:tp[:rank] instead of the defaults")
    paper.add_argument("--seed", type=int, default=0)
    paper.add_argument("--host-ratio", type=_positive(float), default=None,
                       help="host pool = this x each pair's device budget (default: 256 GiB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("serve", "generate"):
        args.model_dir = _model_dir(args, parser)
    try:
        return _dispatch(args)
    except (ValueError, OSError, CacheError) as e:  # ConfigError, TraceError, missing files
        parser.exit(2, f"fastlibra {args.command}: error: {e}\n")


_BENCHMARKS = {
    "cache": ("fastlibra.bench.cache", "run_cache_bench"),
    "scale": ("fastlibra.bench.scale", "run_scale"),
    "mechanisms": ("fastlibra.bench.mechanisms", "run_mechanisms"),
    "paper": ("fastlibra.bench.paper", "run_paper"),
    "model": ("fastlibra.bench.model", "run_model_bench"),
    "replay": ("fastlibra.bench.replay", "run_replay"),
    "kernels": ("fastlibra.bench.kernels", "run_kernel_bench"),
    "fidelity": ("fastlibra.bench.fidelity", "run_fidelity"),
    "serve": ("fastlibra.bench.serve", "run_serve_bench"),
    "structured": ("fastlibra.bench.structured", "run_structured"),
    "routing": ("fastlibra.bench.routing", "run_routing_bench"),
    "replicas": ("fastlibra.bench.replicas", "run_replicas_bench"),
}
"""`fastlibra bench NAME` -> (module, function), imported only when run."""


def _dispatch(args) -> int:
    if args.command == "demo":
        from fastlibra.demo import run_demo
        return run_demo(args)
    if args.command == "simulate":
        from fastlibra.bench.simulate import run_simulate
        return run_simulate(args)
    if args.command == "convert-trace":
        from fastlibra.traces import convert_trace
        n = convert_trace(args.kind, args.src, args.dst, num_adapters=args.num_adapters,
                          zipf=args.zipf, seed=args.seed, max_requests=args.max_requests,
                          time_scale=args.time_scale)
        print(f"wrote {n} requests to {args.dst}")
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        from pathlib import Path

        from fastlibra.server import ServerConfig, run_server
        names = args.served_model_name or [None]
        cfg = ServerConfig(
            Path(args.model_dir), {k: Path(v) for k, v in _named_adapters(args.lora_modules).items()},
            host=args.host, port=args.port, api_key=args.api_key,
            adapter_roots=tuple(Path(r) for r in args.adapter_root),
            served_model_name=names[0], model_aliases=tuple(names[1:]),
            adapter_parents={n: b for n, _, b in args.lora_modules if b},
            chat_template=_chat_template(args.chat_template),
            uvicorn_log_level=args.uvicorn_log_level, metrics_compat=args.metrics_compat,
            tool_call_parser=args.tool_call_parser, max_request_bytes=args.max_request_bytes,
            engine_args=_llm_args(args) | {"seed": args.seed})
        if args.replicas is None:
            run_server(cfg)
            return 0
        from fastlibra.server.cluster import ClusterConfig, run_cluster
        gpus = args.replica_gpus
        if gpus is None:
            import torch
            gpus = 1.0 if torch.cuda.is_available() else 0.0
        run_cluster(ClusterConfig(cfg, replicas=args.replicas, ray_address=args.ray_address,
                                  replica_cpus=args.replica_cpus, replica_gpus=gpus,
                                  router=args.router,
                                  routing_stats_period_s=args.routing_stats_period,
                                  ingress=args.ingress))
        return 0
    if args.command == "bench":
        module, function = _BENCHMARKS[args.bench]
        return getattr(importlib.import_module(module), function)(args)
    raise AssertionError(args)


def _chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the template itself (vLLM takes either)."""
    if value is None:
        return None
    from pathlib import Path

    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template {value}: no such file (and not a Jinja template)")
    return value


def _generate(args) -> int:
    from fastlibra.llm import LLM
    from fastlibra.model.sampling import SamplingParams

    adapters = _named_adapters(args.lora_modules)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed, max_tokens=args.max_tokens, stop=tuple(args.stop))
    llm = LLM(args.model_dir, adapters, **_llm_args(args))
    (out,) = llm.generate(args.prompt, sampling, adapter=args.use_adapter)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason}))
    else:
        print(out.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
