"""The import rules of the project's layout, read from the source (every import, lazy ones too)."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

TORCH = ("torch", "torchvision", "timm", "safetensors.torch")


def module_file(name: str) -> Path | None:
    """The project's file for a module name, or None for anything outside the project."""
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as absolute names. A
    package's module-level ``__getattr__`` (PEP 562) is left out: it runs only when code asks
    that package for the attribute, as ``from vit import ViT`` does and the runtime never does."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lazy = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    skip = {id(n) for f in lazy for n in ast.walk(f)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return out


def closure(start: Path) -> tuple[set[Path], set[str]]:
    """(project files reachable from ``start`` through imports, outside modules they import)."""
    seen, outside, todo = set(), set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports(path):
            target = module_file(name)
            if target is None:
                outside.add(name)
            elif target != path:
                todo.append(target)
                parent = module_file(name.rsplit(".", 1)[0]) if "." in name else None
                if parent is not None:
                    todo.append(parent)  # importing a.b runs a/__init__.py first
    return seen, outside


def test_the_model_imports_nothing_of_the_project():
    project = [n for n in imports(ROOT / "vit" / "model.py") if module_file(n) is not None]
    assert project == [], project


@pytest.mark.parametrize("entry", ["vit/runtime.py", "vit/imageio.py", "app.py"])
def test_the_runtime_and_the_app_import_no_torch(entry):
    files, outside = closure(ROOT / entry)
    torchy = sorted(n for n in outside if n.split(".")[0] in TORCH or n in TORCH)
    assert torchy == [], (entry, torchy, sorted(str(f.relative_to(ROOT)) for f in files))


def test_conversion_imports_the_model_not_the_other_way():
    assert "vit.model" in imports(ROOT / "vit" / "convert.py")
    assert not {"vit.convert"} & imports(ROOT / "vit" / "model.py")


def test_the_space_folder_carries_every_project_file_the_app_imports():
    """A Space runs app.py from its own folder, without this project installed."""
    from export.space import RUNTIME_FILES

    files, _ = closure(ROOT / "app.py")
    needed = sorted(str(f.relative_to(ROOT)) for f in files)
    assert set(needed) <= set(RUNTIME_FILES), set(needed) - set(RUNTIME_FILES)


def test_the_package_never_imports_the_commands():
    for path in sorted((ROOT / "vit").glob("*.py")):
        commands = {n for n in imports(path) if n.split(".")[0] in ("train", "export", "app")}
        assert not commands, (path.name, commands)
