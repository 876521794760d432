"""Layering rules of DESIGN.md, read from the source: the core never imports
qcompile.passes or qcompile.backend (only qcompile/cli.py composes them), and passes
never import the backend."""
import ast
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_modules(path, package):
    """Absolute names of the modules a file imports (relative imports resolved)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.append(mod)
            names += [f"{mod}.{a.name}" for a in node.names]
    return names


def sources(folder, package):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if name.endswith((".py", ".pyx")):
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                pkg = package if rel == "." else package + "." + rel.replace(os.sep, ".")
                yield os.path.join(dirpath, name), pkg


def violations(folder, package, forbidden, allowed_files=()):
    found = []
    for path, pkg in sources(folder, package):
        if os.path.relpath(path, ROOT) in allowed_files or path.endswith(".pyx"):
            continue
        for mod in imported_modules(path, pkg):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                found.append(f"{os.path.relpath(path, ROOT)} imports {mod}")
    return found


def test_core_does_not_reach_up():
    assert violations("qcompile", "qcompile", ["qcompile.passes", "qcompile.backend"],
                      allowed_files=("qcompile/cli.py",)) == []


def test_passes_do_not_import_backend():
    assert violations("passes", "qcompile.passes", ["qcompile.backend"]) == []


def test_checker_catches_a_violation(tmp_path, monkeypatch):
    """The rule must be able to fail: a planted relative import is found."""
    bad = tmp_path / "qcompile" / "ir"
    bad.mkdir(parents=True)
    (bad / "oops.py").write_text("from ..passes import dce\nimport qcompile.backend.sim\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    found = violations("qcompile", "qcompile", ["qcompile.passes", "qcompile.backend"])
    assert found == [
        "qcompile/ir/oops.py imports qcompile.passes",
        "qcompile/ir/oops.py imports qcompile.passes.dce",
        "qcompile/ir/oops.py imports qcompile.backend.sim",
    ]
