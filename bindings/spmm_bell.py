"""sparqle::spmm_bell (x @ A^T for a Blocked-ELL A) and its backward ops
sparqle::spmm_bell_t and sparqle::sddmm_bell.

spmm_bell(ell_cols, values, t_ell_cols, t_slots, x, m) -> out [n, m] = x [n, k] @ A^T
    ``t_*`` is A^T's block structure, needed only for the gradient of x: pass None when
    x needs none.
spmm_bell_t(t_ell_cols, t_slots, values, x, k) -> out [n, k] = x [n, m] @ A
sddmm_bell(ell_cols, dy, x, b) -> [R, W, b, b]: dy^T @ x at A's stored blocks

Gradients of out = x @ A^T: dx = dout @ A (spmm_bell_t); dvalues = sddmm_bell(dout, x).
spmm_bell_t and sddmm_bell have no derivative: a second derivative raises.
The ops trust their inputs: sparqle.spmm and sparqle.linear check them first.
"""
from typing import Optional

import torch

from ._backend import FLOATS, launch, register_autograd

_DTYPES = {"triton": FLOATS, "torch": FLOATS}


@torch.library.custom_op("sparqle::spmm_bell", mutates_args=())
def spmm_bell(ell_cols: torch.Tensor, values: torch.Tensor, t_ell_cols: Optional[torch.Tensor],
              t_slots: Optional[torch.Tensor], x: torch.Tensor, m: int) -> torch.Tensor:
    return launch("spmm_bell", "spmm_bell", _DTYPES, x, ell_cols, values, x, m)


@spmm_bell.register_fake
def _(ell_cols, values, t_ell_cols, t_slots, x, m):
    return x.new_empty((x.shape[0], m))


@torch.library.custom_op("sparqle::spmm_bell_t", mutates_args=())
def spmm_bell_t(t_ell_cols: torch.Tensor, t_slots: torch.Tensor, values: torch.Tensor,
                x: torch.Tensor, k: int) -> torch.Tensor:
    return launch("spmm_bell", "spmm_bell_t", _DTYPES, x, t_ell_cols, t_slots, values, x, k)


@spmm_bell_t.register_fake
def _(t_ell_cols, t_slots, values, x, k):
    return x.new_empty((x.shape[0], k))


@torch.library.custom_op("sparqle::sddmm_bell", mutates_args=())
def sddmm_bell(ell_cols: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, b: int) -> torch.Tensor:
    return launch("spmm_bell", "sddmm_bell", _DTYPES, dy, ell_cols, dy, x, b)


@sddmm_bell.register_fake
def _(ell_cols, dy, x, b):
    return dy.new_empty((ell_cols.shape[0], ell_cols.shape[1], b, b))


def _second_derivative(ctx, *grads):
    raise NotImplementedError(
        "sparqle: second derivatives (double backward) through a Blocked-ELL weight are not "
        "supported: sparqle::spmm_bell_t and sparqle::sddmm_bell, the gradient ops, have no "
        "derivative. Use the dense weight (w.to_dense()) where a second derivative is needed.")


for _op in (spmm_bell_t, sddmm_bell):
    register_autograd(_op, _second_derivative, lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    ell_cols, values, t_ell_cols, t_slots, x, m = inputs
    ctx.save_for_backward(ell_cols, values, t_ell_cols, t_slots, x)


def _backward(ctx, grad):
    ell_cols, values, t_ell_cols, t_slots, x = ctx.saved_tensors
    grad_values = grad_x = None
    if ctx.needs_input_grad[1]:
        grad_values = torch.ops.sparqle.sddmm_bell(ell_cols, grad, x, values.shape[-1])
    if ctx.needs_input_grad[4]:
        if t_ell_cols is None:
            raise RuntimeError("sparqle::spmm_bell: the gradient of x needs A^T's block structure "
                               "(t_ell_cols, t_slots), which was not passed")
        grad_x = torch.ops.sparqle.spmm_bell_t(t_ell_cols, t_slots, values, grad, x.shape[1])
    return None, grad_values, None, None, grad_x, None


register_autograd(spmm_bell, _backward, _setup_context)
