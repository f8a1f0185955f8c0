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
"""
from typing import Optional

import torch

from sparqle.formats.csr import transposed_structure
from sparqle.kernels._derived import derived

from ._autograd import register_autograd
from ._backend import FLOATS, launch
from ._weight_op import define_weight_op

# cupy (kernels/cupy/spmm_csr.py) runs only when forced: auto keeps Triton on CUDA until the
# CuPy kernel is measured faster (bindings/_backend.choose is where that preference would go).
DTYPES = {"triton": FLOATS, "torch": FLOATS,
          "cupy": frozenset({torch.float32, torch.float16, torch.bfloat16})}


def csr_linear_forward(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                       row_order: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # Every backend reads the CSR arrays at unit stride; x and bias go through their strides.
    crow, col, values, row_order = (t.contiguous() for t in (crow, col, values, row_order))
    return launch("spmm_csr", "csr_linear", DTYPES, x, x, crow, col, values, row_order, bias)


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
