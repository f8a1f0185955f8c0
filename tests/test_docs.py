"""The documentation site builds with no warnings (broken links, pages missing from nav)."""
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs", reason="needs the test extra's mkdocs")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
