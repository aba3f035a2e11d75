"""A ``@triton.jit`` helper whose module names both ``triton.language`` and ``triton.language.core``
(``test_interpreter_speed.py``): called from a kernel whose module names ``core`` alone, the interpreter
must still patch ``tl`` for it."""

import triton
import triton.language as tl
from triton.language import core


@triton.jit
def root_magnitude(x):
    return tl.sqrt(core.where(x < 0, -x, x))  # tl.sqrt: triton.language.math, patched for tl alone
