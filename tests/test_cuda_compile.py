"""The shipped CUDA source compiles, without a GPU.

Wherever ``nvcc`` is on PATH, every kernel instantiation that ``cinstnorm._gpu`` asks CuPy for
(float and double, plain and with the fused activation and residual, FUSED = false / true) is
compiled for sm_80 and sm_90: to PTX (the entry points must be there) and through ptxas to a
cubin (register use, no spills, no local memory), so a CUDA compile error fails CI on a machine
without a GPU.  The source is also checked to ship as package data.
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
        # the fused module: every kernel that normalizes or reads dy, with FUSED = true
        fused = _gpu.kernel_names(ctype, True)
        assert {name.split("<")[0] for name in fused} == defined - {"cin_fwd_chunk_stats"}
        assert all(name.endswith(", true>") for name in fused)
        assert sorted(_gpu.kernel_names(ctype)) == sorted(_gpu.kernel_names(ctype, False) + fused)


def test_defines_match_host_constants():
    text = shipped_source().read_text(encoding="utf-8")
    defines = dict(re.findall(r"#define\s+(CIN_\w+)\s+(\d+)", text))
    assert int(defines["CIN_GROUP_THREADS"]) == _gpu.GROUP_THREADS
    assert int(defines["CIN_CHUNK_THREADS"]) == _gpu.CHUNK_THREADS
    assert int(defines["CIN_BLOCK_MAX_THREADS"]) == _gpu.BLOCK_MAX_THREADS
    # the activation codes: the .cu includes no header, so it repeats src/cinstnorm_kernels.h's
    from cinstnorm._validation import ACTIVATIONS

    codes = {k[len("CIN_ACT_"):].lower(): int(v) for k, v in defines.items()
             if k.startswith("CIN_ACT_")}
    assert codes == {("none" if k is None else k): v for k, v in ACTIVATIONS.items()}


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


@pytest.fixture(scope="module", params=ARCHS)
def cubin_build(request, tmp_path_factory):
    """Every instantiation compiled for one architecture, once for the tests below: (the PTX
    that nvcc kept on the way, the ptxas -v log, the name expressions)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    wrapper, names = write_wrapper(tmp_path)
    log = nvcc("-cubin", f"-arch={request.param}", "-Xptxas", "-v", "--keep", "-o", "out.cubin",
               str(wrapper), cwd=tmp_path)
    assert (tmp_path / "out.cubin").stat().st_size > 0
    return (tmp_path / "wrapper.ptx").read_text(), log, names


@needs_nvcc
def test_ptx_has_every_entry_point(cubin_build):
    ptx, _, names = cubin_build
    entries = re.findall(r"\.entry\s+(\w+)", ptx)
    assert len(entries) == len(names)
    for base in {n.split("<")[0] for n in names}:
        for code in ("f", "d"):  # Itanium mangling of the float / double template argument
            assert any(base in e and re.search(rf"I{code}", e) for e in entries), (base, code)


# ptxas may park a scalar or two in local memory to reach an occupancy target (it does for the
# forward block kernel capped at 64 registers); a spilled register-resident plane would be at
# least 32 bytes per thread.
MAX_SPILL_BYTES = 16


def ptxas_report(log):
    """{mangled entry: (registers, spill store bytes, spill load bytes)} from ptxas -v."""
    report = {}
    for m in re.finditer(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads.*?Used (\d+) registers", log, re.S):
        report[m.group(1)] = (int(m.group(4)), int(m.group(2)), int(m.group(3)))
    return report


@needs_nvcc
def test_cubin_builds_without_spilling_the_plane(cubin_build):
    """ptxas accepts every kernel, and none keeps its slots in local memory (the register
    kernels hold the plane in registers: a spill there makes a slow kernel, not a wrong one).
    The fused ones (FUSED = true, mangled ``Lb1E``) are bounded so that they spill nothing."""
    _, log, names = cubin_build
    functions = re.findall(r"Compiling entry function '(\w+)'", log)
    assert len(functions) == len(names)
    report = ptxas_report(log)
    assert sorted(report) == sorted(functions)
    assert all(st <= MAX_SPILL_BYTES and ld <= MAX_SPILL_BYTES
               for _, st, ld in report.values()), log
    fused = {f: r for f, r in report.items() if "Lb1E" in f}
    assert len(fused) == sum(len(_gpu.kernel_names(c, True)) for c in CTYPES)
    assert all(st == ld == 0 for _, st, ld in fused.values()), fused


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
