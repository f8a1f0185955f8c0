"""SparseViT window pruning: a Swin block (timm's SwinTransformerBlock, shifted windows,
x [B, H, W, C]) wrapped in ``sparqle.nn.SparseWindowBlock`` at keep ratios 0.25 / 0.5 /
0.75 / 1.0 against the dense block, forward (inference). The dense block is timm's code
(bench/swin_reference.py) with its eager attention.

Shapes: Swin-T stage 1 (56 x 56, C 96, 3 heads) and stage 2 (28 x 28, C 192, 6 heads),
window 7, on a GPU at batch 32 in fp16 and bf16; on the CPU a stage 2 block at batch 2 in
fp32 (quick: keep ratios 0.25 and 1.0).

FLOPs: the dense block's (qkv, proj, MLP and attention products) times the keep ratio.
Bytes: x in and out.
"""
import itertools
from typing import Iterator, List

import torch

from sparqle.nn import SparseWindowBlock

from . import swin_reference
from .harness import Case, Impl, device, inputs, no_grad, plot_speedups

OP = "sparse_windows"
KEYS = ("stage", "batch", "side", "dim", "keep_ratio", "dtype")
IMPLS = ("sparqle", "dense")
KEEP_RATIOS = (0.25, 0.5, 0.75, 1.0)
# stage: (map side, channels, heads) of Swin-T at 224 px
STAGES = {1: (56, 96, 3), 2: (28, 192, 6)}
WINDOW = 7


def grid(quick: bool) -> Iterator[dict]:
    if device().type == "cuda":
        stages, batch, dtypes, ratios = (1, 2), 32, ("float16", "bfloat16"), KEEP_RATIOS
    else:
        stages, batch, dtypes = (2,), 2, ("float32",)
        ratios = (0.25, 1.0) if quick else KEEP_RATIOS
    for stage, dtype, keep in itertools.product(stages, dtypes, ratios):
        side, dim, _ = STAGES[stage]
        yield {"stage": stage, "batch": batch, "side": side, "dim": dim, "keep_ratio": keep, "dtype": dtype}


def make_case(stage: int, batch: int, side: int, dim: int, keep_ratio: float, dtype: str) -> Case:
    dev, dt = device(), getattr(torch, dtype)
    heads = STAGES[stage][2]
    torch.manual_seed(0)
    dense = swin_reference.SwinTransformerBlock(dim, (side, side), heads, WINDOW, WINDOW // 2).to(dev, dt).eval()
    sparse = SparseWindowBlock.from_block(swin_reference.SwinTransformerBlock(
        dim, (side, side), heads, WINDOW, WINDOW // 2).to(dev, dt).eval(), keep_ratio)
    x = inputs(lambda: torch.randn(batch, side, side, dim, device=dev, dtype=dt))
    tokens = batch * side * side
    flops = keep_ratio * tokens * (24.0 * dim * dim + 4.0 * WINDOW * WINDOW * dim)
    moved = 2.0 * tokens * dim * dt.itemsize
    return Case(OP, {"stage": stage, "batch": batch, "side": side, "dim": dim, "keep_ratio": keep_ratio,
                     "dtype": dtype}, flops=flops, input_bytes=moved / 2, impls=[
                    Impl("sparqle", lambda i: no_grad(lambda xi=x(i): sparse(xi)), moved),
                    Impl("dense", lambda i: no_grad(lambda xi=x(i): dense(xi)), moved),
                ])


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("stage", "dtype"), "SparseViT Swin block", x_key="keep_ratio")
