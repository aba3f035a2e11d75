"""Triton's interpreter without a repeat of its per-call setup: ``triton.language`` patched once a launch.

When the interpreter launches a kernel it replaces every builtin of ``triton.language`` (and of the
tensor class, ``tl.math`` and ``tl.core`` where the kernel's module names them) with its NumPy
version, and restores them when the launch ends. It does the same again at every call of a
``@triton.jit`` helper inside the kernel, although those builtins are already replaced: a scan of
the modules' members by ``inspect.getmembers`` for each call, a third or more of the time of the
helper-heavy kernels here (``sparse_attn``'s tile loop, the q-head epilogue).

``patch_language_once_per_launch()`` skips that repeat where it changes nothing: at a helper whose
module names only language modules the launch has patched already. A helper that names another one
(``tl.core`` where the kernel's module names ``tl``), or none (which Triton refuses), goes through
Triton's own patch as before. Results are the same bits; only the interpreter's own work shrinks.
It is opt-in and process-wide: the ``dsv4`` command, the test suite and ``benchmarks/fuzz_ops.py``
turn it on; importing ``dsv4`` does not. It is taken only on the Triton releases whose interpreter
it was checked against (``CHECKED``, the whole suite on each); another runs as it comes.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

CHECKED = ((3, 6), (3, 9))  # the oldest and newest Triton releases (major, minor) whose interpreter this was checked on

_LANGS: dict[Any, frozenset[int]] = {}  # a kernel or helper function: the language modules its module names


class _Launch:
    patched: set[int] | None = None  # ids of the modules the launch in flight has patched; None between launches


def patch_language_once_per_launch() -> bool:
    """Patch ``triton.language`` once per interpreted launch, not again at each helper call.

    Returns True when the interpreter runs so from now on (also when an earlier call turned it on),
    False where the kernels are compiled, not interpreted, and on a Triton release outside ``CHECKED``
    or whose interpreter is not built as expected (then nothing is changed)."""
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    from .interpreter import interpreted

    if not interpreted():
        return False
    release = tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2])
    if not CHECKED[0] <= release <= CHECKED[1]:
        return False

    real_patch: Any = getattr(interpreter, "_patch_lang", None)
    if getattr(real_patch, "once_per_launch", False):
        return True
    executor: Any = getattr(interpreter, "GridExecutor", None)
    if not callable(real_patch) or "__call__" not in vars(executor or object):
        return False
    real_call = executor.__call__
    languages = (tl, tl.core)

    def langs_of(fn: Any) -> frozenset[int]:
        key = _LANGS.get(fn)
        if key is None:
            names = getattr(fn, "__globals__", {}).values()
            key = _LANGS[fn] = frozenset(id(v) for v in names if inspect.ismodule(v) and v in languages)
        return key

    def patch_lang(fn: Any) -> Any:
        langs, patched = langs_of(fn), _Launch.patched
        if patched and langs and langs <= patched:  # a helper inside a launch that has patched its modules
            return None  # a helper's call discards what the patch returns
        scope = real_patch(fn)
        if patched is not None:
            patched |= langs
        return scope

    def launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        _Launch.patched = set()
        try:
            return real_call(self, *args, **kwargs)
        finally:
            _Launch.patched = None

    patch_lang.once_per_launch = True  # type: ignore[attr-defined]
    interpreter._patch_lang = patch_lang
    executor.__call__ = launch
    return True
