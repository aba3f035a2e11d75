"""A ``@triton.jit`` helper whose module names both ``triton.language`` and ``triton.language.core``
(``test_interpreter_speed.py``): called from a kernel whose module names ``core`` alone, the interpreter
must still patch ``tl`` for it."""

import triton
import triton.language as tl
from triton.language import core


@triton.jit
def clamped_magnitude(x):
    return tl.minimum(core.where(x < 0, -x, x), 2.0)
