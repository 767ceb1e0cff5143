"""The package's layers: core modules import no stage; a stage imports core and the stages below it; no cycles."""

import ast
from pathlib import Path

import slidemil

PACKAGE = Path(slidemil.__file__).parent
CORE = {"config", "errors", "files", "logs", "names", "runtime", "tasks", "training", "weights", "_moved", "__init__",
        "__main__"}
# Entry points: the command line and the workflow steps' adapters call into any stage, and nothing imports them.
ENTRY_POINTS = {"cli", "steps"}
# A stage may use the stages listed here (lower layers) besides the core modules.
STAGE_USES = {
    "slides": set(),
    "cohort": set(),
    "demo": set(),
    "mil": set(),
    "tiling": {"slides"},
    "features": {"slides"},
    "pretrain": {"slides", "features", "cohort"},
    "report": {"slides", "cohort", "mil"},
    "deploy": {"slides", "cohort", "mil", "report", "tiling", "features"},
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_edges() -> dict[str, set[str]]:
    """{unit: units it imports}: a unit is a stage subpackage or a core module of slidemil."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__main__.py":
            continue  # `python -m slidemil.<stage>`: a shim to the command line, imported by nothing
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = _unit(".".join(parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "slidemil" and _unit(target) != source:
                    edges.setdefault(source, set()).add(_unit(target))
    return edges


def test_every_unit_is_a_core_module_or_a_known_stage():
    units = {_unit(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert units <= CORE | ENTRY_POINTS | set(STAGE_USES), units - CORE - ENTRY_POINTS - set(STAGE_USES)


def test_no_relative_imports():
    relative = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert not relative


def test_core_modules_import_no_stage():
    edges = import_edges()
    wrong = {c: edges.get(c, set()) & (set(STAGE_USES) | ENTRY_POINTS) for c in CORE}
    assert not {c: s for c, s in wrong.items() if s}


def test_stages_import_only_core_and_the_stages_below_them():
    edges = import_edges()
    wrong = {s: edges.get(s, set()) - CORE - STAGE_USES[s] for s in STAGE_USES}
    wrong |= {e: {u for u, users in edges.items() if e in users} for e in ENTRY_POINTS}  # nothing imports them
    assert not {s: w for s, w in wrong.items() if w}


def test_no_import_cycles_between_units():
    edges = import_edges()
    state: dict[str, str] = {}

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = "open"
        for nxt in sorted(edges.get(unit, ())):
            assert state.get(nxt) != "open", " -> ".join(trail + [unit, nxt])
            if nxt not in state:
                visit(nxt, trail + [unit])
        state[unit] = "done"

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, [])
