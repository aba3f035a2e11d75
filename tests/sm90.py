"""Lower kernels to sm_90 (H100) cubins with the installed Triton: no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects, so the
compile tests also lower every kernel. A script runs in a subprocess because kernels defined under
``TRITON_INTERPRET=1`` cannot be compiled; it starts with ``COMPILE_SM90``, which defines
``compile_sm90`` and the pointer kinds ``F32``, ``I64``, ``I32``.
"""

from __future__ import annotations

import pytest

from subprocesses import run_python

COMPILE_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

F32, I64, I32 = "*fp32", "*i64", "*i32"


def compile_sm90(fn, signature, constexprs, num_warps, **options):
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    # As a launch specializes them: pointers from torch allocations and row strides are 16-aligned.
    aligned = [name for name, kind in signature.items() if kind.startswith("*") or "stride" in name]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **options})
    print("compiled", fn.__name__, constexprs)
    return kernel
"""


def run_compile_script(script: str, timeout: int) -> str:
    """Run ``COMPILE_SM90 + script`` in a fresh interpreter with the interpreter mode off -> its stdout."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot target sm_90")
    result = run_python(["-c", COMPILE_SM90 + script], timeout=timeout, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
