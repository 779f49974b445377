"""Sizes a reader can hold: no module under agent/ over MAX_MODULE_LINES lines and no function
(or method) over MAX_FUNCTION_LINES lines, measured from its ``def`` line to its last line.

``ALLOWED`` names the offenders that are being split right now; it only shrinks, and an entry that
is no longer over its limit fails the test until it is removed.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
ALLOWED: set[str] = set()  # being split: each entry is removed with its split


def offenders(source: str, path: str, max_module_lines: int = MAX_MODULE_LINES,
              max_function_lines: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """Every part of ``source`` (the module at ``path``) over its limit: ``path`` for the module,
    ``path::Qual.name`` for a function or method, mapped to its length in lines."""
    out: dict[str, int] = {}
    lines = len(source.splitlines())
    if lines > max_module_lines:
        out[path] = lines
    tree = ast.parse(source, filename=path)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    if length > max_function_lines:
                        out[f"{path}::{qual}"] = length
                visit(child, qual + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def _agent_offenders() -> dict[str, int]:
    found: dict[str, int] = {}
    for p in sorted(AGENT.rglob("*.py")):
        rel = p.relative_to(AGENT.parent).as_posix()
        found.update(offenders(p.read_text(encoding="utf-8"), rel))
    return found


def _describe(found: dict[str, int]) -> str:
    return "; ".join(f"{name} ({n} lines; limit {MAX_FUNCTION_LINES if '::' in name else MAX_MODULE_LINES})"
                     for name, n in sorted(found.items()))


def test_no_module_or_function_under_agent_is_over_its_limit() -> None:
    found = _agent_offenders()
    over = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not over, f"split these by concern: {_describe(over)}"


def test_the_allow_list_names_only_current_offenders() -> None:
    stale = sorted(ALLOWED - set(_agent_offenders()))
    assert not stale, f"no longer over the limit (or gone): remove from ALLOWED: {', '.join(stale)}"


def _module(lines: int) -> str:
    return "".join(f"X{i} = {i}\n" for i in range(lines))


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly ``lines`` lines (the ``def`` line included)."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}() -> None:\n{body}"


def test_the_checker_names_a_module_that_grows_past_the_limit() -> None:
    assert offenders(_module(MAX_MODULE_LINES), "agent/m.py") == {}
    assert offenders(_module(MAX_MODULE_LINES + 1), "agent/m.py") == {"agent/m.py": MAX_MODULE_LINES + 1}


def test_the_checker_names_a_function_or_method_that_grows_past_the_limit() -> None:
    assert offenders(_function("f", MAX_FUNCTION_LINES), "agent/m.py") == {}
    assert offenders(_function("f", MAX_FUNCTION_LINES + 1), "agent/m.py") == {"agent/m.py::f": MAX_FUNCTION_LINES + 1}
    src = "class C:\n" + _function("ok", 3, "    ") + _function("long", MAX_FUNCTION_LINES + 5, "    ")
    assert offenders(src, "agent/m.py") == {"agent/m.py::C.long": MAX_FUNCTION_LINES + 5}
    nested = "def outer() -> None:\n" + _function("inner", MAX_FUNCTION_LINES + 1, "    ")
    found = offenders(nested, "agent/m.py")
    assert found == {"agent/m.py::outer": MAX_FUNCTION_LINES + 2, "agent/m.py::outer.inner": MAX_FUNCTION_LINES + 1}
