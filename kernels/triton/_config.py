"""Autotune helpers shared by the Triton launchers."""
import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its NumPy interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(space, interpreted):
    """``space`` (a list of triton.Config) on a GPU; the single ``interpreted`` config
    under the interpreter, where each extra config only costs time."""
    return [interpreted] if interpreting() else space
