"""Interpreted launches whose programs run in a random order, as a GPU may schedule them.

Triton's interpreter runs a launch's programs one after another in grid order; a GPU runs them in
any order, and side by side. A kernel whose programs meet through memory (a last-arriver counter, a
pair's exchange word, a row's candidate list) must give the same bits whichever program comes first:
``programs_shuffled(seed)`` gives the interpreter's ``i``-th program the grid index of a seeded
permutation's ``i``-th entry, drawn again for every launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def programs_shuffled(seed: int) -> Iterator[None]:
    """Run each interpreted launch's programs in a random order, drawn from ``seed`` (interpreter only)."""
    import triton.runtime.interpreter as interp

    builder = interp.interpreter_builder
    real = builder.set_grid_idx
    rng = np.random.default_rng(seed)
    order: list[tuple[int, int, int]] = []

    def shuffled(x: int, y: int, z: int) -> None:
        nx, ny, nz = builder.grid_dim
        if (x, y, z) == (0, 0, 0):  # a new launch
            order[:] = [np.unravel_index(i, (nx, ny, nz)) for i in rng.permutation(nx * ny * nz)]
        real(*map(int, order[(x * ny + y) * nz + z]))

    builder.set_grid_idx = shuffled
    try:
        yield
    finally:
        del builder.set_grid_idx  # the instance attribute shadowed the method


def program_orders(shuffles: int = 2) -> tuple[int | None, ...]:
    """The orders a test runs a launch in: grid order (None), then, under the interpreter, ``shuffles``
    seeded random orders (compiled, the GPU picks its own)."""
    from dsv4.kernels.interpreter import interpreted

    return (None, *range(1, shuffles + 1)) if interpreted() else (None,)


def in_order(order: int | None) -> contextlib.AbstractContextManager[None]:
    """Grid order for None, else ``programs_shuffled(order)``."""
    return contextlib.nullcontext() if order is None else programs_shuffled(order)
