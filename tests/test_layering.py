"""The package's floors, read from its source: which module imports which.

Every `import` in src/scribelm is read with `ast` (nothing is imported), and three
rules are checked:

- no import cycles among modules. Imports at module level count; an import inside
  a function runs when it is called, so it is allowed to point upward only where the
  pair is listed in LAZY_UPWARD below with the reason;
- only `cli/` and `serve/` itself import `scribelm.serve` (training and loading never
  depend on serving);
- only the kernels package (the package that holds `native/`) imports `native`;
- the model (`model.py`) is plain PyTorch: it imports neither the kernels package,
  nor training, nor serving.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "scribelm"

# (importer, imported): function-level imports that close a cycle on purpose.
LAZY_UPWARD: dict[tuple[str, str], str] = {
    ("scribelm.serve.engine", "scribelm.serve.seq2seq_engine"):
        "the model pool builds the encoder-decoder engine, a subclass of Engine, for a T5",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SOURCE / PACKAGE).rglob("*.py"))}


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name lands in: itself, or the package whose attribute it is."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """Modules of the package that `name` imports -> whether at module level (True) or
    only inside functions (False)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, bool] = {}

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                targets = [stem] + [f"{stem}.{alias.name}" for alias in child.names]
            if _is_type_checking(child):
                continue
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != name:
                        found[resolved] = found.get(resolved, False) or top
            visit(child, inner)

    visit(tree, True)
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph() -> dict[str, dict[str, bool]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _parents(name: str) -> list[str]:
    """A module's enclosing packages, which Python imports before it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return cycles


def _without_package_inits(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its own modules is not a cycle between floors:
    an edge from a module to one of its own enclosing packages is left out."""
    return {src: {dst for dst in targets if dst not in _parents(src)} for src, targets in edges.items()}


def test_no_import_cycles_at_module_level():
    graph = import_graph()
    edges = _without_package_inits({src: {dst for dst, top in targets.items() if top} for src, targets in graph.items()})
    assert find_cycles(edges) == []


def test_function_level_imports_make_no_cycle_unless_listed():
    graph = import_graph()
    edges = {src: set(targets) - {dst for (s, dst) in LAZY_UPWARD if s == src} for src, targets in graph.items()}
    assert find_cycles(_without_package_inits(edges)) == []
    for src, dst in LAZY_UPWARD:  # the list holds no stale entries
        assert dst in graph.get(src, {}), f"{src} no longer imports {dst}; remove it from LAZY_UPWARD"


def test_only_cli_and_serve_import_serve():
    offenders = sorted(
        f"{src} imports {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if (dst == "scribelm.serve" or dst.startswith("scribelm.serve."))
        and not src.startswith(("scribelm.serve", "scribelm.cli"))
    )
    assert offenders == []


def test_only_the_kernels_package_imports_native():
    graph = import_graph()
    natives = [name for name in graph if name.rpartition(".")[2] == "native"]
    assert len(natives) == 1, f"one native module expected, found {natives}"
    native = natives[0]
    kernels_package = native.rpartition(".")[0]
    assert kernels_package != PACKAGE, "native/ belongs inside the kernels package, not at the top of scribelm"
    offenders = sorted(
        f"{src} imports {dst}"
        for src, targets in graph.items()
        for dst in targets
        if (dst == native or dst.startswith(native + "."))
        and not (src == kernels_package or src.startswith(kernels_package + "."))
    )
    assert offenders == []


def test_the_model_imports_no_kernels_training_or_serving():
    graph = import_graph()
    natives = [name for name in graph if name.rpartition(".")[2] == "native"]
    kernels_package = natives[0].rpartition(".")[0] if natives else None
    above = [p for p in (kernels_package, "scribelm.train", "scribelm.serve", "scribelm.generate") if p]
    offenders = sorted(dst for dst in graph["scribelm.model"] if any(dst == p or dst.startswith(p + ".") for p in above))
    assert offenders == []
