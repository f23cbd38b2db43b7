"""Rules for production code that a reviewer would otherwise check by eye."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "worker", "fewshot", "maml_serve")


def test_production_code_has_no_assert() -> None:
    # `python -O` strips asserts: a check that guards behaviour must raise a real error.
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Assert):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


# A function longer than this says in its docstring why it is not split ("Long because ...").
MAX_FUNCTION_LINES = 80


def _long_functions(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            reason = "Long because" in (ast.get_docstring(node) or "")
            if lines > MAX_FUNCTION_LINES and not reason:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_service_functions_are_short_or_say_why() -> None:
    assert _long_functions("app") == []
    assert _long_functions("worker") == []
