"""`fastlibra` command line: one subcommand per job, each a thin shell over a module."""

from __future__ import annotations

import argparse

from fastlibra.cache.policies import POLICIES


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    for n in names:
        if n not in POLICIES:
            raise argparse.ArgumentTypeError(
                f"unknown policy {n!r}; choose from {', '.join(POLICIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlibra", description="Multi-LoRA serving with a "
                                     "dependency-aware unified LoRA/KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="replay a small multi-adapter multi-turn sequence "
                          "through every cache policy and compare them")
    demo.add_argument("--policy", type=_policies, default=list(POLICIES),
                      help="comma-separated policies (default: all)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", metavar="FILE", help="also write the table as JSON")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from fastlibra.demo import run_demo
        return run_demo(args)
    if args.command == "bench" and args.bench == "cache":
        from fastlibra.bench import run_cache_bench
        return run_cache_bench(args)
    raise AssertionError(args)


if __name__ == "__main__":
    raise SystemExit(main())
