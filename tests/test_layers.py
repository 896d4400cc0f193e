"""Imports point down the layers of DESIGN.md §4, and the cache, engine and simulator run
without torch: a newcomer can read each layer knowing only the ones below it."""

import ast
from pathlib import Path

import fastlibra

ROOT = Path(fastlibra.__file__).parent

# module or package -> what it may import from fastlibra (besides itself)
BELOW = {
    "config": set(),
    "cache": {"config"},
    "engine": {"cache", "config"},
    "workloads": {"engine", "config"},
    "traces": {"workloads", "engine", "config"},
    "router": {"cache", "config"},
    "sim": {"router", "engine", "cache", "config"},
    "model": {"engine", "cache", "config"},
    "calibrate": {"model", "cache", "config"},
    "llm": {"calibrate", "model", "engine", "cache", "config"},
    "server": {"llm", "calibrate", "model", "router", "engine", "cache", "config"},
}
TOP = {"bench", "demo", "cli"}  # drivers: may import anything below them
NO_TORCH = {"config", "cache", "engine", "sim", "workloads", "traces", "router"}


def _imports(path: Path) -> set[str]:
    """Top-level fastlibra names a module imports, lazily inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _modules():
    return [p for p in sorted(ROOT.rglob("*.py")) if _layer(p) != "__init__"]


def test_every_module_belongs_to_a_known_layer():
    unknown = {_layer(p) for p in _modules()} - set(BELOW) - TOP
    assert not unknown, f"add {unknown} to BELOW or TOP in this test"


def test_no_import_points_up_the_layers():
    upward = []
    for path in _modules():
        layer = _layer(path)
        if layer in TOP:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "fastlibra" or len(parts) == 1:
                continue
            target = parts[1]
            if target != layer and target not in BELOW[layer]:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, "\n".join(upward)


def test_the_cache_engine_and_simulator_import_no_torch():
    found = [f"{p.relative_to(ROOT)} imports {n}" for p in _modules() if _layer(p) in NO_TORCH
             for n in _imports(p) if n.split(".")[0] in ("torch", "transformers", "fastapi", "ray")]
    assert not found, "\n".join(found)


def test_every_benchmark_command_runs_from_the_bench_package():
    """A reader who opens a core package meets serving code, not a benchmark harness."""
    from fastlibra.cli import _BENCHMARKS

    assert {module for module, _ in _BENCHMARKS.values()} == {
        f"fastlibra.bench.{name}" for name in _BENCHMARKS}
    core = [p.relative_to(ROOT) for p in _modules() if _layer(p) not in TOP
            and p.stem in {*_BENCHMARKS, "bench", "replay"}]
    assert not core, core
