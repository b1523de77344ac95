"""tools/bit_hash.py: the bitwise regression hash of forward and backward outputs."""
import pathlib
import re
import subprocess
import sys

import pytest

from helpers import load_tool

TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bit_hash.py"


@pytest.fixture(scope="module")
def tool():
    return load_tool("bit_hash")


def test_digest_is_repeatable_and_sees_one_changed_bit(tool, monkeypatch):
    count, first = tool.digest(tool.QUICK_LENGTHS)
    assert count == 2 * len(tool.QUICK_LENGTHS) * 3 * len(tool.ACTIVATIONS) * 2 * 7
    assert tool.digest(tool.QUICK_LENGTHS) == (count, first)
    import cinstnorm as cin
    real = cin.instance_norm_forward

    def one_bit_off(*args, **kwargs):
        y, mean, rstd = real(*args, **kwargs)
        y.reshape(-1).view(f"u{y.itemsize}")[0] ^= 1
        return y, mean, rstd

    monkeypatch.setattr(cin, "instance_norm_forward", one_bit_off)
    assert tool.digest(tool.QUICK_LENGTHS) != (count, first)


def test_each_path_in_a_process_of_its_own():
    out = subprocess.run([sys.executable, str(TOOL), "--quick", "--simd", "baseline,avx2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    assert re.fullmatch(r"baseline: \d+ outputs, sha256 [0-9a-f]{64}", out[0])
    assert re.fullmatch(r"avx2: (\d+ outputs, sha256 [0-9a-f]{64}|this CPU cannot run it)",
                        out[1])
