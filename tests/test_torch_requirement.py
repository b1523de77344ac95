"""CINSTNORM_REQUIRE_TORCH: without torch the parity tests skip, or fail when it is set to 1.

Runs pytest on one parity test in a subprocess where ``import torch`` raises ImportError (a stub
module named torch earlier on the path).
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_parity_without_torch(tmp_path, require):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "torch.py").write_text('raise ImportError("torch hidden by the test")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub), env.get("PYTHONPATH")]))
    env.pop("CINSTNORM_REQUIRE_TORCH", None)
    if require is not None:
        env["CINSTNORM_REQUIRE_TORCH"] = require
    target = os.path.join(HERE, "test_torch_parity.py") + "::test_difference_empty_batch"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", target,
         "--rootdir", os.path.dirname(HERE)],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("require", [None, "0"])
def test_missing_torch_skips(tmp_path, require):
    proc = _run_parity_without_torch(tmp_path, require)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout, proc.stdout


def test_missing_torch_fails_when_required(tmp_path):
    proc = _run_parity_without_torch(tmp_path, "1")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "CINSTNORM_REQUIRE_TORCH" in proc.stdout, proc.stdout
    assert "skipped" not in proc.stdout
