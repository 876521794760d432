"""Build script: maps the top-level `passes/` and `backend/` folders to `qcompile.passes`
and `qcompile.backend`, and compiles the Cython extensions.

The explicit package list (no find_packages) is deliberate: an installed copy must not
expose bare `passes` or `backend` packages.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

PACKAGES = {
    "qcompile": "qcompile",
    "qcompile._native": "qcompile/_native",
    "qcompile.ir": "qcompile/ir",
    "qcompile.onnx_io": "qcompile/onnx_io",
    "qcompile.passmanager": "qcompile/passmanager",
    "qcompile.rewrite": "qcompile/rewrite",
    "qcompile.analysis": "qcompile/analysis",
    "qcompile.passes": "passes",
    "qcompile.passes.rules": "passes/rules",
    "qcompile.passes.quantize": "passes/quantize",
    "qcompile.passes.calibrate": "passes/calibrate",
    "qcompile.passes.prune": "passes/prune",
    "qcompile.backend": "backend",
    "qcompile.backend.lowering": "backend/lowering",
    "qcompile.backend.simulator": "backend/simulator",
}

EXTENSIONS = [
    Extension("qcompile._native.bitpack", ["qcompile/_native/bitpack.pyx"]),
    Extension("qcompile.backend._codec", ["backend/_codec.pyx"]),
    Extension("qcompile.backend.lowering._alloc", ["backend/lowering/_alloc.pyx"]),
    Extension("qcompile.backend.lowering._deps", ["backend/lowering/_deps.pyx"]),
    Extension("qcompile.backend.lowering._weights", ["backend/lowering/_weights.pyx"]),
    Extension("qcompile.backend.lowering._tiling", ["backend/lowering/_tiling.pyx"]),
    Extension("qcompile.backend.simulator._kernels", ["backend/simulator/_kernels.pyx"],
              depends=["backend/simulator/_requant.h", "backend/simulator/_madd.h"],
              extra_compile_args=["-O3", "-fwrapv"]),
]

setup(
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    # Target presets (TOML) ship inside qcompile.backend; listed explicitly because
    # include_package_data is off (MANIFEST.in must not decide what gets installed).
    package_data={"qcompile.backend": ["targets/*.toml"]},
    ext_modules=cythonize(EXTENSIONS, language_level=3),
    include_package_data=False,
)
