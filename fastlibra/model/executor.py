"""The real model behind the engine: the `Runner` that computes steps and the `Mover`
that carries out the cache's copies.

    Engine ─Batch─► ModelExecutor.execute ─SeqInput per request─► ModelRunner.forward
                      (block tables from the scheduler's            │ logits [B, vocab]
                       allocations)                                  ▼
                    StepOutput(measured seconds, tokens) ◄── Sampler (rows whose context
                                                                      is complete)

    CacheManager.move ─Move─► ArenaMover.submit
        KV swap_out:  device arena[src] ──► host arena[dst]      (block-major, so one
        KV swap_in:   host arena[src]   ──► device arena[dst]     block = all layers)
        adapter load / load_host / swap_in / swap_out: the adapter's tensors are loaded
        from its directory or moved between devices; they live in `ModelRunner.adapters`
        (not in the arena yet), so its blocks in the books carry no bytes.

Copies are synchronous: `submit` returns after the bytes are in place, so nothing can
write into the source blocks the cache has already freed (see `swapper.Move`), and the
node is ready for compute at the `now` it was asked for (no step waits on it; its
seconds show up in the step's wall time). `estimate` answers `now` plus the copy's
expected seconds: what a synchronous copy costs the engine, the number the cost model
weighs against recomputing. With no per-layer waiting, run the scheduler with
`layerwise_copies=False`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from fastlibra.cache import Allocation, CacheManager, Move, MoveKind, Tier
from fastlibra.cache.tree import AdapterNode
from fastlibra.config import HardwareProfile
from fastlibra.engine.engine import StepOutput
from fastlibra.engine.scheduler import Batch
from fastlibra.model.forward import ModelRunner, SeqInput
from fastlibra.model.lora import LoraAdapter, LoraWeights, load_adapter
from fastlibra.model.sampling import GREEDY, Sampler, SamplingParams


class ModelExecutor:
    """Runs one engine step on the real model and samples the next tokens.

    `alloc_of(request_id)` returns the scheduler's `Allocation` of a running request
    (its block table); `set_sampling` gives a request its parameters (default greedy)."""

    max_fused_steps = 1

    def __init__(self, model: ModelRunner, alloc_of: Callable[[str], Allocation],
                 sampler: Sampler | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self.alloc_of = alloc_of
        self.sampler = sampler if sampler is not None else Sampler()
        self.clock = clock
        self._params: dict[str, SamplingParams] = {}
        self._per_token = 0.0
        """Running mean of measured seconds per computed token (for `step_estimate`)."""
        self.steps = 0

    def set_sampling(self, request_id: str, params: SamplingParams) -> None:
        self._params[request_id] = params

    def release(self, request_id: str) -> None:
        """The request is done: forget its parameters and generator."""
        self._params.pop(request_id, None)
        self.sampler.release(request_id)

    def step_estimate(self, batch: Batch) -> float:
        return self._per_token * batch.num_tokens

    def execute(self, batch: Batch, now: float) -> StepOutput:
        """Compute every prefill chunk and decode token of `batch`; sample a token for each
        request whose whole context (prompt + generated) is now computed. The duration is
        the measured wall time of this call."""
        assert batch.num_steps == 1, "the model runner computes one step at a time"
        t0 = self.clock()
        seqs: list[SeqInput] = []
        complete: list[str] = []  # request ids whose row gets a token, in seqs order
        rows: list[int] = []
        for item in batch.prefills:
            r = item.request
            end = item.prefix_len + item.num_tokens
            seqs.append(SeqInput(r.all_tokens[item.prefix_len:end], item.prefix_len,
                                 self.alloc_of(r.request_id).block_table(), r.adapter))
            if end >= len(r.prompt) + len(r.generated):
                complete.append(r.request_id)
                rows.append(len(seqs) - 1)
        for r in batch.decodes:
            pos = r.num_computed  # the last sampled token, whose KV is not computed yet
            seqs.append(SeqInput(r.all_tokens[pos:pos + 1], pos,
                                 self.alloc_of(r.request_id).block_table(), r.adapter))
            complete.append(r.request_id)
            rows.append(len(seqs) - 1)
        tokens: dict[str, list[int]] = {}
        if seqs:
            logits = self.model.forward(seqs)  # [len(seqs), vocab]
            if rows:
                params = [self._params.get(rid, GREEDY) for rid in complete]
                picked = self.sampler.sample(logits[rows], params, complete)
                tokens = {rid: [t] for rid, t in zip(complete, picked, strict=True)}
        duration = self.clock() - t0
        n = max(1, batch.num_tokens)
        self.steps += 1
        self._per_token += (duration / n - self._per_token) / min(self.steps, 20)
        return StepOutput(duration, tokens)


def adapter_to(adapter: LoraAdapter, device: torch.device | str,
               pin: bool = False) -> LoraAdapter:
    """The same adapter with its tensors on `device` (pinned host memory if `pin`)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.pin_memory() if pin else t

    return replace(adapter, weights={k: LoraWeights(move(w.a), move(w.b))
                                     for k, w in adapter.weights.items()})


class ArenaMover:
    """The cache's `Mover` for the real model: KV blocks between the device arena and a
    host arena of the same layout, adapters between disk, host and the model runner.

        host: [host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
              (pinned when the device arena is on CUDA)
    """

    def __init__(self, model: ModelRunner, host_blocks: int,
                 adapter_paths: Mapping[str, str | Path] | None = None, *,
                 max_rank: int = 256, hardware: HardwareProfile | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        data = model.kv.data
        self.device = data.device
        self.host = torch.empty((host_blocks, *data.shape[1:]), dtype=data.dtype,
                                pin_memory=data.is_cuda)
        self.adapter_paths: dict[str, Path] = {k: Path(v) for k, v in (adapter_paths or {}).items()}
        self.host_adapters: dict[str, LoraAdapter] = {}
        self.max_rank = max_rank
        self.hw = hardware or HardwareProfile()
        self.clock = clock
        self.bandwidth = {MoveKind.SWAP_IN: self.hw.h2d_bandwidth,
                          MoveKind.SWAP_OUT: self.hw.d2h_bandwidth}
        """Bytes/s of KV copies, refined by every measured copy."""
        self.seconds = {k: 0.0 for k in MoveKind}
        self.bytes = {k: 0 for k in MoveKind}
        self.moves = 0

    # -- the Mover protocol --------------------------------------------------------------
    def estimate(self, kind: MoveKind, nbytes: int, now: float) -> float:
        if kind in self.bandwidth:
            return now + nbytes / self.bandwidth[kind]
        return now + self.hw.disk_load_time(nbytes)

    def submit(self, move: Move, now: float) -> float:
        t0 = self.clock()
        if isinstance(move.node, AdapterNode):
            self._move_adapter(move.kind, move.node.name)
        else:
            self._move_kv(move)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = self.clock() - t0
        self.seconds[move.kind] += seconds
        self.bytes[move.kind] += move.nbytes
        self.moves += 1
        if move.kind in self.bandwidth and seconds > 0 and move.nbytes:
            bw = self.bandwidth[move.kind]
            self.bandwidth[move.kind] = bw + (move.nbytes / seconds - bw) / 4
        return now

    # -- KV ------------------------------------------------------------------------------
    def _move_kv(self, move: Move) -> None:
        if len(move.src_blocks) != len(move.dst_blocks):
            raise ValueError(f"{move.kind.value}: {len(move.src_blocks)} source blocks, "
                             f"{len(move.dst_blocks)} destination blocks")
        dev = self.model.kv.data
        if move.kind is MoveKind.SWAP_OUT:
            src = torch.tensor(move.src_blocks, dtype=torch.long, device=self.device)
            self.host[torch.tensor(move.dst_blocks, dtype=torch.long)] = dev[src].cpu()
        elif move.kind is MoveKind.SWAP_IN:
            dst = torch.tensor(move.dst_blocks, dtype=torch.long, device=self.device)
            dev[dst] = self.host[torch.tensor(move.src_blocks, dtype=torch.long)].to(self.device)
        else:
            raise ValueError(f"a KV node cannot {move.kind.value}: KV has no file on disk")

    # -- adapters ------------------------------------------------------------------------
    def add_adapter_path(self, name: str, path: str | Path) -> None:
        self.adapter_paths[name] = Path(path)

    def load(self, name: str, device: torch.device | str) -> LoraAdapter:
        """Read and validate adapter `name` from its directory onto `device`."""
        if name not in self.adapter_paths:
            raise KeyError(f"adapter {name!r} has no directory; add it with add_adapter_path")
        return load_adapter(self.adapter_paths[name], self.model.cfg, max_rank=self.max_rank,
                            name=name, dtype=self.model.w.dtype, device=device)

    def _install(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.model.adapters:
            self.model.remove_adapter(adapter.name)  # a stale copy of a dropped adapter
        self.model.add_adapter(adapter)

    def _move_adapter(self, kind: MoveKind, name: str) -> None:
        pin = self.device.type == "cuda"
        if kind is MoveKind.LOAD:
            self._install(self.load(name, self.device))
        elif kind is MoveKind.LOAD_HOST:
            self.host_adapters[name] = adapter_to(self.load(name, "cpu"), "cpu", pin)
        elif kind is MoveKind.SWAP_IN:
            host = self.host_adapters.pop(name, None)
            self._install(adapter_to(host, self.device) if host is not None
                          else self.load(name, self.device))
        elif kind is MoveKind.SWAP_OUT:
            self.host_adapters[name] = adapter_to(self.model.adapters[name], "cpu", pin)
            self.model.remove_adapter(name)

    def sync_adapters(self, cache: CacheManager) -> None:
        """Match the cache's books where they change without a move: forget copies it
        dropped (a drop moves nothing), and read the adapters it placed in host memory
        at registration. Afterwards the model runner holds exactly the adapters the cache
        has on device, and the host store those it has on host."""
        for name in list(self.model.adapters):
            node = cache.adapters.get(name)
            if node is None or node.tier is not Tier.DEVICE:
                self.model.remove_adapter(name)
        for name in list(self.host_adapters):
            node = cache.adapters.get(name)
            if node is None or node.tier is not Tier.HOST:
                del self.host_adapters[name]
        for name, node in cache.adapters.items():
            if node.tier is Tier.HOST and name not in self.host_adapters \
                    and name in self.adapter_paths:
                self._move_adapter(MoveKind.LOAD_HOST, name)
