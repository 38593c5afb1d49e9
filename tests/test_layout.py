"""The tree's rules, checked on the source: kernels import nothing of nsa_core outside kernels/, the
reference imports neither triton nor the kernels, nsa_core never imports nsa_cli and never prints,
every file opens with a docstring and stays under 600 lines."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for pkg in ("nsa_core", "nsa_cli") for p in (ROOT / pkg).rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_file_rules(path):
    module = package_of(path)
    imports = imported_modules(path)
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree) or path.name == "__init__.py" and not path.read_text().strip(), \
        f"{module} has no docstring saying what it owns"
    assert len(path.read_text().splitlines()) <= 600, f"{module} is over 600 lines"
    if module.startswith("nsa_core"):
        assert not [m for m in imports if m.startswith("nsa_cli")], f"{module} imports nsa_cli"
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{module} prints"
    if module.startswith("nsa_core.kernels"):
        outside = [m for m in imports if m.startswith("nsa_core") and not m.startswith("nsa_core.kernels")]
        assert not outside, f"{module} reaches above kernels/: {outside}"
    if module.startswith("nsa_core.reference"):
        bad = [m for m in imports if m.startswith("triton") or m.startswith("nsa_core.kernels")]
        assert not bad, f"{module} (reference) imports {bad}"
    if module.startswith("nsa_core.model"):
        assert not [m for m in imports if m.startswith("nsa_core.kernels")], f"{module} (model) calls kernels directly"
