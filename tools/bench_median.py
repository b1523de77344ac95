"""Median ratio tables of several ``python -m cinstnorm bench --json`` runs, as Markdown.

    python tools/bench_median.py run1.json run2.json run3.json

Single runs on a shared machine move by 10-30 % in a few cells (a sample that met a busy
neighbour or a page-fault storm); the median of an odd number of runs per cell is steadier.
Prints the main ratio table (torch/cin and cin/copy per direction), the out=/allocating and
peer (onnxruntime, OpenVINO) table, the small-call latencies, the channels-last table (cl/nchw
and torch cl/cin cl) and each run's own geometric means.  The geomean rows are the
geometric means of the median column.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Optional, Sequence

from cinstnorm._bench import _fmt_ratio, geometric_means

MAIN_COLUMNS = [(f"{label} {kind}", f"{op}:{kind}")
                for op, label in (("forward", "fwd"), ("backward", "bwd"),
                                  ("forward_backward", "fwd+bwd"))
                for kind in ("torch/cin", "cin/copy")]
# out= against the allocating call (<= 1.05 wanted), and the peers' forward into preallocated
# arrays against cinstnorm's forward into out= (> 1: cinstnorm is faster)
OUT_COLUMNS = [("fwd out=/alloc", "forward:out/alloc"), ("bwd out=/alloc", "backward:out/alloc"),
               ("fwd+bwd out=/alloc", "forward_backward:out/alloc"),
               ("ort/cin", "forward:onnxruntime/cin"), ("ov/cin", "forward:openvino/cin")]
CL_COLUMNS = [("fwd cl/nchw", "forward:cl/nchw"), ("bwd cl/nchw", "backward:cl/nchw"),
              ("torch cl/cin cl", "forward:torch_cl/cin_cl")]


def median_cases(runs: Sequence[dict], key: str) -> list[dict]:
    """The cases of ``runs[i][key]`` with each ratio replaced by its median over the runs
    (None where no run has it)."""
    out = []
    for i, case in enumerate(runs[0][key]):
        ratios = {}
        for k in case["ratios"]:
            got = [r[key][i]["ratios"].get(k) for r in runs]
            got = [g for g in got if g is not None]
            ratios[k] = statistics.median(got) if got else None
        out.append({"shape": case["shape"], "dtype": case["dtype"], "ratios": ratios})
    return out


def median_table(runs: Sequence[dict], key: str, columns) -> str:
    """Markdown table of the per-cell median ratios of ``runs[i][key]`` (a list of cases);
    the last row holds the geometric means of the medians."""
    cases = median_cases(runs, key)
    lines = ["| shape | dtype | " + " | ".join(h for h, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for c in cases:
        lines.append(f"| {c['shape']} | {c['dtype']} | "
                     + " | ".join(_fmt_ratio(c["ratios"].get(k)) for _, k in columns) + " |")
    geomean = geometric_means(cases)
    lines.append("| **geomean** | | " + " | ".join(
        f"**{_fmt_ratio(geomean.get(k))}**" for _, k in columns) + " |")
    return "\n".join(lines)


def with_out_ratios(run: dict) -> dict:
    """The run with "out_cases": its cases with the out=/allocating time ratios added (from
    the best times; None where a time is missing)."""
    cases = []
    for c in run.get("cases", []):
        ratios = dict(c.get("ratios", {}))
        times = c.get("times", {})
        for op in ("forward", "backward", "forward_backward"):
            alloc, out = times.get(f"cin_{op}"), times.get(f"cin_{op}_out")
            ratios[f"{op}:out/alloc"] = out["best"] / alloc["best"] if alloc and out else None
        for k in ("forward:onnxruntime/cin", "forward:openvino/cin"):
            ratios.setdefault(k, None)
        cases.append(dict(c, ratios=ratios))
    return dict(run, out_cases=cases)


def latency_table(runs: Sequence[dict]) -> str:
    """Markdown table of the small-call latencies (µs), the median over runs of each call's
    median time; "-" where a run has no such call."""
    first = runs[0]["latency"]["cases"]
    calls = []
    for c in first:
        calls += [k for k in c["times"] if k not in calls]
    lines = ["| call | " + " | ".join(f"{c['shape']} {c['dtype']}" for c in first) + " |",
             "|---|" + "---|" * len(first)]
    for k in calls:
        cells = []
        for j in range(len(first)):
            got = [r["latency"]["cases"][j]["times"][k]["median"] for r in runs
                   if k in r["latency"]["cases"][j]["times"]]
            cells.append(f"{statistics.median(got) * 1e6:.2f}" if got else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_geomeans(runs: Sequence[dict], key: str, columns) -> str:
    """Each run's own geometric means of the given ratio columns."""
    parts = []
    for h, k in columns:
        parts.append(f"{h}: " + ", ".join(_fmt_ratio(r[key].get(k)) for r in runs))
    return "; ".join(parts)


def check_same_cases(runs: Sequence[dict]) -> None:
    for key in ("cases", "channels_last_cases"):
        shapes = {tuple((c["shape"], c["dtype"]) for c in r.get(key, [])) for r in runs}
        if len(shapes) != 1:
            raise SystemExit(f"bench_median: the runs differ in their {key}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by bench --json")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    check_same_cases(runs)
    env = runs[0]["environment"]
    print(f"{len(runs)} runs; {env.get('processor') or 'unknown CPU'}, {env['threads']} "
          f"thread(s), best of {env['repeat']}, SIMD path {env.get('simd_path', '?')}\n")
    if runs[0].get("cases"):
        print(median_table(runs, "cases", MAIN_COLUMNS) + "\n")
        print("Per-run geomeans: " + run_geomeans(runs, "geomean", MAIN_COLUMNS) + "\n")
        print(median_table([with_out_ratios(r) for r in runs], "out_cases", OUT_COLUMNS)
              + "\n")
    if all(r.get("latency", {}).get("cases") for r in runs):
        print("Small-call latency, µs (median over the runs of each call's median):\n")
        print(latency_table(runs) + "\n")
    if runs[0].get("channels_last_cases"):
        print(median_table(runs, "channels_last_cases", CL_COLUMNS) + "\n")
        print("Per-run geomeans: "
              + run_geomeans(runs, "channels_last_geomean", CL_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
