"""The shape of the code that reviews keep asking for, checked so it stays that way."""

import ast
from pathlib import Path

from ponderlm.methods import METHODS

PACKAGE = Path(__file__).resolve().parent.parent / "ponderlm"
MAX_FUNCTION_LINES = 70


def functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node


def test_no_function_is_longer_than_seventy_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in functions() if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


def test_only_the_methods_package_names_a_method():
    """Everything else asks a method's capabilities; a name in code would be a branch on one method."""
    allowed = {("ponderlm/schema.py", "vanilla")}  # the default of Config.method
    named = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "methods" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = str(path.relative_to(PACKAGE.parent))
            if isinstance(node, ast.Constant) and node.value in METHODS and (where, node.value) not in allowed:
                named.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}")
    assert not named
