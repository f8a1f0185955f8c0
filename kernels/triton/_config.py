"""Helpers shared by the Triton launchers: autotune configs and the launch device."""
import contextlib
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its NumPy interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(space, interpreted):
    """``space`` (a list of triton.Config) on a GPU; the single ``interpreted`` config
    under the interpreter, where each extra config only costs time."""
    return [interpreted] if interpreting() else space


def on_device_of(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current
    device; torch.library's Python ops set no device guard)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
