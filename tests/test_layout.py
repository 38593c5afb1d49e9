"""The tree's rules, checked on the source (the README's "How the code is laid out"): the ground floor
(nsa_core/*.py: config, limits, the shared vocabulary) imports nothing above it; kernels import
nothing of nsa_core outside kernels/; the reference imports neither triton, the kernels, the ops nor
the model; the ops never import the model; the model never calls kernels directly and imports
neither the reference nor inference/; distributed/ (shard layouts and collectives) knows no module;
no module of nsa_core imports the package root; nsa_core never imports nsa_cli and never prints;
every file opens with a docstring and stays under 600 lines; benchmarks/ is a package run with
`python -m`: none of its files edits sys.path or uses a private name of nsa_cli or nsa_core.kernels."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for pkg in ("nsa_core", "nsa_cli", "tools") for p in (ROOT / pkg).rglob("*.py"))


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
    ours = [m for m in imports if m == "nsa_core" or m.startswith("nsa_core.")]
    if module.startswith("nsa_core") and module != "nsa_core.__init__":
        assert "nsa_core" not in ours, f"{module} imports the package root (an arrow back up)"
    if module.count(".") == 1 and module.startswith("nsa_core.") and path.name != "__init__.py":
        above = [m for m in ours if m.count(".") != 1 or (ROOT / Path(*m.split("."))).is_dir()]
        assert not above, f"{module} (ground floor) imports {above}"
    if module.startswith("nsa_core.reference"):
        bad = [m for m in ours if m.startswith(("nsa_core.ops", "nsa_core.model"))]
        assert not bad, f"{module} (reference) imports {bad}"
    if module.startswith("nsa_core.ops"):
        bad = [m for m in ours if m.startswith(("nsa_core.model", "nsa_core.inference"))]
        assert not bad, f"{module} (ops) imports {bad}"
    if module.startswith("nsa_core.model"):
        bad = [m for m in ours if m.startswith(("nsa_core.reference", "nsa_core.inference"))]
        assert not bad, f"{module} (model) imports {bad}: it speaks to the ops only"
    if module.startswith("nsa_core.distributed"):
        bad = [m for m in ours if not m.startswith("nsa_core.distributed")]
        assert not bad, f"{module} (distributed: shard layouts and collectives) imports {bad}"


BENCHMARKS = sorted((ROOT / "benchmarks").rglob("*.py"))
PRIVATE_FROM = ("nsa_cli", "nsa_core.kernels")


def edits_sys_path(tree: ast.AST) -> bool:
    """sys.path.insert / append / extend / remove, or an assignment to sys.path."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(ast.unparse(t) == "sys.path" for t in targets):
                return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                ast.unparse(node.func.value) == "sys.path" and node.func.attr in ("insert", "append", "extend", "remove"):
            return True
    return False


def private_uses(tree: ast.AST) -> list[str]:
    """Private names (a leading underscore) taken from nsa_cli or nsa_core.kernels: imported by name
    (`from nsa_cli.x import _y`, `import nsa_core.kernels._y`), or read off a module imported from
    there (`launch._fwd`, `combine._kernel`)."""
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PRIVATE_FROM):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
                modules.add(alias.asname or alias.name)  # a name imported from there may be a module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PRIVATE_FROM):
                    found += [alias.name] if any(p.startswith("_") for p in alias.name.split(".")) else []
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner in modules or owner.startswith(PRIVATE_FROM):
                found.append(f"{owner}.{node.attr}")
    return found


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_rules(path):
    """No script reaches for the tree by hand (they run as `python -m benchmarks...` from the root),
    and none leans on what nsa_cli or the kernels keep private."""
    name = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text())
    assert not edits_sys_path(tree), f"{name} edits sys.path"
    assert not private_uses(tree), f"{name} uses private names {private_uses(tree)}"


def test_benchmark_rules_catch_what_they_name():
    bad = ast.parse("import sys\nsys.path.insert(0, '.')\nfrom nsa_cli.support.speed import _step\n"
                    "from nsa_core.kernels.selected_attention import launch\nlaunch._fwd_by_block()\n")
    assert edits_sys_path(bad)
    assert private_uses(bad) == ["nsa_cli.support.speed._step", "launch._fwd_by_block"]
    fine = ast.parse("from nsa_core.kernels.selected_attention import launch\nlaunch.selected_attention_fwd()\n"
                     "import os\nos._exit\n")
    assert not edits_sys_path(fine) and not private_uses(fine)
