"""`fastlibra serve` as a user starts it: a separate process on a free port, reached with
the official client, stopped with SIGINT (Ctrl-C) and exiting cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
from llmsetup import served_setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_the_openai_client_and_stops_on_ctrl_c(tmp_path_factory):
    base, adapters, _ = served_setup(tmp_path_factory)
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from fastlibra.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "serve", "--model", str(base),
           "--adapter", f"a={adapters['a']}", "--served-model-name", "tiny",
           "--device-memory", "256KiB", "--host-memory", "256KiB", "--block-size", "4",
           "--device", "cpu", "--policy", "vllm", "--port", str(port), "--api-key", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                               max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "a"}
        out = client.completions.create(model="a", prompt="w005 w006", max_tokens=3,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert len(out.choices[0].text.split()) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert f"serving 'tiny' on http://127.0.0.1:{port}/v1" in output
