"""The documentation site builds with no warnings (broken links, pages missing from nav)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (pip install -e .[test])")
def test_docs_build_strict(tmp_path):
    subprocess.run(["mkdocs", "build", "--strict", "--site-dir", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
