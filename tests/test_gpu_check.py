"""The GPU check (scripts/gpu_check.sh, bench/gpu_check.py) proved on a CPU, so that it cannot
rot between GPU runs: the dry run selects the tests (collected, not run), times every
headline point at tiny shapes with the kernels interpreted, and writes what a GPU run
writes, within the limits of what comes back from a lent machine."""
import json
import os
import subprocess
import sys

import pytest

from sparqle.bench import gpu_check, headline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILES, MAX_BYTES = 8, 16 << 20


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, SPARQLE_NO_INSTALL="1", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script decides, as on a fresh machine
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out), "all",
                             "--dry-run"], env=env, capture_output=True, text=True, timeout=600)
    return out, result


def test_dry_run_succeeds_and_prints_its_plan_first(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    plan = next(i for i, line in enumerate(lines) if "kernel compiles and" in line)
    first_point = next(i for i, line in enumerate(lines) if line.endswith(")") and ": done (" in line)
    assert plan < first_point
    assert any("tests on the CUDA backends" in line for line in lines)


def test_outputs_fit_what_a_lent_machine_returns(dry_run):
    out, _ = dry_run
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert sorted(os.path.basename(f) for f in files) == [
        "bench.json", "gpu_check.log", "junit.xml", "summary.md", "tests.log"]
    assert len(files) <= MAX_FILES
    assert all(os.path.dirname(f) == str(out) and os.path.getsize(f) <= MAX_BYTES for f in files)


def test_bench_json_has_the_results_schema_and_every_point(dry_run):
    out, _ = dry_run
    report = json.load(open(os.path.join(out, "bench.json")))
    for key in ("device", "date", "commit", "measured_memory_bandwidth_gbs", "results"):
        assert report[key] is not None, key
    assert set(report["versions"]) >= {"torch", "triton", "cuda", "driver", "sparqle"}
    assert report["plan"]["compiles"] > 0 and report["plan"]["autotune_trials"] >= 0
    rows = report["results"]
    for point in headline.POINTS:
        mine = [r for r in rows if r["op"] == point.family and r["impl"] == "sparqle"]
        # e2e: an eager row has no agreement to check (graph rows, on a GPU, check the replay)
        assert mine and all(r["time_ms"] > 0 and (r["agrees"] is not False if point.family == "e2e"
                                                  else r["agrees"]) for r in mine), point
        for baseline in point.goals:
            assert any(r["op"] == point.family and r["impl"] == baseline for r in rows), (point, baseline)
    for row in rows:  # the keys performance_page and harness.table read
        assert {"op", "impl", "time_ms", "tflops", "gbs", "roof_fraction", "sparqle_speedup"} <= set(row)


def test_summary_has_the_headline_table(dry_run):
    out, _ = dry_run
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| op | shape | dtype | timing | sparqle ms | baseline |" in summary
    for family in headline.FAMILIES:
        assert f"| {family} |" in summary
    assert "## Tests" in summary


def test_family_selection():
    command = gpu_check.pytest_command("out", ["int4", "window_attention"], dry_run=False)
    assert command[command.index("-k") + 1] == "int4 or window"
    assert "--cuda-only" in command
    with pytest.raises(ValueError, match="no headline points"):
        headline.points(["int3"])
    assert {p.family for p in headline.points(["nm"])} == {"nm"}


def test_headline_table_sets_each_ratio_beside_its_goal():
    def row(impl, ms, speedup, goal=None, **extra):
        return {"op": "int4", "shape": "tokens=1", "dtype": "bfloat16", "timing": "eager", "impl": impl,
                "time_ms": ms, "sparqle_speedup": speedup, "goal": goal, "error": None,
                "roof_fraction": 0.5 if impl == "sparqle" else None, **extra}
    report = {"results": [row("sparqle", 1.0, 1.0, agreement=0.1, agrees=True),
                          row("dense", 2.5, 2.5, goal=3.0)]}
    table = gpu_check.headline_table(report)
    assert table[2] == ("| int4 | tokens=1 | bfloat16 | eager | 1.0000 | dense | 2.5000 | 2.50x | 3.00x | **no** "
                        "| 50% | yes (1.0e-01) |")
