"""sparqle::csr_linear (x @ A^T + bias for a CSR A) and its gradient op sparqle::sddmm_csr.

csr_linear(x, crow, col, values, row_order, bias) -> y [M, m]
    y = x [M, k] @ A^T + bias for A [m, k] in CSR (crow [m+1], col [nnz], values [nnz],
    row_order [m]) and bias [m] or None, the bias added in the kernel's epilogue.
sddmm_csr(crow, col, x, y) -> out [nnz]
    out[i] = x[row_i] . y[col_i]: the values of x @ y^T at A's pattern.

Gradients of y = x @ A^T + bias: dx = dy @ A = csr_linear(dy, A^T's structure,
values[t_perm], None); dvalues = sddmm_csr(crow, col, dy^T, x^T) (transposed views, no
copy); dbias = dy.sum(0). A^T's structure is not an argument: the backward derives it from
(crow, col) with the format's codec (sparqle.formats.csr.transposed_structure), kept while
crow and col live and are unchanged (sparqle.kernels._derived), so an eager training loop
builds it once; it needs no host sync (torch.compile traces it, CUDA graphs capture it).
dx is csr_linear again, so second derivatives in x work; sddmm_csr has no derivative: a
second derivative through the values raises.
The ops trust their inputs: sparqle.spmm and sparqle.linear check them first.

On CUDA ``auto`` has two ways to compute csr_linear in fp16, bf16 and fp32: the CUDA-core
kernel (Sputnik's), and the tensor-core one (``csr_bitmap_linear``: dense tiles of A rebuilt
from a bitmap of its pattern, Flash-LLM's "load as sparse, compute as dense"). It times both
on the first call per key (the shape, M rounded up to a power of two, the entries per row
rounded likewise, bias) and keeps the faster (bindings/_fastest.py; the CUDA-core kernel
while a CUDA graph is captured before that). The bitmap (``formats.csr.bitmap_structure``,
int32 words and row starts, a quarter byte per dense entry) is made on the first such call
and kept while crow and col live and are unchanged (sparqle.kernels._derived).
"""
from typing import Optional

import torch

from sparqle.formats.csr import bitmap_structure, columns_increase, transposed_structure
from sparqle.kernels import _capture
from sparqle.kernels._derived import derived, kept

from ._autograd import register_autograd
from ._backend import FLOATS, choose, kernels, launch, requested_backend
from ._fastest import bucket, fastest
from ._weight_op import define_weight_op

# cupy (kernels/cupy/spmm_csr.py) runs only when forced: auto keeps Triton on CUDA until the
# CuPy kernel is measured faster (bindings/_backend.choose is where that preference would go).
DTYPES = {"triton": FLOATS, "torch": FLOATS,
          "cupy": frozenset({torch.float32, torch.float16, torch.bfloat16})}


def csr_linear_forward(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                       row_order: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # Every backend reads the CSR arrays at unit stride; x and bias go through their strides.
    crow, col, values, row_order = (t.contiguous() for t in (crow, col, values, row_order))
    rows, k, m = x.shape[0], x.shape[1], crow.shape[0] - 1
    if (x.is_cuda and x.dtype != torch.float64 and rows * m * k > 0 and requested_backend() == "auto"
            and choose("csr_linear", x.device, x.dtype, DTYPES) == "triton"):
        on_triton = kernels("triton", "spmm_csr")
        candidates = {"cuda_cores": lambda: on_triton.csr_linear(x, crow, col, values, row_order, bias)}
        if _columns_increase(crow, col):
            def tensor_cores():
                words, starts = derived("csr_bitmap", lambda: bitmap_structure(crow, col, k), col, crow)
                return on_triton.csr_bitmap_linear(x, words, starts, values, bias)
            candidates["tensor_cores"] = tensor_cores
        key = ("csr_linear", x.device, x.dtype, bucket(rows), m, k,
               bucket(col.numel() // m), bias is not None, len(candidates))
        return fastest(key, candidates, "cuda_cores", x.device)
    return launch("spmm_csr", "csr_linear", DTYPES, x, x, crow, col, values, row_order, bias)


def _columns_increase(crow: torch.Tensor, col: torch.Tensor) -> bool:
    """Whether every row's columns increase strictly (the bitmap's condition), read from the
    device once per (crow, col) and kept while they live unchanged; while a CUDA graph is
    captured (no host read allowed) what was kept, else False."""
    if _capture.capturing():
        return bool(kept("csr_columns_increase", col, crow))
    return derived("csr_columns_increase", lambda: bool(columns_increase(crow, col)), col, crow)


csr_linear = define_weight_op(csr_linear_forward, lambda crow, *_: crow.shape[0] - 1)


@torch.library.custom_op("sparqle::sddmm_csr", mutates_args=())
def sddmm_csr(crow: torch.Tensor, col: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    return launch("spmm_csr", "sddmm_csr", DTYPES, x, crow.contiguous(), col.contiguous(), x, y)


@sddmm_csr.register_fake
def _(crow, col, x, y):
    return x.new_empty(col.shape)


def _sddmm_backward(ctx, grad):
    raise NotImplementedError(
        "sparqle: a second derivative (double backward) through a CSR weight's values is not "
        "supported: sparqle::sddmm_csr, their gradient, has no derivative. Freeze the values "
        "(w.values.requires_grad_(False)) to differentiate twice in x, or use the dense weight "
        "(w.to_dense()) where the values need second derivatives.")


register_autograd(sddmm_csr, _sddmm_backward, lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    x, crow, col, values, row_order, bias = inputs
    ctx.save_for_backward(x, crow, col, values)


def _backward(ctx, grad):
    x, crow, col, values = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        t_crow, t_col, t_perm, t_row_order = derived(
            "csr_transposed", lambda: transposed_structure(crow, col, x.shape[1]), col, crow)
        grad_x = torch.ops.sparqle.csr_linear(grad, t_crow, t_col, values[t_perm], t_row_order, None)
    if ctx.needs_input_grad[3]:
        grad_values = torch.ops.sparqle.sddmm_csr(crow, col, grad.t(), x.t())
    if ctx.needs_input_grad[5]:
        grad_bias = grad.sum(0)
    return grad_x, None, None, grad_values, None, grad_bias


register_autograd(csr_linear, _backward, _setup_context)
