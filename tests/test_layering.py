"""The dependency direction of DESIGN.md, checked on every import statement of the tree (function-level imports
included): a package may import only the packages below it."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = {"models", "data_pipeline", "cluster", "trainer", "scaling", "tarflow", "tarflow_testing", "bench", "tests"}

# package → the packages of ours it may import (itself always)
ALLOWED = {
    "models": set(),
    "data_pipeline": set(),
    "cluster": set(),
    "trainer": {"models", "data_pipeline", "cluster"},
    "scaling": {"trainer.api", "cluster"},  # the trainer only through its small public API
    "tarflow": {"models", "data_pipeline", "cluster", "trainer", "scaling"},
    "tarflow_testing": {"models", "data_pipeline", "cluster", "trainer"},
    "bench": {"models", "data_pipeline", "cluster", "trainer", "scaling", "tarflow", "tarflow_testing"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports resolved against its package."""
    package = list(path.relative_to(REPO).with_suffix("").parts)[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # `from trainer import api` names the module trainer.api
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def allowed(importer: str, module: str) -> bool:
    top = module.split(".")[0]
    if top not in OURS or top == importer:
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in ALLOWED[importer])


def violations() -> list[str]:
    found = []
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in imported_modules(path):
                if not allowed(package, module):
                    found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return found


def test_every_import_follows_the_dependency_direction():
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    assert not allowed("scaling", "trainer.evaluation.fid")
    assert not allowed("scaling", "models")
    assert allowed("scaling", "trainer.api") and allowed("scaling", "trainer.api.parameter_count")
    assert not allowed("trainer", "scaling.runner") and not allowed("models", "trainer")
    assert not allowed("bench", "tests.test_ddp") and allowed("bench", "tarflow_testing.runs")
    package = REPO / "trainer"
    relative = package / "checkpoint" / "x.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "from ..strategies import base\nfrom . import files\n")
    assert imported_modules(relative) == [(1, "trainer.strategies.base"), (2, "trainer.checkpoint.files")]
