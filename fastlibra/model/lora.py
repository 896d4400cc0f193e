"""PEFT LoRA adapters: read, validate against the base model, hold as plain tensors.

    <dir>/adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                      "target_modules": [...], "use_rslora": false, ...}
    <dir>/adapter_model.safetensors  base_model.model.model.layers.{i}.{self_attn|mlp}.
                                     {module}.lora_{A|B}.weight

For a target linear layer W (out x in) the adapter adds `scaling * B @ A`, with
A: [r, in], B: [out, r], scaling = lora_alpha / r (or lora_alpha / sqrt(r) with rslora).
Anything we would serve differently from PEFT (DoRA, biases, per-module ranks, extra
trained modules) is rejected, never silently ignored; every error names the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fastlibra.config import LORA_TARGETS, LoraShape
from fastlibra.model.loader import ModelConfig, default_device, read_json, resolve_dtype

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_SUBMODULE = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp")
              for m in LORA_TARGETS}


class AdapterLoadError(ValueError):
    """An adapter directory cannot be served with this base model; says which file and why."""


def _fail(file: Path, msg: str) -> AdapterLoadError:
    return AdapterLoadError(f"{file}: {msg}")


@dataclass
class LoraWeights:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]


Parts = dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]]
"""(layer, module) -> [(A rows [k, in], B^T rows [k, out]), ...]: the low-rank update
split along the rank (sum of the parts' products = scaling * x @ A.T @ B.T)."""


@dataclass
class LoraAdapter:
    name: str
    rank: int
    scaling: float
    target_modules: tuple[str, ...]
    weights: dict[tuple[int, str], LoraWeights]
    """(layer index, module name) -> A and B as read; layers PEFT left out have no entry.
    Empty once the adapter lives in arena blocks (then only `parts` hold its bytes)."""
    path: Path
    parts: Parts = field(default_factory=dict)
    """What the forward pass multiplies: one part per key for separate tensors, or the
    chunks that fit in arena blocks (`ArenaLayout.views`)."""

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = {k: [(w.a, w.b.T)] for k, w in self.weights.items()}

    def shape(self, dtype_bytes: int = 2) -> LoraShape:
        """The cache-sizing view (blocks this adapter occupies)."""
        return LoraShape(self.rank, self.target_modules, dtype_bytes)

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())


@dataclass(frozen=True)
class ArenaChunk:
    """Rank rows [row, row + rows) of one (layer, module) update, stored in one block:
    `rows x fan_in` elements of A, then `rows x fan_out` of B^T, from `offset`."""

    key: tuple[int, str]
    row: int
    rows: int
    block: int
    """Index into the adapter's own list of blocks."""
    offset: int
    fan_in: int
    fan_out: int


class ArenaLayout:
    """Where an adapter's weights go in a list of arena blocks of `block_elems` elements.

    Rank rows are packed first-fit in (layer, module) order and a chunk never straddles
    two blocks, so every part is a plain view of one block: the forward pass reads the
    weights in place, and a swap copies whole blocks exactly as it copies KV. A matrix
    whose rows do not fit one block becomes several parts (its rank split)."""

    def __init__(self, adapter: LoraAdapter, block_elems: int) -> None:
        self.chunks: list[ArenaChunk] = []
        block, offset = 0, 0
        for key in sorted(adapter.weights):
            w = adapter.weights[key]
            fan_in, fan_out = w.a.shape[1], w.b.shape[0]
            row_elems = fan_in + fan_out
            if row_elems > block_elems:
                raise ValueError(f"adapter {adapter.name!r}: one rank row of {key[1]} needs "
                                 f"{row_elems} elements but a block holds {block_elems}; "
                                 "use a larger block size")
            row = 0
            while row < adapter.rank:
                fit = (block_elems - offset) // row_elems
                if fit == 0:
                    block, offset = block + 1, 0
                    continue
                rows = min(fit, adapter.rank - row)
                self.chunks.append(ArenaChunk(key, row, rows, block, offset, fan_in, fan_out))
                row += rows
                offset += rows * row_elems
        self.num_blocks = block + 1 if self.chunks else 0

    def write(self, adapter: LoraAdapter, blocks: list[torch.Tensor]) -> None:
        """Copy the adapter's weights into `blocks` (flat views, one per block)."""
        for c in self.chunks:
            w = adapter.weights[c.key]
            flat = blocks[c.block]
            a_end = c.offset + c.rows * c.fan_in
            flat[c.offset:a_end].copy_(w.a[c.row:c.row + c.rows].reshape(-1))
            flat[a_end:a_end + c.rows * c.fan_out].copy_(
                w.b[:, c.row:c.row + c.rows].T.reshape(-1))

    def views(self, blocks: list[torch.Tensor]) -> Parts:
        """The parts as views of `blocks` (no copy)."""
        parts: Parts = {}
        for c in self.chunks:
            flat = blocks[c.block]
            a_end = c.offset + c.rows * c.fan_in
            parts.setdefault(c.key, []).append(
                (flat[c.offset:a_end].view(c.rows, c.fan_in),
                 flat[a_end:a_end + c.rows * c.fan_out].view(c.rows, c.fan_out)))
        return parts


_FULL_NAME = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def _targets(raw: dict, file: Path, layer_ids: tuple[int, ...],
             num_layers: int) -> set[tuple[int, str]]:
    """The (layer, module) pairs the adapter must carry, as PEFT matches target_modules:
    a bare name ("q_proj") hits that projection in every adapted layer, a full name
    ("model.layers.3.self_attn.q_proj", as PEFT writes for "all-linear") one layer, a
    string is a regex over full names."""
    tm = raw.get("target_modules")
    if tm == "all-linear":
        tm = list(LORA_TARGETS)
    elif isinstance(tm, str):
        # PEFT full-matches a string as a regex against every module's full name.
        tm = [f"model.layers.{i}.{_SUBMODULE[m]}.{m}" for i in range(num_layers)
              for m in LORA_TARGETS
              if re.fullmatch(raw["target_modules"], f"model.layers.{i}.{_SUBMODULE[m]}.{m}")]
        if not tm:
            raise _fail(file, f"target_modules regex {raw['target_modules']!r} matches none "
                              f"of the adaptable projections {list(LORA_TARGETS)}")
    if not isinstance(tm, list) or not tm:
        raise _fail(file, f"target_modules must be a non-empty list, got {tm!r}")
    out: set[tuple[int, str]] = set()
    unknown = []
    for entry in tm:
        full = _FULL_NAME.match(entry) if isinstance(entry, str) else None
        if entry in LORA_TARGETS:
            out.update((layer, entry) for layer in layer_ids)
        elif full and full[3] in LORA_TARGETS and _SUBMODULE[full[3]] == full[2]:
            if int(full[1]) in layer_ids:
                out.add((int(full[1]), full[3]))
        else:
            unknown.append(entry)
    if unknown:
        raise _fail(file, f"unknown target module(s) {unknown}; supported: {list(LORA_TARGETS)}")
    return out


def _check_config(raw: dict, file: Path, model: ModelConfig, max_rank: int,
                  check_base: bool) -> tuple[int, float, set[tuple[int, str]]]:
    """(rank, scaling, (layer, module) pairs to adapt) from adapter_config.json."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise _fail(file, f"peft_type {raw.get('peft_type')!r} is not LORA")
    r = raw.get("r")
    if not isinstance(r, int) or r <= 0:
        raise _fail(file, f"r must be a positive integer, got {r!r}")
    if r > max_rank:
        raise _fail(file, f"rank r={r} is above the configured max_lora_rank={max_rank}")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise _fail(file, f"lora_alpha must be a number, got {alpha!r}")
    unsupported = [
        ("use_dora", raw.get("use_dora"), "DoRA adapters"),
        ("bias", raw.get("bias", "none") != "none" and raw.get("bias"), "trained biases"),
        ("lora_bias", raw.get("lora_bias"), "LoRA biases"),
        ("rank_pattern", raw.get("rank_pattern"), "per-module ranks"),
        ("alpha_pattern", raw.get("alpha_pattern"), "per-module alphas"),
        ("modules_to_save", raw.get("modules_to_save"), "fully trained extra modules"),
        ("fan_in_fan_out", raw.get("fan_in_fan_out"), "transposed (Conv1D) weights"),
        ("layer_replication", raw.get("layer_replication"), "layer replication"),
        ("trainable_token_indices", raw.get("trainable_token_indices"), "trained tokens"),
    ]
    for key, value, what in unsupported:
        if value:
            raise _fail(file, f"{key}={value!r}: {what} are not supported")
    layers = raw.get("layers_to_transform")
    if layers is None:
        layer_ids = tuple(range(model.num_layers))
    else:
        layer_ids = tuple([layers] if isinstance(layers, int) else layers)
        bad = [i for i in layer_ids if not 0 <= i < model.num_layers]
        if bad:
            raise _fail(file, f"layers_to_transform {bad} outside the base model's "
                              f"{model.num_layers} layers")
    targets = _targets(raw, file, layer_ids, model.num_layers)
    base = raw.get("base_model_name_or_path")
    if check_base and base and model.names and base not in model.names \
            and Path(base).name not in {Path(n).name for n in model.names}:
        raise _fail(file, f"base_model_name_or_path {base!r} does not match the base model "
                          f"({model.names[0]!r})")
    scaling = alpha / math.sqrt(r) if raw.get("use_rslora") else alpha / r
    return r, float(scaling), targets


def load_adapter(path: str | Path, model: ModelConfig, *, max_rank: int,
                 name: str | None = None, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str | None = None,
                 check_base: bool = True) -> LoraAdapter:
    """Read and validate a PEFT LoRA directory for `model`; tensors go to `device` in
    `dtype`. `check_base=False` accepts a `base_model_name_or_path` naming another copy
    of the same model (shapes are still checked)."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterLoadError(f"{root}: adapter directory not found")
    cfg_file, w_file = root / CONFIG_FILE, root / WEIGHTS_FILE
    try:
        raw = read_json(cfg_file)
    except ValueError as e:
        raise AdapterLoadError(str(e)) from None
    rank, scaling, targets = _check_config(raw, cfg_file, model, max_rank, check_base)
    if not w_file.exists():
        bins = " (adapter_model.bin is not supported)" if (root / "adapter_model.bin").exists() \
            else ""
        raise _fail(w_file, f"file not found{bins}")
    dtype = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else default_device()
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(w_file), framework="pt", device="cpu") as f:
            for key in sorted(f.keys()):
                m = _KEY.match(key)
                if m is None:
                    raise _fail(w_file, f"unexpected tensor {key!r} (only lora_A/lora_B "
                                        "weights of decoder-layer projections are supported)")
                layer, sub, module, ab = int(m[1]), m[2], m[3], m[4]
                short = f"layers.{layer}.{sub}.{module}.lora_{ab}"
                if module not in LORA_TARGETS or _SUBMODULE[module] != sub:
                    raise _fail(w_file, f"{short}: unknown target module {module!r}")
                if (layer, module) not in targets:
                    raise _fail(w_file, f"{short}: not a target of {CONFIG_FILE} "
                                        "(target_modules / layers_to_transform)")
                t = f.get_tensor(key)
                fan_in, fan_out = model.projection_dims(module)
                want = (rank, fan_in) if ab == "A" else (fan_out, rank)
                if tuple(t.shape) != want:
                    raise _fail(w_file, f"{short} has shape {tuple(t.shape)}, expected {want}")
                t = t.to(device=device, dtype=dtype)
                bad = int((~torch.isfinite(t)).sum())
                if bad:  # one NaN would poison every output of the adapter (and, freed,
                    # the blocks it leaves behind)
                    raise _fail(w_file, f"{short} has {bad} non-finite values (NaN or inf) "
                                        f"in {str(dtype).removeprefix('torch.')}")
                found.setdefault((layer, module), {})[ab] = t
    except SafetensorError as e:
        raise _fail(w_file, f"not a readable safetensors file ({e})") from None
    for layer, module in sorted(targets):
        got = found.get((layer, module), {})
        for ab in "AB":
            if ab not in got:
                raise _fail(w_file, f"missing layers.{layer}.{_SUBMODULE[module]}."
                                    f"{module}.lora_{ab}")
    weights = {k: LoraWeights(v["A"], v["B"]) for k, v in sorted(found.items())}
    modules = tuple(m for m in LORA_TARGETS if any(m == t for _, t in targets))
    return LoraAdapter(name=name or root.name, rank=rank, scaling=scaling,
                       target_modules=modules, weights=weights, path=root)
