"""The OpenAI-compatible HTTP server (`fastlibra serve`) and its benchmark client.

The server's names load on first use, so `fastlibra bench serve` (an HTTP client) does
not import torch, the model code or FastAPI."""

_SERVER_NAMES = ("ServerConfig", "build_app", "run_server", "serve")
__all__ = list(_SERVER_NAMES)


def __getattr__(name: str):
    if name in _SERVER_NAMES:
        from fastlibra.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'fastlibra.server' has no attribute {name!r}")
