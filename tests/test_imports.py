"""The floor plan: which package may import which, no cycles between packages, and family names only in
models/. Read off the source with `ast`, so a lazy import inside a function counts too."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xattn_cli"

FORBIDDEN = {  # package → packages it must never import
    "methods": {"models", "io", "cli", "explainers", "eval", "render", "runner", "api"},
    "capture": {"methods", "models", "explainers", "io", "cli", "eval", "render"},
    "models": {"explainers", "cli", "eval", "io", "render", "runner", "api"},
    "explainers": {"cli", "eval", "io", "render", "runner", "api"},
    "render": {"eval", "cli", "explainers", "models"},
    "tensors": {"*"},
    "errors": {"*"},
    "device": {"*"},
    "nn": {"*"},
}
LEAVES = {"tensors", "errors", "device", "nn"}  # may import nothing of ours but errors


def _unit(module_path: Path) -> str:
    """The package (or top-level module) a file belongs to: xattn_cli/models/hf.py → models."""
    return module_path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xattn_cli."):
            units.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "xattn_cli":
            units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("xattn_cli."))
    return units


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(_imports(path) - {unit, "__version__"})
    return graph


def test_no_package_imports_what_it_must_not():
    broken = []
    for unit, imported in import_graph().items():
        rule = FORBIDDEN.get(unit, set())
        bad = (imported - {"errors"}) if "*" in rule else imported & rule
        broken += [f"{unit} → {target}" for target in sorted(bad)]
    assert not broken, "forbidden imports: " + ", ".join(broken)


def test_no_cycle_between_packages():
    graph = import_graph()
    cycles = []

    def visit(unit: str, trail: list[str]) -> None:
        for target in sorted(graph.get(unit, ())):
            if target in trail:
                cycles.append(" → ".join(trail[trail.index(target):] + [target]))
            elif target in graph:
                visit(target, trail + [target])

    for unit in LEAVES | {"capture", "methods", "models", "explainers"}:
        visit(unit, [unit])
    assert not cycles, "import cycles: " + "; ".join(sorted(set(cycles)))


FAMILY_TEST = re.compile(  # a family compared, tested for membership, or used to look something up
    r"""family\s*(==|!=|\bin\b|\bnot in\b)|getattr\([^)]*["']family["']|(\[|\.get\()\s*[\w.]*family\b"""
    r"""|(==|!=)\s*["'](lxmert|visualbert|detr|vit|clip)["']""")


def test_only_models_know_families():
    """No `family ==` (or a family name compared, or a lookup by family) outside models/."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if _unit(path) == "models":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FAMILY_TEST.search(line.split("#")[0]):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_family_rule_catches_a_family_branch(tmp_path, monkeypatch):
    """The family check can fail: an explainer comparing a family name, or looking one up, is reported."""
    fake = tmp_path / "xattn_cli"
    (fake / "explainers").mkdir(parents=True)
    (fake / "explainers" / "bad.py").write_text("if adapter.family == 'vit':\n    pass\nrule = RULES[adapter.family]\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_only_models_know_families()
    except AssertionError as error:
        assert "bad.py:1" in str(error) and "bad.py:3" in str(error)
    else:
        raise AssertionError("the family branch was not reported")


def test_the_rules_catch_a_forbidden_import(tmp_path, monkeypatch):
    """The checks above can fail: a methods module importing models is reported."""
    fake = tmp_path / "xattn_cli"
    (fake / "methods").mkdir(parents=True)
    (fake / "methods" / "bad.py").write_text("from xattn_cli.models.registry import load_model\n")
    (fake / "models").mkdir()
    (fake / "models" / "ok.py").write_text("from xattn_cli.methods import METHODS\nif adapter.family == 'x': pass\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = import_graph()
    assert graph["methods"] == {"models"} and graph["models"] == {"methods"}
    try:
        test_no_package_imports_what_it_must_not()
    except AssertionError as error:
        assert "methods → models" in str(error)
    else:
        raise AssertionError("the forbidden import was not reported")
