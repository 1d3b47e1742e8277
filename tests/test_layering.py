"""Layering of the package (issue 11): the model, tensor-parallel, data and config packages never import the
loop (megaseek.train), the step (megaseek.engine) or the objectives (megaseek.tasks); the trainer module stays
small; no package folder is named `dist`; launch scripts do not edit sys.path (the package is installed)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PKG = REPO / "megaseek"
LOWER = ("model", "tensor_parallel", "data", "config")
UPPER = ("megaseek.train", "megaseek.engine", "megaseek.tasks")

# Launch scripts other engineers still own (their sys.path edits are theirs to remove; the lead cleans up):
SYS_PATH_ALLOWED: dict[str, str] = {}


def imported_modules(source: str, pkg: str) -> set[str]:
    """Every absolute module name a module's source imports (top level or inside functions); relative
    imports resolved against its package `pkg` (e.g. "megaseek.model")."""
    tree = ast.parse(source)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _violations(name: str, source: str, pkg: str) -> list[str]:
    return [f"{name} imports {mod}" for mod in sorted(imported_modules(source, pkg))
            if any(mod == u or mod.startswith(u + ".") for u in UPPER)]


def test_lower_packages_do_not_import_the_loop():
    files = [f for sub in LOWER for f in sorted((PKG / sub).rglob("*.py"))]
    assert len(files) > 20, files  # the walk found the packages
    bad = []
    for f in files:
        rel = f.relative_to(REPO)
        bad += _violations(str(rel), f.read_text(), ".".join(rel.with_suffix("").parts[:-1]))
    assert bad == []


def test_the_import_check_has_teeth():
    """A module importing the loop (absolute, from-import, relative, inside a function) is caught."""
    src = ("import os\nfrom megaseek.train import trainer\n\ndef f():\n    import megaseek.engine.step\n"
           "    from ..tasks import pretrain\n    from . import layers\n")
    found = _violations("probe", src, "megaseek.model")
    assert found == ["probe imports megaseek.engine.step", "probe imports megaseek.tasks",
                     "probe imports megaseek.tasks.pretrain", "probe imports megaseek.train",
                     "probe imports megaseek.train.trainer"], found
    assert "megaseek.model.layers" in imported_modules(src, "megaseek.model")


def test_trainer_module_is_small():
    n = len((PKG / "train" / "trainer.py").read_text().splitlines())
    assert n < 200, f"megaseek/train/trainer.py has {n} lines"


def test_no_package_folder_named_dist():
    found = [str(p.relative_to(REPO)) for p in PKG.rglob("dist") if p.is_dir()]
    assert found == []
    assert not (PKG / "dist").exists()


def _edits_sys_path(path: Path) -> bool:
    """`sys.path.insert/append/extend(...)`, `sys.path[...] = ` or `sys.path = ` anywhere in the file."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                target = t.value if isinstance(t, ast.Subscript) else t
        if isinstance(target, ast.Attribute) and target.attr == "path" and \
                isinstance(target.value, ast.Name) and target.value.id == "sys":
            return True
    return False


def test_launch_scripts_do_not_edit_sys_path(tmp_path):
    scripts = sorted((REPO / "launch").glob("*.py"))
    assert any(s.name == "pretrain.py" for s in scripts)
    bad = [s.name for s in scripts if s.name not in SYS_PATH_ALLOWED and _edits_sys_path(s)]
    assert bad == [], f"launch scripts editing sys.path (the package is installed): {bad}"
    # the check has teeth
    probe = tmp_path / "probe.py"
    for src in ("import sys, os\nsys.path.insert(0, os.getcwd())\n", "import sys\nsys.path = ['x']\n",
                "import sys\nsys.path[:0] = ['x']\n", "import sys\nsys.path += ['x']\n"):
        probe.write_text(src)
        assert _edits_sys_path(probe), src
    probe.write_text("import sys\nprint(sys.path)\n")
    assert not _edits_sys_path(probe)
