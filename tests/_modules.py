"""Helpers for the nn-module tests."""
import io
import pathlib
import subprocess
import sys

import torch
from torch import nn


def load_saved(model: nn.Module, other: nn.Module) -> nn.Module:
    """``other`` after loading ``model``'s state_dict through torch.save and
    torch.load(weights_only=True), as a user ships a converted model."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    return other


def run_isolated(module: str, function: str, *args) -> None:
    """Call ``function(*args)`` of test module ``module`` in a fresh interpreter, so that a
    crash (a segfault in a kernel fed a corrupt tensor) fails the calling test alone; its
    output is shown when it fails."""
    code = f"import tests.conftest; from {module} import {function}; {function}(*{args!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{function}{args} exited with {proc.returncode}"
                                  f"{' (killed by a signal)' if proc.returncode < 0 else ''}:\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
