"""The error for a ``cinstnorm`` imported from a folder that has no compiled extension.

That folder is usually the source tree: ``python -m cinstnorm ...`` or ``import cinstnorm`` run
from the repository root puts the root first on ``sys.path``, so its ``cinstnorm/`` (with
``_cpu.pyx`` but no ``_cpu*.so``) shadows an installed copy, and Python's own message is a
misleading "circular import".  Kept apart from ``__init__`` so that it imports nothing compiled.
"""
from __future__ import annotations

import glob
import importlib.machinery
import os


def compiled_extensions(package_dir: str) -> list[str]:
    """The compiled ``_cpu`` modules in ``package_dir`` (any suffix this interpreter loads)."""
    return sorted(path for suffix in importlib.machinery.EXTENSION_SUFFIXES
                  for path in glob.glob(os.path.join(package_dir, "_cpu" + suffix)))


def missing_extension_error(package_dir: str, exc: ImportError) -> ImportError:
    """A one-line ImportError that says what to run; the original error when the extension
    exists but cannot be loaded (a missing OpenMP runtime, another Python's build)."""
    return ImportError(_message(os.path.abspath(package_dir), exc), name="cinstnorm")


def _message(package_dir: str, exc: ImportError) -> str:
    # name="cinstnorm" above: `python -m cinstnorm` then prints the message on one line
    # ("Error while finding module specification for 'cinstnorm.__main__' (ImportError: ...)")
    # instead of a traceback
    if compiled_extensions(package_dir):
        return (f"cinstnorm's compiled extension in {package_dir} cannot be loaded ({exc}); "
                f"rebuild it with `pip install .` (or `pip install -e .` in a source tree)")
    root = os.path.dirname(package_dir)
    if os.path.exists(os.path.join(root, "setup.py")):
        return (
            f"cinstnorm was imported from its source tree ({package_dir}), which has no "
            f"compiled extension: run `pip install -e .` in {root} to build it in place, or "
            f"run from another folder (or use the `cinstnorm` command) to use the installed "
            f"package")
    return (f"cinstnorm's compiled extension (_cpu) is missing from {package_dir}: "
            f"reinstall with `pip install --force-reinstall cinstnorm`")
