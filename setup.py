"""Build script: the Python package plus the optional C++ CPU extension ``mpvg_kernels._C``.

The extension is built from ``csrc/cpu/*.cpp`` with ``torch.utils.cpp_extension`` (ninja when present).
Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch. When torch is
missing at build time, no C++ compiler is found, ``MPVG_NO_CPP=1`` is set, or the compile fails, the package
still installs (backends ``torch`` and ``triton``) and the reason is printed and recorded for
``mpvg_kernels.backends.cpp_status()``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[mpvg-kernels] {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("MPVG_NO_CPP", "0") == "1":
        _say("MPVG_NO_CPP=1: the cpp backend is not built")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        _say("no sources in csrc/cpu: the cpp backend is not built")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _say(
            "torch is not importable at build time, so the cpp backend is not built; install torch first and "
            "build with 'pip install --no-build-isolation -e .'"
        )
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _say(f"no C++ compiler ({cxx!r} not found on PATH): the cpp backend is not built")
        return [], {}

    class SoftBuildExtension(BuildExtension):
        """Builds the extension; a failed compile leaves a working package without the cpp backend."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must not break the install
                _say(f"building {ext.name} failed, the cpp backend is not available: {exc}")

    extra = ["-O3", "-std=c++17", "-fopenmp"]
    ext = CppExtension(
        "mpvg_kernels._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": extra},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": SoftBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
