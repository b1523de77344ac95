"""A short run of the fuzz campaign (tools/fuzz.py): no call may crash the process.

The campaign is deterministic (fixed seed and call count, one worker), about 20 s on two cores;
CINSTNORM_FUZZ_CALLS and CINSTNORM_FUZZ_SEED change it. A long campaign is run by hand:
``python tools/fuzz.py --seconds 600 --jobs 2``.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "tools", "fuzz.py")

SUMMARY = re.compile(r"^fuzz: (\d+) calls, (\d+) crashes, (\d+) expected exceptions$", re.M)
DETAILS = re.compile(r"(\d+) hangs, (\d+) unexpected exceptions, (\d+) wrong results")


def run_campaign(out, *args, timeout=300, tmpdir=None):
    """Run tools/fuzz.py (with TMPDIR=tmpdir when given); returns (process, dict of the
    figures it reported)."""
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    for name in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):  # sanitizer reports on stderr, where the
        if name in env:                               # campaign looks for them
            env[name] = ":".join(o for o in env[name].split(":") if not o.startswith("log_path"))
    proc = subprocess.run([sys.executable, FUZZ, "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    summary, details = SUMMARY.search(proc.stdout), DETAILS.search(proc.stdout)
    assert summary and details, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls, crashes, expected = map(int, summary.groups())
    hangs, unexpected, wrong = map(int, details.groups())
    return proc, dict(calls=calls, crashes=crashes, expected=expected, hangs=hangs,
                      unexpected=unexpected, wrong=wrong)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    calls = os.environ.get("CINSTNORM_FUZZ_CALLS", "6000")
    seed = os.environ.get("CINSTNORM_FUZZ_SEED", "1")
    out = tmp_path_factory.mktemp("fuzz")
    proc, figures = run_campaign(out, "--seconds", "120", "--max-calls", calls, "--seed", seed)
    return proc, figures, out


def test_short_campaign_has_no_crash(campaign):
    proc, f, out = campaign
    report = proc.stdout[-6000:]
    assert f["calls"] >= 1000, report
    assert f["expected"] > 0, report  # the campaign does reach the validation paths
    assert f["crashes"] == 0, f"{f['crashes']} crashes; reproducers in {out}\n{report}"
    assert f["hangs"] == 0, f"{f['hangs']} hangs; reproducers in {out}\n{report}"
    assert f["unexpected"] == 0, report


def test_short_campaign_has_no_wrong_result(campaign):
    # every successful call is checked against a float64 reference inside the workers
    proc, f, out = campaign
    assert f["wrong"] == 0, proc.stdout[-6000:]


def test_crash_is_reported_with_a_reproducer(tmp_path):
    # the worker kills itself with SIGSEGV (a stand-in for a crashing kernel) after 20 cases
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, f = run_campaign(tmp_path, "--seconds", "3", "--seed", "7",
                           "--inject-crash-after", "20", tmpdir=tmp)
    assert proc.returncode == 1
    # the crashed workers' scratch folders are gone with the parent's (they were left in /tmp)
    assert os.listdir(tmp) == []
    # a signal, or under AddressSanitizer/UBSan the sanitizer's report
    assert f["crashes"] >= 1
    assert any(w in proc.stdout for w in ("SIGSEGV", "Sanitizer", "runtime error")), proc.stdout
    scripts = sorted(p for p in os.listdir(tmp_path) if p.endswith("_crash.py"))
    assert scripts
    # the reproducer is standalone: it replays the logged case with numpy and cinstnorm only
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    rep = subprocess.run([sys.executable, str(tmp_path / scripts[0])], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=120)
    assert "calls, expected exceptions" in rep.stdout, rep.stdout + rep.stderr
