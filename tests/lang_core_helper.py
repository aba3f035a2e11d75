"""A ``@triton.jit`` helper whose module names ``triton.language.core`` and not ``triton.language``
(``test_interpreter_speed.py``): the interpreter must patch ``core`` for it even inside a launch whose
kernel's module names ``tl`` alone."""

import triton
from triton.language import core


@triton.jit
def magnitude(x):
    return core.where(x < 0, -x, x)
