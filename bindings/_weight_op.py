"""How a weight op is defined: its implementation ``<name>_forward(x, *weight_tensors, bias,
*static) -> y [rows, out]`` (the contract of docs/adding-an-op.md) becomes the custom op
``sparqle::<name>``, with the fake that gives y's shape to compile and meta tensors.

The binding keeps ``<name>_forward`` public: it is what the dispatcher runs, and what
sparqle.registry calls directly where the dispatcher would add nothing (WeightOp.linear).
"""
from typing import Callable

import torch


def define_weight_op(forward: Callable[..., torch.Tensor], out_features: Callable[..., int]):
    """``sparqle::<name>`` for ``forward`` named ``<name>_forward``; ``out_features(*args)``
    gives y's columns from the arguments after x (for example the weight's rows)."""
    name = forward.__name__.removesuffix("_forward")
    op = torch.library.custom_op(f"sparqle::{name}", mutates_args=())(forward)

    @op.register_fake
    def _(x, *args):
        return x.new_empty((x.shape[0], out_features(*args)))

    return op
