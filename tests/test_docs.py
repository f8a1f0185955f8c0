"""The documentation site builds with no warnings (broken links and anchors, pages missing
from nav: see mkdocs.yml's validation)."""
import os
import pathlib
import subprocess
import sys

import pytest

if os.environ.get("SPARQLE_REQUIRE_EXTRAS") == "1":
    import mkdocs  # noqa: F401  (CI: the test extra's mkdocs missing is a failure, not a skip)
else:
    pytest.importorskip("mkdocs", reason="needs the test extra's mkdocs")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
