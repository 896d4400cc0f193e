"""`fastlibra serve` and `fastlibra demo --serve` as a user starts them: a separate
process on a free port, reached with the official client, stopped with SIGINT (Ctrl-C)
and exiting cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import openai
from llmsetup import served_setup


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
            "serve", "--model", str(base), "--adapter", f"a={adapters['a']}",
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
