"""What a new user meets first: the README's commands, the `cinstnorm` command, and an import
from a source tree that has no compiled extension (one clear line, not a circular-import
traceback)."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest

import cinstnorm
from cinstnorm import __main__ as cli
from cinstnorm._source_tree import compiled_extensions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(cinstnorm.__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import readme_commands  # noqa: E402


def _fake_tree(root, with_setup=True, extension=None):
    """A copy of the package's Python sources (no compiled extension) under root/cinstnorm."""
    pkg = root / "cinstnorm"
    pkg.mkdir(parents=True)
    for name in os.listdir(PACKAGE):
        if name.endswith((".py", ".pyx")):
            shutil.copy(os.path.join(PACKAGE, name), pkg / name)
    if with_setup:
        (root / "setup.py").write_text("# a source tree\n")
    if extension is not None:
        (pkg / extension).write_bytes(b"not a shared object")
    return root


def _python(args, cwd):
    """Python run in ``cwd`` with ``-S``: no site-packages, so neither an installed cinstnorm
    nor an editable install's import hook hides the folder's own ``cinstnorm/`` (what a user
    meets in a clone's root after a non-editable install: the folder shadows the install)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _last_line(proc):
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_import_from_a_source_tree_says_what_to_run(tmp_path):
    root = _fake_tree(tmp_path / "repo")
    proc = _python(["-c", "import cinstnorm"], cwd=root)
    assert proc.returncode != 0
    last = _last_line(proc)
    assert last.startswith("ImportError: cinstnorm was imported from its source tree"), proc.stderr
    assert "`pip install -e .`" in last and str(root) in last
    assert "circular" not in proc.stderr


def test_python_m_from_a_source_tree_is_one_clear_line(tmp_path):
    root = _fake_tree(tmp_path / "repo")
    proc = _python(["-m", "cinstnorm", "demo"], cwd=root)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "has no compiled extension" in proc.stderr and "circular" not in proc.stderr


def test_an_extension_that_cannot_load_is_named(tmp_path):
    import importlib.machinery
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    root = _fake_tree(tmp_path / "repo", extension="_cpu" + suffix)
    assert compiled_extensions(str(root / "cinstnorm"))
    proc = _python(["-c", "import cinstnorm"], cwd=root)
    assert proc.returncode != 0
    assert "compiled extension" in _last_line(proc) and "cannot be loaded" in _last_line(proc)


def test_an_installed_copy_without_extension_says_reinstall(tmp_path):
    root = _fake_tree(tmp_path / "site", with_setup=False)
    proc = _python(["-c", "import cinstnorm"], cwd=root)
    assert "reinstall" in _last_line(proc), proc.stderr


def test_console_script_is_declared():
    # the installed metadata (editable or not) has `cinstnorm = cinstnorm.__main__:main`
    scripts = {ep.name: ep.value
               for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("cinstnorm") == "cinstnorm.__main__:main"


def test_console_script_runs_the_demo():
    exe = shutil.which("cinstnorm", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("no cinstnorm script beside this interpreter (not installed by pip)")
    proc = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "InstanceNorm2d(3, eps=1e-05" in proc.stdout


def test_prog_name_follows_how_it_was_called(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/cinstnorm"])
    assert cli._prog() == "cinstnorm"
    monkeypatch.setattr(sys, "argv", [os.path.join(PACKAGE, "__main__.py")])
    assert cli._prog() == "python -m cinstnorm"


def test_readme_quick_start_has_the_two_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = readme_commands.quick_start_commands(f.read())
    assert commands == ["pip install . && cinstnorm demo", 'pip install -e ".[test]" && pytest']
    assert readme_commands.main(["main"]) == 0 and readme_commands.main(["nonsense"]) == 2


def test_ci_runs_the_readme_commands():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "tools/readme_commands.py main" in ci and "tools/readme_commands.py tests" in ci
    assert 'bash -euo pipefail -c "$main_cmd"' in ci and 'bash -euo pipefail -c "$test_cmd"' in ci


def _repo_text_files():
    for base in ("README.md", "cinstnorm", "docs", "benchmarks/RESULTS.md", "examples"):
        path = os.path.join(ROOT, base)
        if os.path.isfile(path):
            yield path
        for dirpath, _, names in os.walk(path):
            for name in names:
                if name.endswith((".md", ".py", ".pyx", ".cu", ".h")):
                    yield os.path.join(dirpath, name)


def test_nothing_points_outside_the_repository():
    for path in _repo_text_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "shared/DESIGN" not in text and "../shared" not in text, path


def test_readme_links_exist():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    links = re.findall(r"\]\(([^)#:]+)\)", text)
    assert "docs/design.md" in links
    for link in links:
        assert os.path.exists(os.path.join(ROOT, link)), link
