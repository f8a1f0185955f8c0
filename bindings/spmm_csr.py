"""sparqle::spmm_csr (CSR x dense) and its backward op sparqle::sddmm_csr.

spmm_csr(crow, col, values, row_order, t_crow, t_col, t_perm, t_row_order, b) -> C [m, n]
    C = A @ b for A [m, k] in CSR and dense b [k, n]. ``t_*`` is the CSR structure of
    A^T (its values are ``values[t_perm]``), needed only for the gradient of b: pass
    None when b needs none.
sddmm_csr(crow, col, x, y) -> out [nnz]
    out[i] = x[row_i] . y[col_i]: the values of x @ y^T at A's pattern.

Gradients of C = A @ b: dvalues = sddmm_csr(dC, b) at A's pattern; db = A^T @ dC, whose
own gradient (a second derivative in b) is A @ ..., with A's structure passed as that of
(A^T)^T. sddmm_csr has no derivative: a second derivative through the values raises.
The ops trust their inputs: sparqle.spmm and sparqle.linear check them first.
"""
from typing import Optional

import torch

from ._backend import FLOATS, launch, register_autograd

# cupy (kernels/cupy/spmm_csr.py) runs only when forced: auto keeps Triton on CUDA until the
# CuPy kernel is measured faster (bindings/_backend.choose is where that preference would go).
_DTYPES = {"triton": FLOATS, "torch": FLOATS,
           "cupy": frozenset({torch.float32, torch.float16, torch.bfloat16})}


@torch.library.custom_op("sparqle::spmm_csr", mutates_args=())
def spmm_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             row_order: torch.Tensor, t_crow: Optional[torch.Tensor],
             t_col: Optional[torch.Tensor], t_perm: Optional[torch.Tensor],
             t_row_order: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    # Every backend reads the CSR arrays at unit stride.
    crow, col, values, row_order = (t.contiguous() for t in (crow, col, values, row_order))
    return launch("spmm_csr", "spmm_csr", _DTYPES, b, crow, col, values, row_order, b)


@spmm_csr.register_fake
def _(crow, col, values, row_order, t_crow, t_col, t_perm, t_row_order, b):
    return b.new_empty((crow.shape[0] - 1, b.shape[1]))


@torch.library.custom_op("sparqle::sddmm_csr", mutates_args=())
def sddmm_csr(crow: torch.Tensor, col: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    return launch("spmm_csr", "sddmm_csr", _DTYPES, x, crow.contiguous(), col.contiguous(), x, y)


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


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``perm``: (values[perm])[_inverse(perm)] == values."""
    inverse = torch.empty_like(perm)
    inverse[perm.long()] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inverse


def _setup_context(ctx, inputs, output):
    crow, col, values, row_order, t_crow, t_col, t_perm, t_row_order, b = inputs
    ctx.save_for_backward(crow, col, values, row_order, t_crow, t_col, t_perm, t_row_order, b)


def _backward(ctx, grad):
    crow, col, values, row_order, t_crow, t_col, t_perm, t_row_order, b = ctx.saved_tensors
    # dC arrives transposed from sparqle.linear; both ops stream rows of it.
    grad = grad.contiguous()
    grad_values = grad_b = None
    if ctx.needs_input_grad[2]:
        grad_values = torch.ops.sparqle.sddmm_csr(crow, col, grad, b)
    if ctx.needs_input_grad[8]:
        if t_crow is None:
            raise RuntimeError("sparqle::spmm_csr: the gradient of b needs A^T's structure "
                               "(t_crow, t_col, t_perm, t_row_order), which was not passed")
        # With create_graph, db = A^T @ dC is differentiated again: pass A's structure as A^T's.
        again = (crow, col, _inverse(t_perm), row_order) if torch.is_grad_enabled() else (None,) * 4
        grad_b = torch.ops.sparqle.spmm_csr(t_crow, t_col, values[t_perm], t_row_order, *again, grad)
    return None, None, grad_values, None, None, None, None, None, grad_b


register_autograd(spmm_csr, _backward, _setup_context)
