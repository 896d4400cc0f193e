"""`fastlibra serve` and `fastlibra demo --serve` as a user starts them: a separate
process on a free port, reached with the official client, stopped with SIGINT (Ctrl-C)
and exiting cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from llmsetup import served_setup

from fastlibra.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fastlibra_process(*args: str, env: dict | None = None):
    """`fastlibra ARGS --port P` running until the block ends with Ctrl-C; yields
    (port, process); the process's output is in `process.output` afterwards."""
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from fastlibra.cli import main; "
           "sys.exit(main(sys.argv[1:]))", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield port, proc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, proc.output


def test_serve_command_answers_the_openai_client_and_stops_on_ctrl_c(tmp_path_factory):
    base, adapters, _ = served_setup(tmp_path_factory)
    with fastlibra_process(
            "serve", str(base), "--lora-modules", f"a={adapters['a']}",
            "--served-model-name", "tiny", "--device-memory", "256KiB", "--host-memory",
            "256KiB", "--block-size", "4", "--device", "cpu", "--policy", "vllm",
            "--api-key", "k", "--max-request-bytes", "4KiB") as (port, proc):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                               max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "a"}
        out = client.completions.create(model="a", prompt="w005 w006", max_tokens=3,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert len(out.choices[0].text.split()) == 3
        big = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                         headers={"Authorization": "Bearer k"},
                         json={"model": "a", "prompt": "w005 " * 1000})
        assert big.status_code == 413 and "4096 bytes" in big.json()["error"]["message"]
    assert f"serving 'tiny' on http://127.0.0.1:{port}/v1" in proc.output


def test_demo_serve_serves_the_demo_model_and_its_adapters(tmp_path):
    with fastlibra_process("demo", "--serve", "--policy", "fastlibra",
                           env={"FASTLIBRA_CACHE_DIR": str(tmp_path)}) as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0)
        ids = {m.id for m in client.models.list().data}
        assert "fastlibra-demo" in ids and "lora-1" in ids
        chat = client.chat.completions.create(
            model="lora-1", messages=[{"role": "user", "content": "w7 w42 w99"}],
            max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage.completion_tokens == 4


def test_the_vllm_lora_docs_command_line_runs_unchanged(tmp_path_factory):
    # vLLM's docs: `vllm serve MODEL --enable-lora --lora-modules sql-lora=PATH`
    base, adapters, ref = served_setup(tmp_path_factory)
    with fastlibra_process("serve", str(base), "--enable-lora",
                           "--lora-modules", f"sql-lora={adapters['a']}") as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(base), "sql-lora"]
        out = client.completions.create(model="sql-lora", prompt="w005 w006 w007",
                                        max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text.split() == [f"w{i:03d}" for i in ref.greedy(
            [5, 6, 7], "a", 5)]


def test_vllm_engine_flags_take_effect(tmp_path_factory, tmp_path):
    base, adapters, _ = served_setup(tmp_path_factory)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}w020 w021 {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}w022{% endif %}")
    json_module = json.dumps({"name": "b-lora", "path": str(adapters["b"]),
                              "base_model_name": "llama-base"})
    with fastlibra_process(
            "serve", str(base), "--enable-lora", "--lora-modules", f"sql-lora={adapters['a']}",
            json_module, "--max-loras", "1", "--max-lora-rank", "8", "--max-cpu-loras", "2",
            "--max-model-len", "64", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
            "--block-size", "4", "--dtype", "auto", "--seed", "0",
            "--no-enable-prefix-caching", "--swap-space", "0.0005", "--chat-template",
            str(template), "--served-model-name", "tiny", "tiny-alias", "--api-key", "k",
            "--host", "127.0.0.1", "--uvicorn-log-level", "warning", "--device", "cpu",
            "--device-memory", "256KiB") as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                               max_retries=0)
        models = {m.id: m for m in client.models.list().data}
        assert list(models) == ["tiny", "b-lora", "sql-lora"]
        assert models["b-lora"].parent == "llama-base"  # base_model_name of the JSON form
        assert models["tiny"].max_model_len == 64  # --max-model-len
        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model="tiny", prompt=[5] * 64, max_tokens=1)
        # the alias serves the base model; no KV is kept across requests
        prompt = " ".join(f"w{i:03d}" for i in range(10, 30))
        for _ in range(2):
            out = client.completions.create(model="tiny-alias", prompt=prompt, max_tokens=2)
            assert out.usage.prompt_tokens_details.cached_tokens == 0
        chat = client.chat.completions.create(
            model="sql-lora", messages=[{"role": "user", "content": "w005 w006"}],
            max_tokens=1)
        assert chat.usage.prompt_tokens == 5  # "w020 w021 w005 w006 w022": --chat-template


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_vllm_flags_we_cannot_honour_are_errors_naming_them(capsys, tmp_path):
    err = _cli_error(capsys, "serve", str(tmp_path), "--kv-cache-dtype", "fp8")
    assert "--kv-cache-dtype (a vLLM flag) is not supported: KV is stored in --dtype" in err
    err = _cli_error(capsys, "serve", str(tmp_path), "--tensor-parallel-size", "2")
    assert "--tensor-parallel-size 2" in err and "one device" in err
    err = _cli_error(capsys, "serve", str(tmp_path), "--lora-modules",
                     '{"name": "x", "path": "/p", "rank": 8}')
    assert "unknown keys: rank" in err
    err = _cli_error(capsys, "serve", str(tmp_path), "--swap-space", "4",
                     "--host-memory", "8GiB")
    assert "not allowed with argument --swap-space" in err
    err = _cli_error(capsys, "serve", str(tmp_path), "--max-cpu-loras", "1", "--max-loras", "2")
    assert "max_cpu_loras=1 must be at least max_loras (2)" in err
    err = _cli_error(capsys, "serve", "--enable-lora")
    assert "the model directory is required" in err
