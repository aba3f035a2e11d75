"""A ``@triton.jit`` helper whose module names ``triton.language.core`` and not ``triton.language``
(``test_interpreter_speed.py``): the interpreter must patch ``core`` for it even inside a launch whose
kernel's module names ``tl`` alone; and a kernel naming ``core`` alone whose helper names ``tl`` too."""

import triton
from triton.language import core

from lang_both_helper import root_magnitude


@triton.jit
def magnitude(x):
    return core.where(x < 0, -x, x)


@triton.jit
def root_magnitude_kernel(x_ptr, out_ptr):
    """A kernel whose module names ``core`` alone, calling a helper that names ``tl`` as well: 16 values."""
    offs = core.arange(0, 16)
    core.store(out_ptr + offs, root_magnitude(core.load(x_ptr + offs)))
