"""Triton kernels of the model runner on CUDA (one kernel per file, with its launcher
and a plain-torch reference). On CPU they run under `TRITON_INTERPRET=1` for tests."""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's interpreter multiplies bfloat16 tiles wrongly (tl.dot reads their bits as
another type; triton 3.7.1), so interpreted kernels widen dot operands to float32 first.
Compiled kernels keep bfloat16 operands (tensor cores, float32 sums)."""


def kernels_wanted(device: torch.device) -> bool:
    """`FASTLIBRA_KERNELS=triton` forces the Triton path (on CPU it needs
    `TRITON_INTERPRET=1`), `=torch` the torch path; unset: Triton on CUDA when installed."""
    choice = os.environ.get("FASTLIBRA_KERNELS", "")
    if choice not in ("", "triton", "torch"):
        raise ValueError(f"FASTLIBRA_KERNELS={choice!r}: use 'triton' or 'torch'")
    if choice == "triton" and device.type != "cuda" and not INTERPRETED:
        raise ValueError("FASTLIBRA_KERNELS=triton off CUDA runs the kernels in Triton's "
                         "interpreter: set TRITON_INTERPRET=1 too")
    if choice:
        return choice == "triton"
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values -> a tensor on `device`; on CUDA through pinned memory without a
    blocking copy (a pageable upload would wait for the GPU to catch up)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
