"""Imports flow one way: control -> runtime -> plugins; configs and engines are leaves."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> spinserve packages it must never import
FORBIDDEN = {
    "plugins": {"runtime", "control", "engines", "perf"},
    "runtime": {"control", "perf"},
    "configs": {"runtime", "control", "plugins", "engines", "perf"},
    "engines": {"runtime", "control", "plugins", "perf"},
}


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "spinserve" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def test_no_upward_imports():
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported, line in _imported_packages(path):
                if imported in forbidden:
                    rel = path.relative_to(ROOT)
                    violations.append(f"{rel}:{line} imports spinserve.{imported}")
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_checker_sees_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import spinserve.control.engine\nfrom spinserve.runtime import model\n")
    assert {p for p, _ in _imported_packages(sample)} == {"control", "runtime"}
