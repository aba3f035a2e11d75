"""No kernel source writes a ``-0.0`` literal: Triton 3.6, the GPU machines', compiles and interprets one
as ``+0.0`` (the PTX selects ``0f00000000``), while the CPU suite's newer Triton keeps the sign, so only
this rule catches it on a CPU. A kernel that needs ``-0.0`` builds it from its bits (``sparse_attn``'s
split marker)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "src" / "dsv4" / "kernels"
# after these a minus sign is unary (a sign), not a subtraction
_BEFORE_A_SIGN = {"(", "[", "{", ",", ":", "=", "+", "-", "*", "/", "%", "**", "<", ">", "==", "!=", "<=", ">="}
_BEFORE_A_SIGN |= {"return", "else", "if", "and", "or", "not", "in", "lambda", "yield"}


def negative_zero_literals(source: str) -> list[int]:
    """Lines of ``source`` with a minus sign before a float literal zero, or ``float("-0...")``
    (comments and docstrings aside)."""
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT}
    toks = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]
    lines = []
    for i, t in enumerate(toks):
        sign = i > 0 and toks[i - 1].string == "-" and (i == 1 or toks[i - 2].string in _BEFORE_A_SIGN)
        if t.type == tokenize.NUMBER and sign:
            literal = t.string.lower().rstrip("j")
            if any(c in literal for c in ".e") and not literal.startswith("0x") and float(literal) == 0.0:
                lines.append(toks[i - 1].start[0])
        if t.type == tokenize.STRING and i > 1 and toks[i - 1].string == "(" and toks[i - 2].string == "float":
            text = ast.literal_eval(t.string)
            if isinstance(text, str) and text.strip().startswith("-") and float(text) == 0.0:
                lines.append(t.start[0])
    return lines


def test_the_rule_finds_each_form_and_skips_comments_and_docstrings() -> None:
    source = '''
def f(x):
    """A docstring may say -0.0."""
    a = tl.where(x, -0.0, x)  # a comment may say -0.0 too
    b = -0.
    c = float("-0.0")
    d = -1.0 * x - 0
    e = x - 0.5 + (x - 0.0)
    return tl.where(x, - 0e0, a)
'''
    assert negative_zero_literals(source) == [4, 5, 6, 9]


def test_no_kernel_writes_a_negative_zero_literal() -> None:
    files = sorted(KERNELS.rglob("*.py"))
    assert files
    found = {str(p.relative_to(KERNELS)): lines for p in files if (lines := negative_zero_literals(p.read_text()))}
    assert not found, f"-0.0 literals (Triton 3.6 makes them +0.0; build -0.0 from its bits): {found}"
