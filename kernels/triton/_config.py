"""Helpers shared by the Triton launchers: the interpreter switch, the launch device and
the constexprs of a dot (autotuning is in _autotune.py)."""
import contextlib
import os

import torch
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its NumPy interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_device_of(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current
    device; torch.library's Python ops set no device guard)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_meta(dtype: torch.dtype) -> dict:
    """Constexprs of a ``tl.dot`` on ``dtype`` inputs: ACC_DTYPE, the input PRECISION (TF32
    for fp32 only when torch.get_float32_matmul_precision() allows it), and UPCAST (to fp32
    before the dot: only bf16 in Triton 3.6's interpreter, whose bf16 dot is wrong)."""
    if dtype == torch.float64:
        return {"ACC_DTYPE": tl.float64, "PRECISION": "ieee", "UPCAST": False}
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {"ACC_DTYPE": tl.float32, "PRECISION": "tf32" if tf32 else "ieee",
            "UPCAST": dtype == torch.bfloat16 and interpreting()}
