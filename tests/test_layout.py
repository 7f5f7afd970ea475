"""The library's layout (README, "Layout"): one kind of code per package, imports that run one way, no cycle, no
module a newcomer cannot read in one sitting. Read from the source with `ast`, imports inside functions included."""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
MAX_LINES = 500

# package -> what it must never import (lib packages by prefix, third-party by top-level name)
FORBIDDEN = {
    "lib.io": ("lib.kernels", "lib.steps", "lib.figures"),
    "lib.sources": ("lib.io", "lib.kernels", "lib.steps", "lib.figures", "matplotlib", "seaborn"),
    "lib.kernels": ("lib.io", "lib.steps", "lib.figures", "matplotlib", "seaborn"),
    "lib.steps": ("lib.figures", "matplotlib", "seaborn"),
    "lib.figures": ("lib.io", "lib.sources", "lib.kernels", "lib.steps", "torch", "transformers", "sae_lens"),
}
# The one import across that order, and why: profile sections of the organism are defined beside the code that
# trains with them (lib.sources.organism), and lib.io.profiles loads them from the TOML files.
ALLOWED = {("lib.io.profiles", "lib.sources.organism"), ("lib.io.profiles", "lib.sources")}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(LIB.rglob("*.py")):
        name = ".".join(p.relative_to(LIB.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name}: {n} lines (split it by concern; the layout keeps modules under {MAX_LINES})"


def test_imports_run_one_way():
    bad = []
    for name, path in MODULES.items():
        for package, forbidden in FORBIDDEN.items():
            if name != package and not name.startswith(package + "."):
                continue
            for imported in _imports(path):
                hit = [f for f in forbidden if imported == f or imported.startswith(f + ".")]
                if hit and (name, imported) not in ALLOWED:
                    bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    """Edges between lib modules (a package's own __init__ importing its children does not count: Python runs a
    parent package before any child anyway)."""
    graph = {
        name: {i for i in _imports(path) if i in MODULES and i != name and not i.startswith(name + ".")}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
