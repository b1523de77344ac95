"""The shipped CUDA source compiles, without a GPU.

Wherever ``nvcc`` is on PATH, every kernel instantiation that ``cinstnorm._gpu`` asks CuPy for
(float and double) is compiled for sm_80 and sm_90: to PTX (the entry points must be there) and
through ptxas to a cubin (register use, no spills, no local memory), so a CUDA compile error
fails CI on a machine without a GPU.  The source is also checked to ship as package data.
"""
import fnmatch
import importlib.resources
import os
import re
import shutil
import subprocess

import pytest

from cinstnorm import _gpu

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
ARCHS = ["sm_80", "sm_90"]
CTYPES = ["float", "double"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped_source():
    return importlib.resources.files("cinstnorm").joinpath(_gpu.SOURCE)


def glob_match(path, pattern):
    """setuptools' package-data globbing: '*' stays inside one directory, '**' crosses them."""
    if "**" in pattern:
        return fnmatch.fnmatch(path, pattern)
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(map(fnmatch.fnmatch, parts, pats))


def test_source_ships_as_package_data():
    src = shipped_source()
    assert src.is_file(), f"cinstnorm/{_gpu.SOURCE} is not found by importlib.resources"
    assert "__global__" in src.read_text(encoding="utf-8")
    pyproject = os.path.join(REPO, "pyproject.toml")
    if not os.path.exists(pyproject):
        pytest.skip("not running from a source tree")
    text = open(pyproject, encoding="utf-8").read()
    block = re.search(r"\[tool\.setuptools\.package-data\](.*?)(?:\n\[|\Z)", text, re.S)
    assert block, "pyproject.toml has no [tool.setuptools.package-data]"
    patterns = re.findall(r'"([^"]+)"', block.group(1))
    assert any(glob_match(_gpu.SOURCE, p) for p in patterns), (
        f"no package-data pattern of pyproject.toml ({patterns}) matches {_gpu.SOURCE}, so "
        "wheels would ship without the CUDA source"
    )


def test_kernel_names_match_source():
    """Every name expression is a __global__ template of the source, and every kernel of the
    source is compiled."""
    text = shipped_source().read_text(encoding="utf-8")
    defined = set(re.findall(r"__global__[^;{]*?\b(cin_\w+)\s*\(", text, re.S))
    assert len(defined) == text.count("__global__")
    for ctype in CTYPES:
        used = {name.split("<")[0] for name in _gpu.kernel_names(ctype)}
        assert used == defined


def test_defines_match_host_constants():
    text = shipped_source().read_text(encoding="utf-8")
    defines = dict(re.findall(r"#define\s+(CIN_\w+)\s+(\d+)", text))
    assert int(defines["CIN_GROUP_THREADS"]) == _gpu.GROUP_THREADS
    assert int(defines["CIN_CHUNK_THREADS"]) == _gpu.CHUNK_THREADS
    assert int(defines["CIN_BLOCK_MAX_THREADS"]) == _gpu.BLOCK_MAX_THREADS


def write_wrapper(tmp_path):
    """A translation unit that includes the shipped source and takes the address of every
    kernel instantiation (what NVRTC does for CuPy's name_expressions)."""
    names = [n for c in CTYPES for n in _gpu.kernel_names(c)]
    refs = ",\n    ".join(f"(const void*)&{n}" for n in names)
    path = tmp_path / "wrapper.cu"
    path.write_text(f'#include "{shipped_source()}"\n\n'
                    f"const void* cin_all_kernels[] = {{\n    {refs}\n}};\n")
    return path, names


def nvcc(*args, cwd):
    proc = subprocess.run([NVCC, "-std=c++17", "-Werror", "all-warnings", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_ptx_has_every_entry_point(tmp_path, arch):
    wrapper, names = write_wrapper(tmp_path)
    nvcc("--ptx", f"-arch={arch}", "-o", "out.ptx", str(wrapper), cwd=tmp_path)
    ptx = (tmp_path / "out.ptx").read_text()
    entries = re.findall(r"\.entry\s+(\w+)", ptx)
    assert len(entries) == len(names)
    for base in {n.split("<")[0] for n in names}:
        for code in ("f", "d"):  # Itanium mangling of the float / double template argument
            assert any(base in e and re.search(rf"I{code}", e) for e in entries), (base, code)


# ptxas may park a scalar or two in local memory to reach an occupancy target (it does for the
# forward block kernel capped at 64 registers); a spilled register-resident plane would be at
# least 32 bytes per thread.
MAX_SPILL_BYTES = 16


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_cubin_builds_without_spilling_the_plane(tmp_path, arch):
    """ptxas accepts every kernel, and none keeps its slots in local memory (the register
    kernels hold the plane in registers: a spill there makes a slow kernel, not a wrong one)."""
    wrapper, names = write_wrapper(tmp_path)
    log = nvcc("-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", "out.cubin", str(wrapper),
               cwd=tmp_path)
    assert (tmp_path / "out.cubin").stat().st_size > 0
    functions = re.findall(r"Compiling entry function '(\w+)'", log)
    assert len(functions) == len(names)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == len(names)
    assert all(int(st) <= MAX_SPILL_BYTES and int(ld) <= MAX_SPILL_BYTES for st, ld in spills), log


def load_nvrtc():
    """CuPy's NVRTC binding, when CuPy and libnvrtc are installed (no device needed)."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or libnvrtc not found
        pytest.skip(f"CuPy's NVRTC binding is not usable here: {type(exc).__name__}: {exc}")
    return nvrtc


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("ctype", CTYPES)
def test_nvrtc_compiles_like_cupy(arch, ctype):
    """The compile that cupy.RawModule runs (NVRTC, the name expressions, CuPy's -ftz=true),
    without a device: no error, no warning, and every name expression is lowered."""
    nvrtc = load_nvrtc()
    names = _gpu.kernel_names(ctype)
    prog = nvrtc.createProgram(_gpu.kernel_source(), "instance_norm.cu", (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, ("-std=c++17", "-ftz=true", f"-arch={arch}"))
        except Exception:
            pytest.fail(f"NVRTC failed:\n{nvrtc.getProgramLog(prog)}")
        assert nvrtc.getProgramLog(prog).strip() == ""
        lowered = [nvrtc.getLoweredName(prog, name) for name in names]
        assert all(name.startswith("_Z") for name in lowered)
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        assert all(f".entry {name}" in ptx for name in lowered)
    finally:
        nvrtc.destroyProgram(prog)
