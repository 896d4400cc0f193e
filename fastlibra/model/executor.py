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
        adapter swap_out / swap_in: the same block copies (its weights live in blocks)
        adapter load / load_host: read from its directory, packed into its blocks
                                  (`lora.ArenaLayout`); on device the model runner
                                  multiplies views of those blocks, never a copy

Copies run on a copy thread (CPU) or on a side CUDA stream driven by that thread, in
submission order, while the engine goes on scheduling and computing. `submit` does the
bookkeeping at once (an adapter leaving the device loses its views before its bytes
move) and returns when the copy is expected to be done, so the scheduler leaves a
request whose adapter or cached prefix is still in flight out of the next steps while
others run. Before a forward pass the executor calls `wait_for` with the blocks and
adapters that step touches: it waits only for the copies into those blocks, and for
every pending swap-out (their source blocks are free in the books and this step may
write into them). `async_copies=False` makes every copy synchronous instead.

Adapter loads are transactional: an adapter arriving on the device gets its views in
the model runner only in `wait_for` (or `drain`), on the engine thread, after its bytes
landed. A read that fails (its directory deleted or changed since it was checked) leaves
the adapter in `failed`: `wait_for` reports it, the executor fails the requests of the
step that use it, and `LLM` fails every other request waiting for it and unloads it
(it is not re-read on the next use: a directory that failed once is not trusted again
until it is loaded anew). Its blocks go back to the pool with whatever the read left in
them, never reachable through a view.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from fastlibra.cache import Allocation, CacheManager, Move, MoveKind, Tier
from fastlibra.cache.tree import AdapterNode
from fastlibra.config import HardwareProfile
from fastlibra.engine.engine import StepOutput
from fastlibra.engine.request import Request
from fastlibra.engine.scheduler import Batch
from fastlibra.model.forward import ModelRunner, SeqInput
from fastlibra.model.lora import ArenaLayout, LoraAdapter, load_adapter
from fastlibra.model.sampling import (
    GREEDY,
    Sampler,
    SamplingParams,
    TokenLogprobs,
    token_logprobs,
)


class RequestFailed(RuntimeError):
    """One request's part of a step failed; the other requests of the step go on.
    `adapter` names the adapter at fault (its files could not be read, its weights gave
    non-finite logits), None when the fault is not an adapter's."""

    def __init__(self, message: str, adapter: str | None = None) -> None:
        super().__init__(message)
        self.adapter = adapter

    @classmethod
    def unreadable(cls, adapter: str, error: Exception) -> RequestFailed:
        return cls(f"adapter {adapter!r} could not be read ({error}); it has been unloaded: "
                   "load it again once its files are back", adapter)


class ModelExecutor:
    """Runs one engine step on the real model and samples the next tokens.

    `alloc_of(request_id)` returns the scheduler's `Allocation` of a running request
    (its block table); `set_sampling` gives a request its parameters (default greedy).

    A failure is attributed to the requests it belongs to, never to the whole batch: an
    adapter whose read failed fails the requests using it, a forward pass whose kernel
    raises is retried one sequence at a time (only the sequences that fail alone fail), a row of
    non-finite logits or a draw that raises fails its request. Failed requests go to
    `StepOutput.failed` (and `failed`, for `LLM` to end them); the rest of the step is
    computed and sampled as if they had not been there."""

    max_fused_steps = 1

    def __init__(self, model: ModelRunner, alloc_of: Callable[[str], Allocation],
                 sampler: Sampler | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 wait_for: Callable[[Iterable[int], Iterable[str]], None] | None = None) -> None:
        self.model = model
        self.alloc_of = alloc_of
        self.wait_for = wait_for
        """`ArenaMover.wait_for`: blocks until the copies this step reads have landed, and
        gives adapters that landed their views (needed whenever an `ArenaMover` moves
        adapters); returns the adapters whose read failed."""
        self.sampler = sampler if sampler is not None else Sampler()
        self.clock = clock
        self._params: dict[str, SamplingParams] = {}
        self._logprobs: dict[str, list[TokenLogprobs]] = {}
        """Logprobs of sampled tokens not yet taken (`take_logprobs`), per request."""
        self._per_token = 0.0
        """Running mean of measured seconds per computed token (for `step_estimate`)."""
        self.steps = 0
        self.failed: dict[str, Exception] = {}
        """Requests failed by the steps so far; the caller takes and ends them."""
        self.on_step: Callable[[int, float], None] | None = None
        """Told (tokens computed, seconds) after every step: the engine's calibration."""

    def set_sampling(self, request_id: str, params: SamplingParams) -> None:
        self._params[request_id] = params

    def release(self, request_id: str) -> None:
        """The request is done: forget its parameters and generator."""
        self._params.pop(request_id, None)
        self._logprobs.pop(request_id, None)
        self.sampler.release(request_id)

    def take_logprobs(self, request_id: str) -> list[TokenLogprobs]:
        """Logprobs of the tokens sampled for the request since the last call, in order
        (empty unless its parameters ask for logprobs)."""
        return self._logprobs.pop(request_id, [])

    def step_estimate(self, batch: Batch) -> float:
        return self._per_token * batch.num_tokens

    def execute(self, batch: Batch, now: float) -> StepOutput:
        """Compute every prefill chunk and decode token of `batch`; sample a token for each
        request whose whole context (prompt + generated) is now computed. The duration is
        the measured wall time of this call."""
        assert batch.num_steps == 1, "the model runner computes one step at a time"
        t0 = self.clock()
        work: list[tuple[str, SeqInput, bool]] = []  # (request id, input, gets a token)
        for item in batch.prefills:
            r = item.request
            end = item.prefix_len + item.num_tokens
            work.append((r.request_id, SeqInput(r.all_tokens[item.prefix_len:end],
                                                item.prefix_len,
                                                self.alloc_of(r.request_id).block_table(),
                                                r.adapter),
                         end >= len(r.prompt) + len(r.generated)))
        for r in batch.decodes:
            pos = r.num_computed  # the last sampled token, whose KV is not computed yet
            work.append((r.request_id, SeqInput(r.all_tokens[pos:pos + 1], pos,
                                                self.alloc_of(r.request_id).block_table(),
                                                r.adapter), True))
        failed: dict[str, Exception] = {}
        if work and self.wait_for is not None:
            broken = self.wait_for((b for _, s, _ in work for b in s.block_table),
                                   {s.adapter for _, s, _ in work if s.adapter is not None})
            for rid, s, _ in work:
                if s.adapter in broken:
                    failed[rid] = RequestFailed.unreadable(s.adapter, broken[s.adapter])
            work = [w for w in work if w[0] not in failed]
        tokens: dict[str, list[int]] = {}
        if work:
            logits = self._forward(work, failed)  # [len(work), vocab]
            sample = [(i, rid, s) for i, (rid, s, last) in enumerate(work)
                      if last and rid not in failed]
            requests = {r.request_id: r for r in batch.decodes} | {
                p.request.request_id: p.request for p in batch.prefills}
            tokens = self._sample(logits, sample, failed, requests)
        duration = self.clock() - t0
        n = max(1, batch.num_tokens)
        self.steps += 1
        self._per_token += (duration / n - self._per_token) / min(self.steps, 20)
        self.failed.update(failed)
        if self.on_step is not None:
            self.on_step(batch.num_tokens, duration)
        return StepOutput(duration, tokens, failed)

    def _forward(self, work: list[tuple[str, SeqInput, bool]],
                 failed: dict[str, Exception]) -> torch.Tensor:
        """Logits [len(work), vocab] of the batch; if a kernel raises (a RuntimeError: out
        of memory, a launch failure), of each sequence alone (rewriting a sequence's KV
        slots writes the same values), and a sequence that fails alone fails its request
        (its row is left NaN: never sampled). A ValueError is the runner refusing the
        step's inputs (block tables, adapters): the engine's books are wrong, so it is
        not retried."""
        try:
            return self.model.forward([s for _, s, _ in work])
        except RuntimeError:  # whose fault it is is found just below
            pass
        rows = []
        for rid, s, _ in work:
            try:
                rows.append(self.model.forward([s]))
            except RuntimeError as e:  # this request's alone
                failed[rid] = RequestFailed(f"the forward pass failed: {e}", s.adapter)
                rows.append(torch.full((1, self.model.cfg.vocab_size), math.nan,
                                       device=self.model.w.device))
        return torch.cat(rows)

    def _sample(self, logits: torch.Tensor, rows: list[tuple[int, str, SeqInput]],
                failed: dict[str, Exception],
                requests: dict[str, Request]) -> dict[str, list[int]]:
        """One token per (row, request), and its logprobs if the request asks; a
        non-finite row or a failed draw fails its request only."""
        if not rows:
            return {}
        picked = logits[[i for i, _, _ in rows]]
        # A row's sum is NaN or inf if any logit is (and, rarely, if finite logits overflow
        # it): one value per row to test, and only the rows it flags are checked in full.
        finite = torch.isfinite(picked.sum(-1)).tolist()
        finite = [good or bool(torch.isfinite(picked[j]).all()) for j, good in enumerate(finite)]
        ok = [j for j, good in enumerate(finite) if good]
        for j, good in enumerate(finite):
            if not good:
                _, rid, s = rows[j]
                blame = f"adapter {s.adapter!r}" if s.adapter is not None else "the model"
                failed[rid] = RequestFailed(f"{blame} produced non-finite logits (inf or "
                                            "NaN) for this request", s.adapter)
        rids = [rows[j][1] for j in ok]
        params = [self._params.get(r, GREEDY) for r in rids]
        if len(ok) < len(rows):
            picked = picked[ok]
        got = self.sampler.sample(picked, params, rids,
                                  [(requests[r].prompt, requests[r].generated) for r in rids])
        drawn = [not isinstance(t, Exception) for t in got]
        lps = token_logprobs(picked, [t if d else 0 for t, d in zip(got, drawn, strict=True)],
                             [p.logprobs if d else None
                              for p, d in zip(params, drawn, strict=True)])
        tokens: dict[str, list[int]] = {}
        for rid, t, lp in zip(rids, got, lps, strict=True):
            if isinstance(t, Exception):
                failed[rid] = RequestFailed(f"sampling failed: {t}")
                continue
            tokens[rid] = [t]
            if lp is not None:
                self._logprobs.setdefault(rid, []).append(lp)
        return tokens


class ArenaMover:
    """The cache's `Mover` for the real model: blocks between the device arena and a host
    arena of the same layout (KV and adapters alike), adapters from their directories.

        host: [host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
              (pinned when the device arena is on CUDA)

    With a static adapter region (`vllm`, `sglang`), the cache numbers the adapter pool's
    blocks from 0: they are the arena blocks after the KV pool's (`adapter_block_offset`).
    """

    def __init__(self, model: ModelRunner, host_blocks: int, *, max_rank: int = 256,
                 hardware: HardwareProfile | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 async_copies: bool = True) -> None:
        self.model = model
        data = model.kv.data
        self.device = data.device
        # Zeros, not empty: a block's unused tail (an adapter's last block) travels with
        # it and may later sit in a KV block's masked slots, where NaN garbage would
        # poison attention (masked weights are 0, but 0 * NaN is NaN).
        self.host = torch.zeros((host_blocks, *data.shape[1:]), dtype=data.dtype)
        self._unpin = None
        if data.is_cuda and self.host.numel() > 0:
            _register(self.host)
            self._unpin = weakref.finalize(self, _unregister, self.host.data_ptr())
        self.adapter_paths: dict[str, Path] = {}
        self.layouts: dict[str, tuple[LoraAdapter, ArenaLayout]] = {}
        """Per adapter: its metadata (no tensors) and where its weights sit in blocks."""
        self.on_host: dict[str, list[int]] = {}
        """Adapters whose bytes are in the host arena, and in which blocks."""
        self.adapter_block_offset = 0
        self.max_rank = max_rank
        self.hw = hardware or HardwareProfile()
        self.clock = clock
        self.bandwidth = {MoveKind.SWAP_IN: self.hw.h2d_bandwidth,
                          MoveKind.SWAP_OUT: self.hw.d2h_bandwidth}
        """Bytes/s of block copies, refined by every measured copy."""
        self.load_s_per_byte: float | None = None
        """Seconds per byte of adapter reads from disk (parse included), once measured:
        the hardware profile's guess is a GPU server's, not this machine's."""
        self.seconds = {k: 0.0 for k in MoveKind}
        self.bytes = {k: 0 for k in MoveKind}
        self.moves = 0
        self.async_copies = async_copies
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="fastlibra-copy")
                        if async_copies else None)
        self._stream = torch.cuda.Stream(self.device) if async_copies and data.is_cuda else None
        self._lock = threading.Lock()
        self._inflight: list[Future] = []
        self._swap_outs: list[Future] = []
        self._block_ready: dict[int, Future] = {}
        """Device block -> the copy writing into it (swap-in or load)."""
        self._adapter_ready: dict[str, Future] = {}
        self._arriving: dict[str, list[int]] = {}
        """Adapters on their way to the device (their cache blocks): views once landed."""
        self.failed: dict[str, Exception] = {}
        """Adapters whose read from disk failed (written by the copy thread); `LLM`
        fails their requests and unloads them, and `forget_adapter` clears the entry."""

    # -- the Mover protocol --------------------------------------------------------------
    def estimate(self, kind: MoveKind, nbytes: int, now: float) -> float:
        if kind in self.bandwidth:
            return now + nbytes / self.bandwidth[kind]
        if self.load_s_per_byte is not None:
            return now + nbytes * self.load_s_per_byte
        return now + self.hw.disk_load_time(nbytes)

    def submit(self, move: Move, now: float) -> float:
        """Book the move now, copy its bytes on the copy thread; returns when the copy is
        expected to be done (`now` itself when copies are synchronous)."""
        work = self._book(move)
        if self._worker is None:
            self._timed(move, work, None)
            return now
        event = None
        if self._stream is not None:
            # A swap-out must see what the compute stream wrote so far; a swap-in or load
            # must not overwrite blocks a step queued before it still reads.
            event = torch.cuda.Event()
            event.record()
        fut = self._worker.submit(self._timed, move, work, event)
        self._inflight = [f for f in self._inflight if not f.done()] + [fut]
        if move.kind is MoveKind.SWAP_OUT:
            self._swap_outs.append(fut)
        elif move.kind in (MoveKind.SWAP_IN, MoveKind.LOAD):
            offset = self.adapter_block_offset if isinstance(move.node, AdapterNode) else 0
            for b in move.dst_blocks:
                self._block_ready[b + offset] = fut
            if isinstance(move.node, AdapterNode):
                self._adapter_ready[move.node.name] = fut
        return self.estimate(move.kind, move.nbytes, now)

    def _timed(self, move: Move, work: Callable[[], None], event) -> None:
        t0 = self.clock()
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    if event is not None:
                        self._stream.wait_event(event)
                    work()
                self._stream.synchronize()
            else:
                work()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        except Exception as e:
            if not isinstance(move.node, AdapterNode):
                raise  # a KV copy between arenas: nothing to blame but the engine
            with self._lock:
                self.failed[move.node.name] = e
            return
        seconds = self.clock() - t0
        with self._lock:
            self.seconds[move.kind] += seconds
            self.bytes[move.kind] += move.nbytes
            self.moves += 1
            if move.kind in self.bandwidth and seconds > 0 and move.nbytes:
                bw = self.bandwidth[move.kind]
                self.bandwidth[move.kind] = bw + (move.nbytes / seconds - bw) / 4
            elif move.nbytes:  # a read from disk
                rate = seconds / move.nbytes
                old = self.load_s_per_byte
                self.load_s_per_byte = rate if old is None else old + (rate - old) / 4

    def wait_for(self, blocks: Iterable[int], adapters: Iterable[str]) -> dict[str, Exception]:
        """Before a step: every pending swap-out, and the copies into `blocks` (device
        arena ids) and into the given adapters' blocks; adapters that landed get their
        views. Returns the given adapters whose read failed, with the error."""
        for fut in self._swap_outs:
            fut.result()
        self._swap_outs.clear()
        # Most steps have no copy in flight: then the block tables are not walked at all.
        waits = [self._block_ready.pop(b, None) for b in blocks] if self._block_ready else []
        adapters = list(adapters)
        if self._adapter_ready:
            waits += [self._adapter_ready.pop(a, None) for a in adapters]
        for fut in waits:
            if fut is not None:
                fut.result()
        with self._lock:
            failed = {a: self.failed[a] for a in adapters if a in self.failed}
        for a in adapters:
            if a in self._arriving and a not in failed:
                self._install(a, self._arriving.pop(a))
        return failed

    def failed_adapters(self) -> dict[str, Exception]:
        with self._lock:
            return dict(self.failed)

    def drain(self) -> None:
        """Until every submitted copy is done; adapters that landed get their views."""
        for fut in self._inflight:
            fut.result()
        self._inflight.clear()
        self._swap_outs.clear()
        self._block_ready.clear()
        self._adapter_ready.clear()
        for name in [a for a in self._arriving if a not in self.failed]:
            self._install(name, self._arriving.pop(name))

    def close(self) -> None:
        self.drain()
        if self._worker is not None:
            self._worker.shutdown()
        if self._unpin is not None:
            torch.cuda.synchronize(self.device)
            self._unpin()  # at most once, here or when the mover is collected

    # -- blocks ---------------------------------------------------------------------------
    def _copy_blocks(self, move: Move, offset: int = 0) -> None:
        """swap_out: device[src] -> host[dst]; swap_in: host[src] -> device[dst]."""
        if len(move.src_blocks) != len(move.dst_blocks):
            raise ValueError(f"{move.kind.value}: {len(move.src_blocks)} source blocks, "
                             f"{len(move.dst_blocks)} destination blocks")
        dev = self.model.kv.data
        if move.kind is MoveKind.SWAP_OUT:
            pairs = [(b + offset, h) for b, h in zip(move.src_blocks, move.dst_blocks,
                                                     strict=True)]
            for d, h, n in _runs(pairs):  # straight into the (pinned) host arena
                self.host[h:h + n].copy_(dev[d:d + n], non_blocking=True)
        elif move.kind is MoveKind.SWAP_IN:
            pairs = [(b + offset, h) for b, h in zip(move.dst_blocks, move.src_blocks,
                                                     strict=True)]
            for d, h, n in _runs(pairs):
                dev[d:d + n].copy_(self.host[h:h + n], non_blocking=True)
        else:
            raise ValueError(f"{move.kind.value} is not a block copy (KV has no file on disk)")

    def resize_host(self, host_blocks: int) -> None:
        """A host arena of `host_blocks` blocks; only before anything has moved into it."""
        assert not self.on_host and not self.moves, "the host arena is in use"
        self.host = torch.zeros((host_blocks, *self.host.shape[1:]), dtype=self.host.dtype,
                                pin_memory=self.host.is_pinned())

    # -- adapters ------------------------------------------------------------------------
    def read_adapter(self, name: str, path: str | Path) -> int:
        """Read and check adapter `name` in `path`; remember where it goes. Returns the
        bytes of the arena blocks it occupies (what the cache should book)."""
        adapter = self.load_from(name, Path(path))
        layout = ArenaLayout(adapter, self.model.kv.block_elems)
        self.adapter_paths[name] = Path(path)
        self.layouts[name] = (_metadata(adapter), layout)
        return layout.num_blocks * self.model.kv.block_bytes

    def forget_adapter(self, name: str) -> None:
        self.adapter_paths.pop(name, None)
        self.layouts.pop(name, None)
        self.on_host.pop(name, None)
        self._arriving.pop(name, None)
        with self._lock:
            self.failed.pop(name, None)

    def load_from(self, name: str, path: Path) -> LoraAdapter:
        return load_adapter(path, self.model.cfg, max_rank=self.max_rank, name=name,
                            dtype=self.model.w.dtype, device="cpu")

    def _flat(self, arena: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        return [arena[b].view(-1) for b in blocks]

    def _device_blocks(self, blocks: list[int]) -> list[int]:
        return [b + self.adapter_block_offset for b in blocks]

    def _install(self, name: str, device_blocks: list[int]) -> None:
        """Register the adapter with the model runner as views of its device blocks
        (only once its bytes are there: see the module docstring)."""
        meta, layout = self.layouts[name]
        if name in self.model.adapters:
            self.model.remove_adapter(name)  # a stale entry of a dropped adapter
        views = layout.views(self._flat(self.model.kv.data, self._device_blocks(device_blocks)))
        self.model.add_adapter(LoraAdapter(meta.name, meta.rank, meta.scaling,
                                           meta.target_modules, {}, meta.path, views))

    def _write(self, name: str, arena: torch.Tensor, blocks: list[int]) -> None:
        """Read the adapter's file and pack it into `blocks` of `arena`."""
        _, layout = self.layouts[name]
        adapter = self.load_from(name, self.adapter_paths[name])
        if arena.is_cuda:  # staged in pinned memory, copied block run by block run
            staging = torch.zeros((len(blocks), self.model.kv.block_elems), dtype=arena.dtype,
                                  pin_memory=True)
            layout.write(adapter, list(staging))
            staging = staging.view(len(blocks), *arena.shape[1:])
            for d, i, n in _runs([(b, i) for i, b in enumerate(blocks)]):
                arena[d:d + n].copy_(staging[i:i + n], non_blocking=True)
        else:
            layout.write(adapter, self._flat(arena, blocks))

    def _book(self, move: Move) -> Callable[[], None]:
        """What changes at once (which adapters the model runner sees, and where), and
        the byte copy that may run later."""
        if not isinstance(move.node, AdapterNode):
            return partial(self._copy_blocks, move)
        name = move.node.name
        if name not in self.layouts:
            raise KeyError(f"adapter {name!r} has no directory; read it with read_adapter")
        kind = move.kind
        if kind is MoveKind.LOAD:
            self._arriving[name] = list(move.dst_blocks)
            return partial(self._write, name, self.model.kv.data,
                           self._device_blocks(move.dst_blocks))
        if kind is MoveKind.LOAD_HOST:
            self.on_host[name] = list(move.dst_blocks)
            return partial(self._write, name, self.host, move.dst_blocks)
        if kind is MoveKind.SWAP_IN:
            self.on_host.pop(name, None)
            self._arriving[name] = list(move.dst_blocks)
        else:
            self._uninstall(name)
            self.on_host[name] = list(move.dst_blocks)
        return partial(self._copy_blocks, move, self.adapter_block_offset)

    def _uninstall(self, name: str) -> None:
        self._arriving.pop(name, None)
        if name in self.model.adapters:
            self.model.remove_adapter(name)

    def sync_adapters(self, cache: CacheManager) -> None:
        """Match the cache's books where they change without a move: forget copies it
        dropped (a drop moves nothing), and read the adapters it placed in host memory
        at registration. Afterwards the model runner holds exactly the adapters the cache
        has on device, and the host arena those it has on host."""
        self.forget_dropped(cache)
        for name, node in cache.adapters.items():
            if node.tier is Tier.HOST and name not in self.on_host and name in self.layouts:
                self.drain()  # its host blocks may be the source of a copy in flight
                self._write(name, self.host, node.blocks)
                self.on_host[name] = list(node.blocks)

    def forget_dropped(self, cache: CacheManager) -> None:
        """The part of `sync_adapters` a step needs: only registration places adapters
        without a move, so between steps only drops are left to reconcile (and only the
        resident adapters are looked at, not every registered one)."""
        for name in list(self.model.adapters) + list(self._arriving):
            node = cache.adapters.get(name)
            if node is None or node.tier is not Tier.DEVICE:
                self._uninstall(name)
        for name in list(self.on_host):
            node = cache.adapters.get(name)
            if node is None or node.tier is not Tier.HOST:
                del self.on_host[name]


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(a, b) block pairs -> (a0, b0, n) runs where both sides are consecutive: one copy
    per run instead of an index gather into a temporary."""
    runs: list[tuple[int, int, int]] = []
    for a, b in pairs:
        if runs and runs[-1][0] + runs[-1][2] == a and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((a, b, 1))
    return runs


_REGISTERED: dict[int, torch.Tensor] = {}
"""Host arenas page-locked with CUDA, by address: held here so that their memory is
never freed (and reused by a later allocation) while still registered."""


def _register(host: torch.Tensor) -> None:
    """Page-lock `host` in place so copies to and from it are asynchronous DMA. torch's
    pinned allocator rounds every allocation up to a power of two (a 40 GB host arena
    would pin 64 GB); registering the plain allocation pins exactly its bytes."""
    err = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.nbytes, 0))
    if err != 0:
        raise RuntimeError(f"cannot page-lock the {host.nbytes} byte host arena "
                           f"(cudaHostRegister error {err}); lower --host-memory")
    _REGISTERED[host.data_ptr()] = host


def _unregister(ptr: int) -> None:
    if _REGISTERED.pop(ptr, None) is not None:
        torch.cuda.cudart().cudaHostUnregister(ptr)


def _metadata(adapter: LoraAdapter) -> LoraAdapter:
    """The adapter without tensors: what `_install` needs besides the views."""
    return LoraAdapter(adapter.name, adapter.rank, adapter.scaling, adapter.target_modules,
                       {}, adapter.path, {})
