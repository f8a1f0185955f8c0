"""Every Python block of the README and of docs/ runs, so that the documentation never shows
code that fails. A page's blocks run in order in one namespace, after the page's SETUP,
which defines the names its snippets take as given (a model, an input x, a weight w...),
small and on the CPU. A block that cannot run here is preceded by
``<!-- not run: <reason> -->``, and the reason must be given."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(<!-- not run:(?P<reason>[^>]*)-->\s*)?```python\n(?P<code>.*?)```", re.S)

_COMMON = """
import torch, sparqle
torch.manual_seed(0)
linear = torch.nn.Linear(64, 48)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
x = torch.randn(4, 64)
w = torch.randn(48, 64)
bias = torch.randn(48)
b = torch.randn(64, 8)
"""
_WINDOWS = """
import torch, sparqle
from sparqle.bench.swin_reference import TinySwin
swin = lambda: TinySwin(depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)).eval()  # noqa: E731
q, k, v = (torch.randn(8, 2, 49, 16) for _ in range(3))
bias = torch.randn(2, 49, 49)
mask = torch.zeros(4, 49, 49)
x = torch.randn(2, 14, 14, 16)
"""
SETUP = {"window_attention.md": _WINDOWS}
# page -> the optional package its examples need (the test skips without it)
REQUIRES = {"workflow-quantize-hf.md": "transformers", "checkpoints.md": "safetensors"}


def _blocks(page: pathlib.Path):
    return [(m.group("reason"), m.group("code")) for m in _BLOCK.finditer(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    if page.name in REQUIRES:
        pytest.importorskip(REQUIRES[page.name], reason=f"{page.name}'s examples need {REQUIRES[page.name]}")
    monkeypatch.chdir(tmp_path)  # what the examples save lands here
    namespace: dict = {}
    exec(compile(SETUP.get(page.name, _COMMON), f"<setup of {page.name}>", "exec"), namespace)
    for number, (reason, code) in enumerate(_blocks(page), 1):
        if reason is not None:
            assert reason.strip(), f"{page.name}, block {number}: a block marked not run gives its reason"
            continue
        exec(compile(code, f"{page.name}, block {number}", "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_files_exist(page):
    """The tests, scripts and bench modules a page names are there."""
    named = set(re.findall(r"\b((?:tests|scripts|bench|kernels|bindings)/[\w/]+\.(?:py|sh|cu))\b", page.read_text()))
    assert not [path for path in named if not (ROOT / path).exists()]
