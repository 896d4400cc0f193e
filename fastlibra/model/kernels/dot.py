"""The one tile product every kernel here uses, so its precision rules live in one place."""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b summed in float32: IEEE-exact for float32 operands (not TF32), and under the
    interpreter bfloat16 operands widened first (`kernels.INTERPRETED`)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
