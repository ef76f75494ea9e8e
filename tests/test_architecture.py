"""The package's architecture, read from its source (AST), so that it stays what the folders say.

- import directions: ``kernels/`` imports nothing from fmfast; ``data/`` none of the model,
  engine, detection or CLI rooms; ``nn/`` and ``models/`` no data, engine, detect or cli;
  ``engine/`` no detect or cli; nothing imports ``cli/`` but the entry points;
- no import cycles, counting imports inside functions;
- modules outside ``kernels/`` stay small, every package says what it holds and may import;
- tests mirror the package; the repository refers to no file outside itself.
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fmfast"
KERNELS = REPO / "kernels"
MAX_LINES = 350
# entry points: the only modules allowed to import fmfast.cli from outside it
ENTRY_POINTS = {"fmfast.__main__", "fmfast.detect.__main__", "fmfast.train", "fmfast.evaluate", "fmfast.ingest",
                "fmfast.export", "fmfast.check"}
# room -> rooms it must not import
FORBIDDEN = {
    "fmfast.data": ("fmfast.nn", "fmfast.models", "fmfast.engine", "fmfast.detect", "fmfast.cli"),
    "fmfast.nn": ("fmfast.data", "fmfast.models", "fmfast.engine", "fmfast.detect", "fmfast.cli"),
    "fmfast.models": ("fmfast.data", "fmfast.engine", "fmfast.detect", "fmfast.cli"),
    "fmfast.engine": ("fmfast.detect", "fmfast.cli"),
    "fmfast.detect": ("fmfast.cli",),
}


def module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["fmfast", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted(KERNELS.rglob("*.py"))
    return {module_name(p): p for p in files}


MODULES = modules()


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth; ``from pkg import x``
    counts as an import of ``pkg.x`` when that is a module, else of ``pkg``."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
    return out


def fmfast_imports(name: str, path: Path) -> list[tuple[str, int]]:
    return [(m, line) for m, line in imports(name, path) if m == "fmfast" or m.startswith("fmfast.")]


def inside(mod: str, room: str) -> bool:
    return mod == room or mod.startswith(room + ".")


def test_the_scan_sees_the_package():
    assert {"fmfast.data.gather", "fmfast.nn.attention", "fmfast.models.registry", "fmfast.engine.step",
            "fmfast.detect.windows", "fmfast.cli.train", "fmfast.kernels.tokenize"} <= set(MODULES)
    # and it reads lazy imports: engine.trainer imports plots inside a method
    assert any(m == "fmfast.engine.plots" for m, _ in fmfast_imports("fmfast.engine.trainer",
                                                                      MODULES["fmfast.engine.trainer"]))


def test_kernels_import_nothing_from_fmfast():
    bad = [f"{p.name}:{line} imports {m}" for name, p in MODULES.items() if name.startswith("fmfast.kernels")
           for m, line in imports(name, p) if m.startswith("fmfast") and not inside(m, "fmfast.kernels")]
    bad += [f"{p.name}:{line} imports {m} by its absolute name (kernels are importable on their own)"
            for name, p in MODULES.items() if name.startswith("fmfast.kernels")
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
            for m, line in [(getattr(node, "module", None) or "", node.lineno)] if m.startswith("fmfast")]
    assert not bad, bad


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_import_directions(room):
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for name, p in MODULES.items()
           if inside(name, room) and name not in ENTRY_POINTS
           for m, line in fmfast_imports(name, p) if any(inside(m, f) for f in FORBIDDEN[room])]
    assert not bad, bad


def test_nothing_imports_the_cli():
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for name, p in MODULES.items()
           if not inside(name, "fmfast.cli") and name not in ENTRY_POINTS
           for m, line in fmfast_imports(name, p) if inside(m, "fmfast.cli")]
    assert not bad, bad


def test_no_import_cycles():
    graph = {name: sorted({m for m, _ in fmfast_imports(name, p) if m in MODULES and m != name})
             for name, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_modules_are_small():
    long = {str(p.relative_to(REPO)): n for name, p in MODULES.items() if not name.startswith("fmfast.kernels")
            for n in [len(p.read_text().splitlines())] if n > MAX_LINES}
    assert not long, long


def test_every_package_says_what_it_holds_and_may_import():
    for name, p in MODULES.items():
        if p.name != "__init__.py" or name in ("fmfast", "fmfast.kernels"):
            continue
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        assert len(doc) > 80, f"{p.relative_to(REPO)}: say what the package holds"
        assert "import" in doc, f"{p.relative_to(REPO)}: say what the package may import"


def test_tests_mirror_the_package():
    rooms = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    missing = [r for r in rooms if not any((REPO / "tests" / r).glob("test_*.py"))]
    assert not missing, f"no tests/<room>/test_*.py for {missing}"
    assert any((REPO / "tests" / "kernels").glob("test_*.py"))


def test_no_reference_to_files_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    needle = "DESIGN" + ".md"  # split so this file does not match itself
    hits = [f for f in files if (REPO / f).is_file() and f.endswith((".py", ".md", ".sh", ".txt", ".cfg", ".ini", ".toml"))
            and needle in (REPO / f).read_text(errors="ignore")]
    assert not hits, hits
