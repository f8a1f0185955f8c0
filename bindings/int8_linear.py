"""sparqle::int8_linear (W8A8 or W8A16 linear) and sparqle::int8_quantize_rows.

int8_linear(x, qweight, scales, bias, quantize_activation) -> y [M, N]
    = x @ (q_w * scale_w)^T + bias, x quantized per row to int8 first when
    quantize_activation (W8A8), else used as is (W8A16).
int8_quantize_rows(x, static_scale) -> (q int8 [M, K], scale [M] fp32, fp64 for fp64 x)

Gradients (straight through): dx = dy @ (q_w * scale_w), dbias = sum of dy; the quantized
weight is frozen.
"""
from typing import Optional, Tuple

import torch

from sparqle.formats._checks import compute_dtype

from ._autograd import register_row_scaled_autograd
from ._backend import FLOATS, launch
from ._weight_op import define_weight_op

DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS}


def int8_linear_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        bias: Optional[torch.Tensor], quantize_activation: bool) -> torch.Tensor:
    return launch("int8_linear", "int8_linear", DTYPES, x, x, qweight, scales, bias, quantize_activation)


int8_linear = define_weight_op(int8_linear_forward, lambda qweight, *_: qweight.shape[0])


@torch.library.custom_op("sparqle::int8_quantize_rows", mutates_args=())
def int8_quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch("int8_linear", "quantize_rows", DTYPES, x, x, static_scale)


@int8_quantize_rows.register_fake
def _(x, static_scale):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype)))


register_row_scaled_autograd(int8_linear)
