"""Packaging: passes/ and backend/ install only as qcompile.passes and qcompile.backend,
the Cython extension is compiled, and the core imports without torch."""
import os
import subprocess
import sys


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_bare_passes_and_backend_are_not_importable(tmp_path):
    for name in ("passes", "backend"):
        r = run_python(f"import {name}", cwd=tmp_path)
        assert r.returncode != 0 and f"No module named '{name}'" in r.stderr, (name, r.stderr)


def test_subpackages_map_to_top_level_folders(tmp_path):
    r = run_python("import qcompile.passes, qcompile.backend, os;"
                   "print(os.path.basename(os.path.dirname(qcompile.passes.__file__)));"
                   "print(os.path.basename(os.path.dirname(qcompile.backend.__file__)))", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["passes", "backend"]


def test_core_imports_without_torch(tmp_path):
    """Block torch at import time: the core, the CLI and the built-in passes still load."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import qcompile, qcompile.cli, qcompile.passes\n"
        "from qcompile.errors import QCompileError\n"
        "try:\n"
        "    qcompile.from_torch(None, ())\n"
        "except QCompileError as e:\n"
        "    print('ERR', e)\n"
    )
    r = run_python(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ERR from_torch needs PyTorch" in r.stdout


def test_native_extension_is_compiled():
    from qcompile._native import bitpack

    assert os.path.splitext(bitpack.__file__)[1] in (".so", ".pyd")


def test_every_package_folder_is_listed_in_setup():
    """setup.py lists packages explicitly; a folder missing there would be left out of
    a non-editable install (and only CI's fresh install would notice)."""
    import ast

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    listed = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGES")
    folders = set()
    for top in ("qcompile", "passes", "backend"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            if "__init__.py" in files:
                folders.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    assert folders == set(listed.values())
