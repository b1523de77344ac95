"""tools/bench_median.py: the median of each ratio over runs, and the geomean of the medians."""
import json
import math

import pytest

from helpers import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("bench_median")


def _run(fwd, cl_fwd, cl_bwd):
    """A bench --json result with two cases; ratios as given (None: not measured)."""
    cases = [{"shape": s, "dtype": "float32",
              "ratios": {"forward:torch/cin": f, "forward:cin/copy": 1.0}}
             for s, f in zip(("a", "b"), fwd)]
    cl = [{"shape": s, "dtype": "float32",
           "ratios": {"forward:cl/nchw": f, "backward:cl/nchw": b,
                      "forward:torch_cl/cin_cl": None}}
          for s, f, b in zip(("a", "b"), cl_fwd, cl_bwd)]
    return {"environment": {"threads": 2, "repeat": 7, "processor": "Example CPU",
                            "simd_path": "avx2"},
            "cases": cases, "geomean": {"forward:torch/cin": 2.0},
            "channels_last_cases": cl, "channels_last_geomean": {"forward:cl/nchw": 1.1}}


def test_medians_per_cell_and_geomean_of_the_medians(tool):
    runs = [_run((1.0, 8.0), (1.0, 1.6), (2.0, 1.0)),
            _run((3.0, 2.0), (1.2, 1.1), (1.5, 1.3)),
            _run((2.0, 4.0), (0.9, 1.3), (1.0, 1.2))]
    cl = tool.median_cases(runs, "channels_last_cases")
    assert [c["ratios"]["forward:cl/nchw"] for c in cl] == [1.0, 1.3]
    assert [c["ratios"]["backward:cl/nchw"] for c in cl] == [1.5, 1.2]
    assert cl[0]["ratios"]["forward:torch_cl/cin_cl"] is None
    table = tool.median_table(runs, "cases", tool.MAIN_COLUMNS).splitlines()
    assert table[2].startswith("| a | float32 | 2.00 | 1.00 | - |")
    assert table[3].startswith("| b | float32 | 4.00 | 1.00 | - |")
    assert table[-1].startswith(f"| **geomean** | | **{math.sqrt(8.0):.2f}** | **1.00** |")


def test_command_line(tool, tmp_path, capsys):
    paths = []
    for i, run in enumerate([_run((1.0, 2.0), (1.0, 1.0), (1.0, 1.0))] * 3):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    assert tool.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 runs; Example CPU, 2 thread(s), best of 7, SIMD path avx2")
    assert "| **geomean** | | **1.00** | **1.00** | **-** |" in out
    assert "Per-run geomeans: fwd cl/nchw: 1.10, 1.10, 1.10" in out


def test_runs_of_different_cases_are_refused(tool, tmp_path):
    a, b = _run((1.0, 2.0), (1.0, 1.0), (1.0, 1.0)), _run((1.0, 2.0), (1.0, 1.0), (1.0, 1.0))
    b["cases"][1]["shape"] = "c"
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, run in zip(paths, (a, b)):
        p.write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="differ in their cases"):
        tool.main([str(p) for p in paths])


def _timed_run(alloc, out, ort, lat):
    """One case with the forward's allocating and out= times, a peer ratio and latencies."""
    case = {"shape": "a", "dtype": "float32",
            "times": {"cin_forward": {"best": alloc}, "cin_forward_out": {"best": out}},
            "ratios": {"forward:torch/cin": 2.0, "forward:onnxruntime/cin": ort}}
    latency = {"cases": [{"shape": "(2,3,8,8)", "dtype": "float32",
                          "times": {"cin_forward": {"median": lat},
                                    **({"onnxruntime": {"median": 2 * lat}} if ort else {})}}]}
    return {"environment": {"threads": 2, "repeat": 7}, "cases": [case],
            "geomean": {}, "latency": latency}


def test_out_ratios_and_latency_medians(tool, tmp_path, capsys):
    runs = [_timed_run(1.0, 1.2, 2.0, 1e-6), _timed_run(2.0, 1.0, None, 3e-6),
            _timed_run(1.0, 1.1, 4.0, 2e-6)]
    table = tool.median_table([tool.with_out_ratios(r) for r in runs], "out_cases",
                              tool.OUT_COLUMNS).splitlines()
    # out/alloc per run: 1.2, 0.5, 1.1 -> 1.1; backward untimed: -; ort: median of 2 and 4
    assert table[2] == "| a | float32 | 1.10 | - | - | 3.00 | - |"
    lat = tool.latency_table(runs).splitlines()
    assert lat[0] == "| call | (2,3,8,8) float32 |"
    assert lat[2] == "| cin_forward | 2.00 |" and lat[3] == "| onnxruntime | 3.00 |"
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    assert tool.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "| a | float32 | 1.10 | - | - | 3.00 | - |" in out and "| cin_forward | 2.00 |" in out
