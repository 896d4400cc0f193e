"""`fastlibra serve --replicas N`: N engines as one Ray Serve application.

    client ─► Ingress (FastAPI: in this process,  ─► EngineReplica × N (Ray Serve)
              or a Ray Serve deployment behind        AsyncLLM + build_app:
              Ray's proxy with --ingress ray)         the single server's routes
                API key, body limit                   and errors
                route info: adapter, prompt tokens
                load/unload, /metrics: to all
                everything else: to one, chosen by
                ReplicaRouter  ◄─────────────────────── record_routing_stats

Every replica runs the single server's app (`build_app`) in its own process, so routes,
streaming and errors are the same code; the ingress forwards each HTTP request to one
replica (its raw method, path, headers and body) and relays the response, chunk by chunk.
What the ingress adds: the router's view of the request (its adapter and prompt tokens,
tokenised here with the model's tokenizer), calls that must reach every replica
(adapter loads and unloads, /metrics, merged with a `replica` label), and the adapter
book: a small Ray actor that holds the adapters loaded at run time, so a replica started
later (or restarted by Ray) loads them too. With `--adapter-root`, a request naming an
unknown adapter first loads `ROOT/<name>` on every replica (vLLM's filesystem resolver).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, replace

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.config import RequestRouterConfig

from fastlibra.llm import AsyncLLM, _load_tokenizer
from fastlibra.router import ROUTERS, RouteCosts
from fastlibra.server import protocol as P
from fastlibra.server.app import (
    ServerConfig,
    _BodyLimit,
    build_app,
    check_api_key,
    check_name,
    resolve_adapter_path,
)
from fastlibra.server.ray_router import ReplicaRouter, live_router, routing_stats

log = logging.getLogger("fastlibra.cluster")
REPLICA = "EngineReplica"
UNAUTHENTICATED = ("/health", "/metrics", "/version")
REPLICA_HEADER = "x-fastlibra-replica"
"""Names the replica that answered (its Ray Serve replica id)."""
RESOLVE_RETRY_S = 10.0
"""A name the resolver did not find under the roots is not looked up again for this long."""
JSON = [(b"content-type", b"application/json")]
"""The headers of the ingress's own calls to replicas."""
BROADCAST = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@dataclass
class ClusterConfig:
    """`fastlibra serve --replicas N`: the single server's settings (each replica's)
    and how the replicas are laid out."""

    server: ServerConfig
    replicas: int = 2
    ray_address: str | None = None
    """Join this Ray cluster; None starts a local one."""
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    router: str = "fastlibra"
    routing_stats_period_s: float = 2.0
    """How often each replica publishes its residency (Ray's default is 10 s)."""
    app_name: str = "fastlibra"
    ingress: str = "local"
    """"local": the ingress runs in this process on uvicorn and calls the replicas
    through a Ray Serve deployment handle; "ray": it is a Ray Serve deployment behind
    Ray's HTTP proxy (restarted by Ray, a proxy per node), one hop more: about 7 ms more
    per request on the dev box (bench replicas measures both)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router {self.router!r}: choose from {', '.join(ROUTERS)}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must be >= 0")
        if not self.routing_stats_period_s > 0:
            raise ValueError("--routing-stats-period must be > 0")
        if self.ingress not in ("ray", "local"):
            raise ValueError(f"--ingress {self.ingress!r}: choose ray or local")

    @property
    def book_name(self) -> str:
        return f"{self.app_name}-adapters"


# -- the adapter book ------------------------------------------------------------------
@ray.remote(num_cpus=0)
class AdapterBook:
    """Adapters loaded at run time (name -> lora_path as the client gave it): what a
    replica started later must load to serve like the others."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def add(self, name: str, path: str) -> None:
        self.paths[name] = path

    def remove(self, name: str) -> None:
        self.paths.pop(name, None)

    def snapshot(self) -> dict[str, str]:
        return dict(self.paths)


def _book(cfg: ClusterConfig):
    return AdapterBook.options(name=cfg.book_name, namespace="fastlibra", get_if_exists=True,
                               lifetime="detached").remote()


# -- a replica -------------------------------------------------------------------------
class EngineReplica:
    """One engine and the single server's app over it, driven through `http`."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.engine = AsyncLLM(cfg.server.make_llm())
        self.app = build_app(self.engine, replace(cfg.server, api_key=None))
        self.roots = cfg.server.adapter_roots
        self.book = _book(cfg)
        self.stamp = 0
        self.id = serve.get_replica_context().replica_id.unique_id
        for name, path in ray.get(self.book.snapshot.remote()).items():
            self._load(name, path)

    def _load(self, name: str, path: str) -> None:
        """Load a book entry here, under the same root confinement as a client's load."""
        try:
            real = resolve_adapter_path(path, self.roots)
            self.engine.call(self.engine.llm.add_adapter, name, real).result()
        except Exception as e:  # the entry no longer loads (file gone): serve without it
            log.warning("adapter %s from %s did not load: %s", name, path, e)

    async def http(self, method: str, path: str, query: bytes, headers: list, body: bytes,
                   route: dict | None = None):
        """Run one HTTP request through the app: yields the response head
        ({status, headers}), then its body chunks. Closing the generator (the client
        left, or Ray cancelled the call) tells the app the client disconnected."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query, "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        asked = False

        async def receive():
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message) -> None:
            out.put_nowait(message)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: out.put_nowait(None))
        try:
            while (m := await out.get()) is not None:
                if m["type"] == "http.response.start":
                    yield {"status": m["status"], "headers": [
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in m["headers"]]
                        + [(REPLICA_HEADER, self.id)]}
                elif m["type"] == "http.response.body":
                    if m.get("body"):
                        yield m["body"]
                    if not m.get("more_body", False):
                        break
        finally:
            gone.set()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def http_whole(self, method: str, path: str, query: bytes, headers: list,
                         body: bytes, route: dict | None = None) -> tuple[dict, bytes]:
        """`http` in one reply, (head, body): one Ray message where a stream takes several,
        for every response but a completion's stream."""
        head, chunks = None, []
        async with contextlib.aclosing(self.http(method, path, query, headers, body)) as gen:
            async for item in gen:
                if head is None:
                    head = item
                else:
                    chunks.append(item)
        return head, b"".join(chunks)

    async def record_routing_stats(self) -> dict:
        """Ray calls this every routing-stats period: the book is checked (a replica
        that missed a broadcast catches up), then the cache's residency is published."""
        llm = self.engine.llm
        book = await self.book.snapshot.remote()
        loaded = set(await self.engine.run(lambda: llm.adapter_names))
        for name, path in book.items():
            if name not in loaded:
                await asyncio.to_thread(self._load, name, path)
        residency, costs = await self.engine.run(lambda: (llm.cache.residency(), _costs(llm)))
        self.stamp += 1
        return routing_stats(residency, costs, self.stamp)

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _costs(llm) -> RouteCosts:
    """What the router prices requests with, from this replica's calibrated profile."""
    cfg = llm.cache.cfg
    sizes = [a.nbytes for a in llm.cache.adapters.values()]
    return RouteCosts(llm.calibration.profile, cfg.block_size, cfg.block_bytes,
                      max(sizes, default=cfg.block_bytes))


# -- the ingress -----------------------------------------------------------------------
class Ingress:
    """The one HTTP entry: checks, routing information, fan-out, relaying."""

    def __init__(self, replicas, cfg: ClusterConfig) -> None:
        self.cfg, self.server = cfg, cfg.server
        self.replicas = replicas
        self.streams = replicas.options(stream=True)
        self.book = _book(cfg)
        self.known = set(self.server.adapters) | set(ray.get(self.book.snapshot.remote()))
        tok = _load_tokenizer(None, self.server.model_dir)
        if tok is not None and self.server.chat_template is not None:
            tok.chat_template = self.server.chat_template
        self.tokenizer = tok
        self.ids = itertools.count()
        self.unresolved: dict[str, float] = {}
        """Names the resolver did not find -> when it may look again."""
        self.bases = {self.server.model_name, str(self.server.model_dir),
                      *self.server.model_aliases}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.asgi()

    # -- routing information ------------------------------------------------------------
    def route_info(self, path: str, body: bytes) -> tuple[dict | None, bool]:
        """The adapter and prompt tokens of a completion or chat request (None for other
        routes), and whether it asks for a stream. Best effort: anything odd is left for
        the replica to refuse."""
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return None, False
        try:
            req = json.loads(body)
            model = req.get("model")
        except Exception:
            return None, False
        route = {"id": f"route-{next(self.ids)}",
                 "adapter": None if model in self.bases or not isinstance(model, str)
                 else model, "tokens": ()}
        try:
            route["tokens"] = prompt_tokens(req, self.tokenizer)
        except Exception:
            pass
        return route, req.get("stream") is True

    # -- calls to replicas ---------------------------------------------------------------
    async def replica_ids(self) -> list[str]:
        """The live replicas; the first call goes through the handle once, which makes
        its router and waits for a replica."""
        router = live_router(REPLICA)
        if router is None or not router.replica_ids():
            await self.whole("GET", "/health", b"", [], b"", None)
            router = live_router(REPLICA)
        return router.replica_ids() if router is not None else []

    async def whole(self, method, path, query, headers, body, route
                    ) -> tuple[int, list, bytes]:
        """A request answered in one piece: (status, headers, body)."""
        try:
            head, rest = await self.replicas.http_whole.remote(method, path, query, headers,
                                                               body, route=route)
        finally:
            _router_note("finished", route)
        return head["status"], head["headers"], rest

    async def stream(self, method, path, query, headers, body, route):
        """A request answered as a stream: its response head and the rest of it."""
        gen = self.streams.http.remote(method, path, query, headers, body, route=route)
        return await gen.__anext__(), gen

    async def on_each(self, method: str, path: str, body: bytes = b""
                      ) -> dict[str, tuple[int, list, bytes]]:
        """The same request on every live replica: replica id -> (status, headers, body).
        One after another: calls made while serving one request share Ray's internal
        request id, and Ray matches a chosen replica to its call by that id."""
        out = {}
        for r in await self.replica_ids():
            try:
                out[r] = await self.on_one(r, method, path, body)
            except Exception as e:  # that replica died meanwhile
                out[r] = (503, [], json.dumps(_unavailable(e)).encode())
        return out

    async def on_one(self, replica: str, method: str, path: str, body: bytes
                     ) -> tuple[int, list, bytes]:
        """A request of the ingress's own (a JSON body or none) on one replica."""
        route = {"id": f"to-{replica}-{next(self.ids)}", "target": replica}
        return await self.whole(method, path, b"", JSON, body, route)

    async def load_everywhere(self, name: str, path: str) -> Response:
        """Load on every replica, or on none: a replica's refusal unloads it from the
        others and is the answer."""
        body = json.dumps({"lora_name": name, "lora_path": path}).encode()
        results = await self.on_each("POST", "/v1/load_lora_adapter", body)
        failed = [res for res in results.values() if res[0] != 200]
        if failed:
            ok = [r for r, res in results.items() if res[0] == 200]
            undo = json.dumps({"lora_name": name}).encode()
            for r in ok:
                with contextlib.suppress(Exception):
                    await self.on_one(r, "POST", "/v1/unload_lora_adapter", undo)
            return _response(*failed[0])
        await self.book.add.remote(name, path)
        self.known.add(name)
        return _response(*next(iter(results.values())))

    async def resolve(self, model: str) -> None:
        """vLLM's filesystem resolver: an unknown adapter name found under an adapter
        root is loaded everywhere before its request is routed."""
        if model in self.known or model in self.bases or not self.server.adapter_roots:
            return
        try:
            check_name(model, self.server)
        except ValueError:
            return
        if time.monotonic() < self.unresolved.get(model, 0.0):
            return  # not found a moment ago: no fan-out per request for a bad name
        if (await self.load_everywhere(model, model)).status_code != 200:
            if len(self.unresolved) > 10_000:
                self.unresolved.clear()
            self.unresolved[model] = time.monotonic() + RESOLVE_RETRY_S

    # -- the app -------------------------------------------------------------------------
    def asgi(self) -> FastAPI:
        app = FastAPI(title="FastLibra", summary="OpenAI-compatible multi-LoRA serving "
                      "(replicas on Ray Serve)", version="0.1.0")
        app.add_middleware(_BodyLimit, max_bytes=self.server.max_request_bytes)
        key = self.server.api_key

        def refused(request: Request) -> Response | None:
            if request.url.path in UNAUTHENTICATED:
                return None
            try:
                check_api_key(key, request.headers.get("authorization", ""))
            except P.ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            return None

        @app.get("/metrics", include_in_schema=False)
        async def metrics(request: Request):
            results = await self.on_each("GET", "/metrics")
            return Response(merge_metrics({r: res[2].decode() for r, res in results.items()
                                           if res[0] == 200}), media_type=CONTENT_TYPE_LATEST)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def forward(request: Request, path: str):
            if (no := refused(request)) is not None:
                return no
            body = await request.body()
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
            path = request.url.path
            if path in BROADCAST and request.method == "POST":
                return await self.broadcast(path, headers, body)
            route, streaming = self.route_info(path, body)
            if route is not None and route["adapter"] is not None:
                await self.resolve(route["adapter"])
            query = request.url.query.encode()
            try:
                if not streaming:
                    return _response(*await self.whole(request.method, path, query, headers,
                                                       body, route))
                head, gen = await self.stream(request.method, path, query, headers, body,
                                              route)
            except Exception as e:  # the replica died before it answered
                return JSONResponse(_unavailable(e), status_code=503)
            return StreamingResponse(self._relay(gen, route), status_code=head["status"],
                                     headers=_kept(head["headers"]))

        return app

    async def broadcast(self, path: str, headers: list, body: bytes) -> Response:
        if path == "/v1/load_lora_adapter":
            try:
                req = json.loads(body)
                name, lora_path = req["lora_name"], req["lora_path"]
            except Exception:  # malformed: one replica gives the single server's error
                return _response(*await self.whole("POST", path, b"", headers, body, None))
            return await self.load_everywhere(name, lora_path)
        try:
            name = json.loads(body).get("lora_name")
        except Exception:
            name = None
        if isinstance(name, str):  # first, so no replica reloads it from the book
            await self.book.remove.remote(name)
            self.known.discard(name)
        results = await self.on_each("POST", path, body)
        ok = [res for res in results.values() if res[0] == 200]
        return _response(*(ok or list(results.values()))[0])

    async def _relay(self, gen, route: dict | None):
        """A stream's chunks as they come; a replica lost mid-stream ends the stream
        with an error event, the way a request failing mid-stream does."""
        first = True
        try:
            async for chunk in gen:
                if first:
                    _router_note("first_token", route)
                first = False
                yield chunk
        except Exception as e:
            yield f"data: {json.dumps(_unavailable(e))}\n\ndata: [DONE]\n\n".encode()
        finally:
            _router_note("finished", route)


def prompt_tokens(req: dict, tokenizer) -> tuple[int, ...]:
    """The token ids a replica will see for a completion or chat body (the first prompt
    of several), as the router hashes them; () when they cannot be told here."""
    if "messages" in req:
        text = tokenizer.apply_chat_template(req["messages"], tools=req.get("tools"),
                                             add_generation_prompt=True, tokenize=False)
        return tuple(tokenizer.encode(text))
    prompt = req.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # several prompts: the first one's
    if isinstance(prompt, str):
        return tuple(tokenizer.encode(prompt))
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return tuple(prompt)
    return ()


def _router_note(event: str, route: dict | None) -> None:
    """Tell the replicas' router (if it is in this process) a request's first token or
    end, as soon as the ingress sees it."""
    if route is not None and (router := live_router(REPLICA)) is not None:
        getattr(router, event)(route["id"])


def _unavailable(e: BaseException) -> dict:
    log.warning("replica call failed: %s", e)
    return P.ApiError(503, f"the replica serving this request failed ({type(e).__name__}); "
                      "retry", type="internal_error", code="replica_unavailable").body()


def _kept(headers: list) -> dict:
    """A replica's response headers, less the length (the ingress frames the body)."""
    return {k: v for k, v in headers if k.lower() != "content-length"}


def _response(status: int, headers: list, body: bytes) -> Response:
    return Response(body, status_code=status, headers=_kept(headers))


def merge_metrics(texts: dict[str, str]) -> str:
    """Every replica's /metrics as one exposition, each sample labelled `replica`."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                     fam.unit)
            merged.samples += [s._replace(labels={**s.labels, "replica": replica})
                               for s in fam.samples]

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()


# -- building and running --------------------------------------------------------------
def build_cluster_app(cfg: ClusterConfig):
    """The Ray Serve application: N engine replicas, behind the ingress deployment when
    `cfg.ingress` is "ray" (alone when the ingress runs in this process)."""
    router = RequestRouterConfig(
        request_router_class=f"{ReplicaRouter.__module__}.{ReplicaRouter.__name__}",
        request_router_kwargs={"policy": cfg.router, "block_size": cfg.server.block_size},
        request_routing_stats_period_s=cfg.routing_stats_period_s)
    replica = serve.deployment(
        EngineReplica, name=REPLICA, num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.server.max_num_seqs,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        request_router_config=router, health_check_period_s=2.0)
    if cfg.ingress == "local":
        return replica.bind(cfg)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress",
                               max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(cfg), cfg)


def start_ray(cfg: ClusterConfig) -> None:
    """Join `cfg.ray_address`, or start a local cluster sized for the replicas, and
    start Ray Serve: its HTTP proxy on --host/--port for the "ray" ingress, none for
    the local one (whose uvicorn takes that port)."""
    if not ray.is_initialized():
        if cfg.ray_address is not None:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:
            cpus = max(os.cpu_count() or 1, int(cfg.replicas * cfg.replica_cpus) + 1)
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port}
                if cfg.ingress == "ray" else {"location": "NoServer"})


class ClusterServer:
    """The application deployed (a fresh adapter book: run-time adapters do not outlive
    it) and, with the local ingress, uvicorn serving the ingress on a thread here."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.url = f"http://{cfg.server.host}:{cfg.server.port}"
        self.uvicorn = None

    def start(self) -> ClusterServer:
        import threading

        import uvicorn

        cfg = self.cfg
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(cfg.book_name, namespace="fastlibra"))
        if cfg.ingress == "ray":
            serve.run(build_cluster_app(cfg), name=cfg.app_name, route_prefix="/")
            return self
        handle = serve.run(build_cluster_app(cfg), name=cfg.app_name, route_prefix=None)
        app = Ingress(handle, cfg).asgi()
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            app, host=cfg.server.host, port=cfg.server.port,
            log_level=cfg.server.uvicorn_log_level))
        thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        thread.start()
        while not self.uvicorn.started:
            if not thread.is_alive():
                raise RuntimeError(f"the ingress did not start on {self.url}")
            time.sleep(0.02)
        self.thread = thread
        return self

    def stop(self) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
            self.thread.join(timeout=30)
        serve.delete(self.cfg.app_name)


def run_cluster(cfg: ClusterConfig) -> None:
    """Serve until interrupted (Ctrl-C), then take the application down."""
    for root in cfg.server.adapter_roots:
        if not root.is_dir():
            raise ValueError(f"--adapter-root {root}: not a directory")
    start_ray(cfg)
    print(f"[fastlibra serve] {cfg.replicas} replica(s) of {cfg.server.model_dir}, router "
          f"{cfg.router}, policy {cfg.server.policy}, ingress {cfg.ingress}", flush=True)
    server = ClusterServer(cfg).start()
    print(f"[fastlibra serve] serving '{cfg.server.model_name}' on {server.url}/v1",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        serve.shutdown()
