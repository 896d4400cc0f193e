"""The OpenAI-compatible HTTP server (`fastlibra serve`) and its benchmark client."""

from fastlibra.server.app import ServerConfig, build_app, run_server, serve

__all__ = ["ServerConfig", "build_app", "run_server", "serve"]
