"""The console entry point, and the benchmark harness on a tiny case."""
import json
import subprocess
import sys

import pytest

from sparqle import cli
from sparqle.bench import bench_spmm_csr, harness, performance_page


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "sparqle", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "sparqle" in out and "can run" in out


def test_bench_report_table_json_and_plot(tmp_path):
    case = bench_spmm_csr.make_case(m=48, k=40, n=8, sparsity=0.9, dtype="float32")
    report = harness.run([case], progress=False)
    rows = report["results"]
    assert [r["impl"] for r in rows] == ["sparqle", "dense", "torch.sparse"]
    assert all(r["time_ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert rows[0]["sparqle_speedup"] == 1.0 and rows[0]["roof_fraction"] > 0
    assert report["measured_memory_bandwidth_gbs"] > 0 and report["commit"]
    assert "torch.sparse" in harness.table(report, bench_spmm_csr.KEYS)
    path = harness.write(report, str(tmp_path), "spmm_csr")
    assert json.load(open(path))["results"] == rows
    bench_spmm_csr.plot(report, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0
    performance_page.main(str(tmp_path), str(tmp_path / "performance.md"))
    text = (tmp_path / "performance.md").read_text()
    assert report["device"] in text and "| dense |" in text and f"{rows[1]['time_ms']:.4f}" in text


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
