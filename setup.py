"""Build script: the Python package plus the optional C++ CPU extension ``mpvg_kernels.ops._C``.

The extension is built from ``csrc/cpu/*.cpp`` with ``torch.utils.cpp_extension`` (ninja when present).
Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch. When torch is
missing at build time, no C++ compiler is found, ``MPVG_NO_CPP=1`` is set, or the compile fails, the package
still installs (backends ``torch`` and ``triton``) and the reason is printed and recorded for
``mpvg_kernels.backends.cpp_status()``.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[mpvg-kernels] {msg}", file=sys.stderr, flush=True)


# Instruction-set flags of the per-capability kernel units (see csrc/cpu/kernels_avx2.cpp).
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mpopcnt"]
CAPABILITY_FLAGS = {
    "avx2": _AVX2 + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": _AVX2
    + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    # GCC 12's avx512fintrin.h trips its own -Wmaybe-uninitialized (GCC bug 105593, fixed in 12.3/13)
    + ["-Wno-uninitialized", "-Wno-maybe-uninitialized"],
}


def _capability_of(source: str) -> str | None:
    """'avx2' for csrc/cpu/kernels_avx2.cpp and so on; None for the units built with the common flags."""
    name = os.path.splitext(os.path.basename(source))[0]
    return name[len("kernels_") :] if name.startswith("kernels_avx") else None


def _extensions():
    if os.environ.get("MPVG_NO_CPP", "0") == "1":
        _say("MPVG_NO_CPP=1: the cpp backend is not built")
        return [], {}
    # Units built for a wider instruction set (kernels_avx2.cpp, kernels_avx512.cpp) are linked last,
    # so that where an inline function from a header is emitted by several units, the linker keeps
    # the baseline copy (GNU ld keeps the first definition it sees).
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")), key=lambda s: ("_avx" in s, s))
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
                self._build_capability_units(ext)
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure must not break the install
                self._mpvg_failed = getattr(self, "_mpvg_failed", set()) | {ext.name}
                _say(f"building {ext.name} failed, the cpp backend is not available: {exc}")

        def _build_capability_units(self, ext):
            """Compile kernels_<cap>.cpp with its instruction-set flags into extra objects (x86-64 only).

            ATen's scheme: only these units get -mavx2 / -mavx512*, and ops.cpp calls them only after a
            run-time CPU check, so the extension still loads and runs (DEFAULT kernels) on older CPUs.
            A unit whose flags the compiler rejects is compiled plainly instead (an empty table).
            """
            if platform.machine().lower() not in ("x86_64", "amd64") or self.compiler.compiler_type == "msvc":
                return
            base = list(ext.extra_compile_args.get("cxx", []))
            for src in [s for s in ext.sources if _capability_of(s) in CAPABILITY_FLAGS]:
                cap = _capability_of(src)
                flags = CAPABILITY_FLAGS[cap]
                try:
                    objects = self.compiler.compile(
                        [src],
                        output_dir=os.path.join(self.build_temp, f"cap_{cap}"),
                        macros=ext.define_macros or [],
                        include_dirs=ext.include_dirs,
                        debug=self.debug,
                        extra_postargs={"cxx": base + flags},
                        depends=ext.depends,
                    )
                except Exception as exc:  # noqa: BLE001
                    _say(f"compiling {src} with {' '.join(flags)} failed, its kernels are left out: {exc}")
                    continue
                ext.sources.remove(src)
                ext.extra_objects.extend(objects)

        def copy_extensions_to_source(self):
            failed = getattr(self, "_mpvg_failed", set())
            keep = self.extensions
            self.extensions = [e for e in keep if e.name not in failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = keep

    extra = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    ext = CppExtension(
        "mpvg_kernels.ops._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": extra},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": SoftBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
