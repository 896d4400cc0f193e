"""A real FastLibra server on loopback for the tests, on the tiny served model of
tests/model/llmsetup.py (random Llama, word tokenizer with a chat template, PEFT adapters
"a" and "b"), built once per session, and an adapter root for dynamic loading:

    dyn      a copy of adapter a          broken   a safetensors file that is not one
    foreign  an adapter of another model  escape   a symlink to adapter b, outside
    huge     rank 64 on every projection: 512 KiB, more than a test server's device pool
    nan      a copy of adapter b with one NaN in layers.1.mlp.down_proj.lora_B
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from llmsetup import byte_setup, served_setup, word
from safetensors.torch import load_file, save_file
from tinymodels import make_adapter, make_model

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


_ROOTS: dict[str, Path] = {}


def adapter_root(tmp_path_factory) -> Path:
    """The adapter root drawn in the module docstring, built once per session."""
    if "root" not in _ROOTS:
        base, adapters, _ = served_setup(tmp_path_factory)
        root = tmp_path_factory.mktemp("adapter-root")
        shutil.copytree(adapters["a"], root / "dyn")
        other = make_model(tmp_path_factory.mktemp("other") / "base", "llama", seed=3,
                           hidden_size=32, intermediate_size=64)
        make_adapter(other, root / "foreign", r=4, alpha=8, seed=4)
        shutil.copytree(adapters["a"], root / "broken")
        (root / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        (root / "escape").symlink_to(adapters["b"], target_is_directory=True)
        make_adapter(base, root / "huge", r=64, alpha=64, seed=5, targets="all-linear")
        shutil.copytree(adapters["b"], root / "nan")
        weights = load_file(root / "nan" / "adapter_model.safetensors")
        key = next(k for k in weights if "layers.1.mlp.down_proj.lora_B" in k)
        weights[key][0, 0] = float("nan")
        save_file(weights, root / "nan" / "adapter_model.safetensors")
        _ROOTS["root"] = root
    return _ROOTS["root"]


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
