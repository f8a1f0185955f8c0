"""The console entry point, and the benchmark harness on a tiny case."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sparqle
from sparqle import cli
from sparqle.bench import bench_spmm_csr, harness, performance_page


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "sparqle", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "sparqle" in out and "can run" in out


def test_bench_report_table_json_and_plot(tmp_path):
    case = bench_spmm_csr.make_case(out_features=48, in_features=40, tokens=8, sparsity=0.9, dtype="float32")
    report = harness.run([case], progress=False)
    rows = report["results"]
    assert [r["impl"] for r in rows] == ["sparqle", "dense", "torch.sparse"]
    assert all(r["time_ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert rows[0]["sparqle_speedup"] == 1.0 and rows[0]["roof_fraction"] > 0
    assert report["measured_memory_bandwidth_gbs"] > 0 and report["commit"]
    assert all(r["p20_ms"] <= r["time_ms"] <= r["p80_ms"] for r in rows)
    assert report["backend"] == "auto" and report["threads"] == torch.get_num_threads()
    text = harness.table(report, bench_spmm_csr.KEYS)
    assert "torch.sparse" in text and "speed-up: the impl's time over sparqle's" in text
    path = harness.write(report, str(tmp_path), "spmm_csr", bench_spmm_csr.KEYS)
    assert json.load(open(path))["results"] == rows
    page = open(path[:-len(".json")] + ".md").read()
    assert page.startswith("# spmm_csr") and "| torch.sparse |" in page
    bench_spmm_csr.plot(report, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0
    performance_page.main(str(tmp_path), str(tmp_path / "performance.md"))
    text = (tmp_path / "performance.md").read_text()
    assert report["device"] in text and "| dense |" in text and f"{rows[1]['time_ms']:.4f}" in text
    # the page's columns are the harness's: measured fields are not read as the case's parameters
    assert "p20_ms" not in text and f"{rows[1]['p20_ms']:.4f}-{rows[1]['p80_ms']:.4f}" in text


def test_bench_rejects_unknown_op(capsys):
    try:
        cli.main(["bench", "--op", "nope"])
    except SystemExit as e:
        assert e.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_info_reports_a_mistyped_backend_and_prints_the_rest(monkeypatch, capsys):
    monkeypatch.setenv("SPARQLE_BACKEND", "trition")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "requested backend: error: SPARQLE_BACKEND='trition' is not a backend" in out
    assert "torch  can run" in out


def test_version_and_plain_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("sparqle ")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_a_forced_backend_run_is_named_apart_and_runs_compare(tmp_path, capsys):
    case = bench_spmm_csr.make_case(out_features=32, in_features=24, tokens=4, sparsity=0.5, dtype="float32")
    normal = harness.run([case], progress=False)
    with sparqle.use_backend("torch"):
        forced = harness.run([case], progress=False)
    assert forced["backend"] == "torch"
    a = harness.write(normal, str(tmp_path), "spmm_csr")
    b = harness.write(forced, str(tmp_path), "spmm_csr")
    assert a != b and "-torch-" in os.path.basename(b)
    assert cli.main(["bench", "--compare", a, b]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "3 shared rows" in out[0] and len(out) == 5
    ratio = float(out[2].split()[-1].rstrip("x"))  # the first row: sparqle
    assert ratio == pytest.approx(forced["results"][0]["time_ms"] / normal["results"][0]["time_ms"], abs=0.006)


def test_bench_writes_outside_the_committed_results_by_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "default bench-results" in " ".join(capsys.readouterr().out.split())


def test_bench_accuracy_skips_with_its_reason_without_the_model(monkeypatch, capsys, tmp_path):
    """``sparqle bench --op accuracy`` (not in the default set) says why it cannot run;
    with the model it prints bench_accuracy.cells (tests/test_accuracy.py measures it)."""
    from sparqle.bench import bench_accuracy
    monkeypatch.setattr(bench_accuracy, "missing", lambda: "the test extra's model is missing")
    assert cli.main(["bench", "--op", "accuracy", "--out", str(tmp_path)]) == 0
    assert "skipped accuracy: the test extra's model is missing" in capsys.readouterr().out
    assert "accuracy" not in cli.BENCHMARKS
    report = {**harness.stamp(), "notes": "", "results": [
        {"conversion": "csr", "sparsity": 0.5, "method": "sparsegpt", "worst": 0.88, "mean": 0.895, "seconds": 12.5}]}
    page = harness.cells_markdown(report, bench_accuracy.cells(report), "accuracy")
    assert "| csr (sparsity=0.5) | sparsegpt | 0.8800 | 0.8950 | 12.5 |" in page
