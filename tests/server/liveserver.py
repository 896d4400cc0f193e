"""A real FastLibra server on loopback for the tests, on the tiny served model of
tests/model/llmsetup.py (random Llama, word tokenizer with a chat template, PEFT adapters
"a" and "b"), built once per session."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn
from llmsetup import byte_setup, served_setup, word

from fastlibra.llm import AsyncLLM
from fastlibra.server import ServerConfig, build_app

MODEL_NAME = "tiny-llama"


def words(ids) -> str:
    return " ".join(word(i) for i in ids)


class LiveServer:
    """uvicorn serving `build_app` in a thread on a free loopback port."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.engine = AsyncLLM(cfg.make_llm())
        self.app = build_app(self.engine, cfg)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def llm(self):
        return self.engine.llm

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()
        self.sock.close()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine has no request left (aborts land between steps)."""
        deadline = time.monotonic() + timeout
        while self.engine.call(lambda: self.llm.has_unfinished).result():
            if time.monotonic() > deadline:
                raise AssertionError(f"requests still running: {self.llm.unfinished_ids}")
            time.sleep(0.02)


@contextmanager
def live_server(tmp_path_factory, **overrides):
    base, adapters, _ = served_setup(tmp_path_factory)
    cfg = ServerConfig(base, dict(adapters), served_model_name=MODEL_NAME,
                       device_memory=overrides.pop("device_memory", 256 * 1024),
                       host_memory=overrides.pop("host_memory", 256 * 1024), dtype="float32",
                       device="cpu", block_size=4, **overrides)
    server = LiveServer(cfg).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def byte_server(tmp_path_factory, **overrides):
    """A server on the byte-tokenizer model (llmsetup.byte_setup) as "bytes", adapter
    "lora-0": JSON and tool calls can be written in its tokens."""
    base, adapters = byte_setup(tmp_path_factory)
    server = LiveServer(ServerConfig(base, dict(adapters), served_model_name="bytes",
                                     device_memory=2 << 20, host_memory=2 << 20,
                                     dtype="float32", device="cpu", **overrides)).start()
    try:
        yield server
    finally:
        server.stop()
