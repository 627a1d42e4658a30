"""The package's layers: ops ← nn ← models ← robust ← cli.  Nothing low imports anything
higher, at module level or inside a function (read from the source, so a lazy import
counts too)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyeuler"

# rank of each top-level part; a module may import only from parts of its rank or lower
RANKS = {
    "_version": 0, "backend": 0, "ops": 0, "triton": 0, "cuda": 0, "functional": 0,
    "nn": 1,
    "models": 2,
    "robust": 3, "stability": 3, "benchmark": 3, "checkpoint": 3, "data": 3, "cost": 3,
    "cli": 4, "__main__": 4,
}
# The reproduction report is a command-line program that still lives in robust/ (it trains
# through the CLI's training loop); moving it is recorded as open work, not hidden here.
KNOWN = {("robust.report", "cli")}


def _part(dotted: str) -> str:
    return dotted.split(".")[1] if dotted.count(".") else "__init__"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in relative.parts if p != "__init__"]
        if parts:
            yield ".".join(parts), path


@pytest.mark.parametrize("module, path", list(_modules()), ids=lambda v: str(v))
def test_no_import_points_up_the_stack(module, path):
    own = module.split(".")[0]
    assert own in RANKS, f"pyeuler.{module}: add its part to RANKS"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if not name.startswith("pyeuler.") and name != "pyeuler":
                continue
            target = _part(name)
            if target == "__init__" or (module, target) in KNOWN:
                continue
            assert RANKS[target] <= RANKS[own], (
                f"pyeuler.{module} (line {node.lineno}) imports {name}, a higher layer")
