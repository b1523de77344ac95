"""Build of cinstnorm's Cython/OpenMP extension.

Environment variables:
  CINSTNORM_FAIL_NO_OPENMP=1  fail the build when the compiler cannot build and run OpenMP code
                              (by default the build warns loudly and compiles serial kernels)
  CINSTNORM_DEBUG=1           Cython bounds checking, wraparound checks and -O1 -g
  CINSTNORM_MARCH=<arch>      opt-in -march=<arch> (e.g. native); the default build is portable
  CINSTNORM_SANITIZE=<list>   build with -fsanitize=<list> (e.g. address,undefined) and
                              -fno-omit-frame-pointer -g; run with the sanitizer runtime
                              preloaded: LD_PRELOAD=$(gcc -print-file-name=libasan.so)
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


DEBUG = _flag("CINSTNORM_DEBUG")
MARCH = os.environ.get("CINSTNORM_MARCH", "").strip()
SANITIZE = os.environ.get("CINSTNORM_SANITIZE", "").strip().replace(" ", "")

# Cython directives, set for the whole project in this one place.
CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n >= 1 ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler):
    """Compile, link and run a tiny OpenMP program; return (cflags, ldflags) or None."""
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    for cflags, ldflags in candidates:
        tmp = tempfile.mkdtemp(prefix="cinstnorm-omp-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(OPENMP_PROBE)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            exe = os.path.join(tmp, "probe")
            compiler.link_executable(objs, exe, extra_postargs=ldflags)
            out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip().isdigit():
                return cflags, ldflags
        except Exception:  # any compile, link or run failure means "not this flag set"
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return None


class BuildExt(build_ext):
    """build_ext that probes OpenMP and sets optimisation flags per compiler."""

    def build_extensions(self):
        omp = _openmp_flags(self.compiler)
        if omp is None:
            msg = (
                "cinstnorm: the C compiler cannot build and run OpenMP programs; building "
                "SERIAL kernels (one thread). Install an OpenMP runtime (libgomp / libomp) "
                "for parallel kernels, or set CINSTNORM_FAIL_NO_OPENMP=1 to make this an error."
            )
            if _flag("CINSTNORM_FAIL_NO_OPENMP"):
                raise RuntimeError(msg.replace("building SERIAL kernels (one thread)",
                                               "and CINSTNORM_FAIL_NO_OPENMP is set"))
            bar = "*" * 78
            print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr)
            cflags, ldflags = [], []
        else:
            cflags, ldflags = omp
        if self.compiler.compiler_type == "msvc":
            opt = ["/O2"]
        else:
            opt = ["-O1", "-g"] if DEBUG else ["-O3"]
            # #pragma omp simd without an OpenMP runtime
            if omp is None:
                opt.append("-fopenmp-simd")
            # -fno-math-errno: sqrt without the errno branch that kept gcc from vectorizing
            # the per-plane rstd loops (no result changes; the kernels never read errno)
            opt += ["-fno-strict-aliasing", "-fno-math-errno", "-Wno-unused-function"]
            if MARCH:
                opt.append(f"-march={MARCH}")
            if SANITIZE:
                opt += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
                ldflags = ldflags + [f"-fsanitize={SANITIZE}"]
        all_flags = opt + cflags
        for ext in self.extensions:
            ext.extra_compile_args = all_flags + list(ext.extra_compile_args)
            ext.extra_link_args = ldflags + list(ext.extra_link_args)
            ext.define_macros.append(("CIN_BUILD_FLAGS", '"%s"' % " ".join(all_flags)))
            ext.define_macros.append(("CIN_DEBUG_BUILD", "1" if DEBUG else "0"))
        super().build_extensions()


extensions = [
    Extension(
        "cinstnorm._cpu",
        ["cinstnorm/_cpu.pyx"],
        include_dirs=[os.path.join(HERE, "src"), np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=[os.path.join("src", f) for f in sorted(os.listdir(os.path.join(HERE, "src")))],
    )
]

setup(
    # force: the directives depend on CINSTNORM_DEBUG, which Cython's cache does not see
    ext_modules=cythonize(extensions, compiler_directives=CYTHON_DIRECTIVES, force=True),
    cmdclass={"build_ext": BuildExt},
)
