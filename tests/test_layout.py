"""The layout's rules: the torch-free side never imports torch or the torch side, and no module imports itself
back through others (no import cycles, function-level imports included)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mpaudit

PACKAGE = Path(mpaudit.__file__).parent
TORCH_SIDE = ("mpaudit.run", "mpaudit.trace", "mpaudit.perf", "mpaudit.integrations")
"""Packages that run the user's model and may import torch."""
TORCH_FREE = ("mpaudit.numerics", "mpaudit.results", "mpaudit.ci", "mpaudit.report", "mpaudit.arms", "mpaudit.vocab",
              "mpaudit.errors", "mpaudit.text")
"""Packages and modules that read results: importable without torch."""

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name.startswith(%r):
                raise ImportError(f"{name} must not be imported here")
            return None

    sys.meta_path.insert(0, Blocked())
""") % (TORCH_SIDE,)


def _modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


def _run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_the_torch_free_side_imports_without_torch(tmp_path: Path) -> None:
    free = [m for m in _modules() if m.startswith(TORCH_FREE) and m != "mpaudit.__main__"]
    assert len(free) > 15
    proc = _run_blocked("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in free), tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_reading_gating_comparing_and_rendering_run_without_torch(
    tmp_path: Path, tiny_result: mpaudit.AuditResult
) -> None:
    path = tmp_path / "report.json"
    path.write_text(tiny_result.to_json())
    commands = [
        ["compare", str(path), str(path)],
        ["compare", str(path), str(path), "--markdown"],
        ["gate", str(path), "--max-drop", "accuracy=1"],
        ["report", str(path), "--out", str(tmp_path / "again.html")],
        ["schema"],
    ]
    for args in commands:
        proc = _run_blocked(f"import sys\nsys.argv = ['mpaudit', *{args!r}]\nimport runpy\n"
                            "runpy.run_module('mpaudit', run_name='__main__')", tmp_path)
        assert proc.returncode == 0, (args, proc.stderr)
    assert (tmp_path / "again.html").stat().st_size > 10_000


def test_the_package_root_loads_the_torch_side_only_when_asked(tmp_path: Path) -> None:
    proc = _run_blocked("import mpaudit\nprint(mpaudit.AuditResult.__name__)\n"
                        "try:\n    mpaudit.audit\nexcept ImportError:\n    print('blocked')\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AuditResult", "blocked"]


def _imports(module: str) -> set[str]:
    """Every mpaudit module ``module`` imports, at module level or inside functions."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    known = set(_modules())
    parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}  # imported before it anyway
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            names = submodules if len(submodules) == len(node.names) else [node.module, *submodules]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n for n in names if n in known and n != module and n not in parents}
    return out


def test_no_import_cycles() -> None:
    graph = {m: _imports(m) for m in _modules()}
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node):], node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for module in graph:
        visit(module, [], done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_schema_is_json_and_admits_non_finite_floats(tiny_result: mpaudit.AuditResult) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = mpaudit.AuditResult.json_schema()
    data = json.loads(tiny_result.to_json())
    jsonschema.validate(data, schema)
    data["arms"]["fp32"]["loss"][0] = "Infinity"
    jsonschema.validate(data, schema)
    data["arms"]["fp32"]["loss"][0] = "a lot"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
