"""A safe calculator for the model's python tool: arithmetic and str.count, nothing else.

Evaluated by walking the AST (no eval, no signals, so it works in any thread). Sizes are bounded so a
model cannot make it burn CPU or memory: short expressions, small exponents, bounded results.
"""

from __future__ import annotations

import ast
import operator
import re

MAX_EXPR_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30
STRING_LITERAL_RE = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # the comma of 1,000 (not of 1,2 or 1,0000)

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


class _Reject(Exception):
    pass


def _eval(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        if not isinstance(node.value, str) and abs(node.value) > MAX_MAGNITUDE:
            raise _Reject
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(_eval(node.operand))
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _number(_eval(node.left)), _number(_eval(node.right))
        if isinstance(node.op, ast.Pow) and (not isinstance(right, int) or abs(right) > MAX_EXPONENT):
            raise _Reject  # small integer powers only
        result = _BINOPS[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise _Reject
        return result
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        target, arg = _eval(node.func.value), _eval(node.args[0])
        if isinstance(target, str) and isinstance(arg, str):
            return target.count(arg)
    raise _Reject


def _number(value):
    if isinstance(value, (int, float)):
        return value
    raise _Reject


def strip_thousands_separators(expr: str) -> str:
    """1,000 -> 1000 outside string literals; a comma inside quotes is text ('a,b'.count(',') is 1)."""
    pieces = STRING_LITERAL_RE.split(expr)  # odd indices are the literals
    return "".join(p if i % 2 else THOUSANDS_COMMA_RE.sub("", p) for i, p in enumerate(pieces))


def calculate(expr: str) -> int | float | None:
    """The value of a small arithmetic (or 'text'.count('x')) expression, or None if it is not one."""
    expr = strip_thousands_separators(expr).strip()
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        value = _eval(ast.parse(expr, mode="eval"))
    except (_Reject, SyntaxError, ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, (int, float)) else None
