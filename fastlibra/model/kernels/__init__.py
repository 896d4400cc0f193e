"""Triton kernels of the model runner on CUDA (one kernel per file, with its launcher
and a plain-torch reference). On CPU they run under `TRITON_INTERPRET=1` for tests."""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's interpreter multiplies bfloat16 tiles wrongly (tl.dot reads their bits as
another type; triton 3.7.1), so interpreted kernels widen dot operands to float32 first.
Compiled kernels keep bfloat16 operands (tensor cores, float32 sums)."""
