"""2:4 sparse linear on the sparse tensor cores (nm_linear.cu, mma.sp, sm_80 and newer).

y [M, N] = x [M, K] @ W^T + bias for W [N, K] in the N:M format: values [N, Kc] (x's dtype,
Kc = Kp / 2, Kp = K rounded up to a multiple of 4), meta int32 [N, ceil(Kc / 16)] with the
kept positions 2 bits each, LSB first (see the .cu). fp16 and bf16, fp32 accumulation,
y in x's dtype. Only n = 2, m = 4: the pattern the tensor cores take. The kernel stages its
tiles through shared memory with cp.async where rows are 16-byte aligned and with plain
loads elsewhere, so x and values may start at any element.
"""
from typing import Optional

import numpy as np
import torch

from sparqle.formats._checks import cdiv
# The launcher of sparqle::nm_to_dense is the codec's: no CUDA C of its own here.
from sparqle.formats.nm import to_dense  # noqa: F401

from .. import _alloc
from ._module import i32, launch, ptr

_FILE = "nm_linear.cu"
_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16"}
_THREADS = 128
_BLOCK_ROWS = 64
_BLOCK_TOKENS = 64


def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T + bias for 2:4-sparse W [N, K] given as (values, meta)."""
    if (n, m) != (2, 4):
        raise ValueError(f"the CuPy nm_linear kernel runs the 2:4 pattern only, got n:m = {n}:{m}")
    if x.dtype not in _NAMES:
        raise ValueError(f"the CuPy nm_linear kernel takes float16 or bfloat16 x, got {x.dtype}")
    tokens, k = x.shape
    rows, kc = values.shape
    y = _alloc.empty((tokens, rows), x.dtype, x.device)
    if tokens == 0 or rows == 0:
        return y
    x, values, meta = x.contiguous(), values.contiguous(), meta.contiguous()
    bias = None if bias is None else bias.contiguous()
    launch(_FILE, f"nm24_linear_{_NAMES[x.dtype]}",
           (cdiv(rows, _BLOCK_ROWS), cdiv(tokens, _BLOCK_TOKENS)), (_THREADS,),
           (ptr(x), ptr(values), ptr(meta), np.uint64(0) if bias is None else ptr(bias),
            ptr(y), i32(tokens), i32(rows), i32(k), i32(kc), i32(meta.shape[1])), x)
    return y

