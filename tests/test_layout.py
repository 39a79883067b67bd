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
    """Everything else asks a method's capabilities; a name in code (`"vanilla"`, or `config.method ==
    Vanilla.name`) would be a branch on one method."""
    allowed = {("ponderlm/schema.py", "vanilla")}  # the default of Config.method
    classes = {method.__name__ for method in METHODS.values()}
    named = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "methods" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = str(path.relative_to(PACKAGE.parent))
            if isinstance(node, ast.Constant) and node.value in METHODS and (where, node.value) not in allowed:
                named.append(f"{where}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Name) and node.id in classes:
                named.append(f"{where}:{node.lineno} {node.id}")
            if isinstance(node, ast.ImportFrom) and classes & {alias.name for alias in node.names}:
                named.append(f"{where}:{node.lineno} import of a method class")
    assert not named


def imports_within_the_package() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside a function (either can close a circle)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ponderlm"):
                imported |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                             else node.module for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("ponderlm")}
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: each a path that ends where it starts."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                found.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_the_import_graph_has_no_circle():
    graph = imports_within_the_package()
    assert {"ponderlm.config", "ponderlm.schema", "ponderlm.methods"} <= graph.keys()
    assert "ponderlm.methods" in graph["ponderlm.config"]  # the scan sees imports
    assert circles({**graph, "ponderlm.schema": graph["ponderlm.schema"] | {"ponderlm.config"}})  # and would see one
    assert not circles(graph)
