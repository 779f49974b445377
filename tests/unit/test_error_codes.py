"""Error codes live in agent/errors.py only: every place that names a code uses its constant.

The scan reads agent/ and tools/ as syntax trees and flags a string literal in a code position:
the first argument of an ``…Error(...)`` call (not a built-in exception) when it looks like a code, a ``code=`` keyword, the value of a ``"code"`` key
in a dict literal, a comparison with something named ``code``, the code of an error record
(``Err(...)``) sent between the daemon and a worker, and a code's own name
assigned its value (``BUSY = "busy"``).
"""

from __future__ import annotations

import ast
import builtins
import json
import pickle
import re
from pathlib import Path

from agent import errors

ROOT = Path(__file__).resolve().parents[2]
ERRORS_PY = ROOT / "agent" / "errors.py"
_VALUES = {c.value for c in errors.Code}
_CODE = re.compile(r"[a-z][a-z0-9_]*")  # what a code looks like (a message has spaces)


def _names_code(node: ast.AST) -> bool:
    """Whether an expression reads a code: ``code``, ``e.code``, ``x["code"]``, ``x.get("code")``."""
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id == "code":
            return True
        if isinstance(n, ast.Attribute) and n.attr == "code":
            return True
        if isinstance(n, ast.Constant) and n.value == "code":
            return True
    return False


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _literals(node: ast.AST) -> list[str]:
    """The string literals of a tuple, list or set display (``code in ("a", "b")``)."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [str(_literal(e)) for e in node.elts if _literal(e) is not None]
    return []


def literal_codes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, literal) for each string literal written where an error code belongs."""
    out: list[tuple[int, str]] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            first = _literal(n.args[0]) if n.args else None
            agent_error = name.endswith("Error") and not hasattr(builtins, name)
            if (agent_error or name == "Err") and first is not None and _CODE.fullmatch(first):
                out.append((n.lineno, str(_literal(n.args[0]))))
            for kw in n.keywords:
                if kw.arg == "code" and _literal(kw.value) is not None:
                    out.append((n.lineno, str(_literal(kw.value))))
        elif isinstance(n, ast.Dict):
            for k, v in zip(n.keys, n.values, strict=True):
                if _literal(k) == "code" and _literal(v) is not None:
                    out.append((n.lineno, str(_literal(v))))
        elif isinstance(n, ast.Compare):
            sides = [n.left, *n.comparators]
            if any(_names_code(s) for s in sides if _literal(s) is None and not _literals(s)):
                for s in sides:
                    lits = [_literal(s)] if _literal(s) is not None else _literals(s)
                    out.extend((n.lineno, str(lit)) for lit in lits if lit != "code")
        elif (isinstance(n, ast.Assign) and _literal(n.value) in _VALUES
              and any(isinstance(x, ast.Name) and x.id in errors.Code.__members__ for x in n.targets)):
            out.append((n.lineno, str(_literal(n.value))))  # a second definition of a code
    return out


def _sources() -> list[Path]:
    return [p for root in ("agent", "tools") for p in sorted((ROOT / root).rglob("*.py")) if p != ERRORS_PY]


def test_no_error_code_is_written_as_a_literal_outside_errors_py() -> None:
    found = [f"{p.relative_to(ROOT)}:{line}: {lit!r}"
             for p in _sources() for line, lit in literal_codes(ast.parse(p.read_text(), str(p)))]
    assert not found, "error codes written as literals (use agent.errors.Code):\n" + "\n".join(found)


def test_the_scan_finds_literal_codes() -> None:
    """The scan flags each code position it claims to cover, and leaves other strings alone."""
    src = '''
raise errors.RejectError("bad_signature", "x")
x = f(code="busy")
d = {"code": "timeout", "message": "m"}
if err.get("code") == "replayed": pass
if e.code in ("worker_hung",): pass
reply = Err("inference_failed", "m")
ok = {"state": "busy", "code": errors.BUSY}
log("internal", "not a code")
raise ValueError("unreachable")
PERMISSION_DENIED = "permission_denied"
CLOCK_UNTRUSTED_KEY = "clock_untrusted"
'''
    got = sorted(lit for _, lit in literal_codes(ast.parse(src)))
    assert got == ["bad_signature", "busy", "inference_failed", "permission_denied", "replayed", "timeout",
                   "worker_hung"]


def test_codes_keep_their_wire_values() -> None:
    """The enum members are the strings PROTOCOL.md names: JSON, pickles and comparisons see them."""
    assert errors.Code.BAD_SIGNATURE == "bad_signature"
    assert errors.WORKER_HUNG is errors.Code.WORKER_HUNG
    assert f"{errors.Code.TOO_LARGE}" == "too_large" and str(errors.Code.BUSY) == "busy"
    assert json.dumps({"code": errors.Code.DISK_FULL}) == '{"code": "disk_full"}'
    assert {errors.BUSY: 503}["busy"] == 503 and {"busy": 503}[errors.BUSY] == 503  # tables keyed either way
    assert pickle.loads(pickle.dumps(errors.Code.TIMEOUT)) is errors.Code.TIMEOUT
    assert errors.RejectError(errors.HASH_MISMATCH, "m").to_dict() == {"code": "hash_mismatch", "message": "m"}
    assert len({c.value for c in errors.Code}) == len(errors.Code)
