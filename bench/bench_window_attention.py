"""Swin window attention, out = softmax(q k^T * scale + bias + mask) v on [B_, heads, N, d]
windows, at the stage shapes of Swin-T (224 px, window 7: N = 49), Swin-B (384 px,
window 12: N = 144) and SwinV2-B (256 px, window 16: N = 256; its first three stages, as
the fourth's 8 x 8 map shrinks the window to 8), head dim 32, with the shift mask where a stage has more than one
window; ``mode`` forward, or forward + backward (gradients of q, k, v and the bias).

sparqle is given the score table (bias plus mask, padded) made once per case, as a
sparqle.nn.WindowAttention layer keeps it across calls.

Baselines: Swin's eager attention (matmul, + bias, + mask, softmax, matmul), PyTorch's
``scaled_dot_product_attention`` with bias + mask summed into one [B_, heads, N, N]
additive mask as timm builds it, and FlexAttention (compiled ``flex_attention``) with the
score_mod score + bias[h, i, j] + mask[b % nW, i, j] (every window is dense, so no block
mask is needed). FlexAttention runs on a GPU; on the CPU it works on this torch but its
inductor compile takes about a minute per shape on a 2-core machine, so the CPU grid
leaves it out.

FLOPs: 4 B_ heads N^2 d forward, 14 B_ heads N^2 d forward + backward (7 products).
Bytes: q, k, v, out (and dout, dq, dk, dv) once, the bias and the mask once.
"""
import itertools
from typing import Iterator, List

import torch
import torch.nn.functional as F

import sparqle
from sparqle.nn.window_attention import shift_mask

from .harness import Case, Impl, device, inputs, no_grad, plot_speedups

OP = "window_attention"
KEYS = ("model", "stage", "batch", "heads", "n", "dtype", "mode")
_ON_GPU = device().type == "cuda"
IMPLS = ("sparqle", "eager", "sdpa") + (("flex",) if _ON_GPU else ())
HEAD_DIM = 32
# model: (window, stage grid sides, heads per stage)
MODELS = {"swin-t": (7, (56, 28, 14, 7), (3, 6, 12, 24)),
          "swin-b": (12, (96, 48, 24, 12), (4, 8, 16, 32)),
          "swinv2-b": (16, (64, 32, 16), (4, 8, 16))}


def grid(quick: bool) -> Iterator[dict]:
    if _ON_GPU:
        dtypes, batches, stages = ("float16", "bfloat16"), (32, 128), range(4)
    else:
        dtypes, batches, stages = ("float32",), (2,), (2,) if quick else (1, 2, 3)
    models = ("swin-t",) if quick else tuple(MODELS)
    modes = ("fwd",) if quick and not _ON_GPU else ("fwd", "fwd+bwd")
    for model, stage, batch, dtype, mode in itertools.product(models, stages, batches, dtypes, modes):
        window, sides, heads = MODELS[model]
        if stage >= len(sides):
            continue
        yield {"model": model, "stage": stage + 1, "batch": batch, "heads": heads[stage],
               "n": window * window, "dtype": dtype, "mode": mode}


def eager(q, k, v, bias, mask, scale):
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    nw, n = mask.shape[0], q.shape[2]
    attn = (attn.view(-1, nw, q.shape[1], n, n) + mask[None, :, None]).view(q.shape[0], q.shape[1], n, n)
    return attn.softmax(-1) @ v


def sdpa(q, k, v, bias, mask, scale):
    nw, heads, n = mask.shape[0], q.shape[1], q.shape[2]
    attn_mask = bias + mask.view(1, nw, 1, n, n).expand(q.shape[0] // nw, -1, heads, -1, -1).reshape(-1, heads, n, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


_flex = None


def flex(q, k, v, bias, mask, scale):
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex = torch.compile(flex_attention, dynamic=False)
    nw = mask.shape[0]

    def score_mod(score, b, h, i, j):
        return score + bias[h, i, j] + mask[b % nw, i, j]
    return _flex(q, k, v, score_mod=score_mod, scale=scale)


def _timed(fn, backward: bool):
    """fn(q, k, v, bias) under no_grad, or with the gradients of q, k, v and bias."""
    if not backward:
        return lambda q, k, v, bias, dout: no_grad(lambda: fn(q, k, v, bias))

    def make(q, k, v, bias, dout):
        def call():
            out = fn(q, k, v, bias)
            return torch.autograd.grad(out, (q, k, v, bias), dout)
        return call
    return make


def make_case(model: str, stage: int, batch: int, heads: int, n: int, dtype: str, mode: str) -> Case:
    window, sides, _ = MODELS[model]
    side = sides[stage - 1]
    dev, dt = device(), getattr(torch, dtype)
    nw = (side // window) ** 2
    nb = batch * nw
    backward = mode == "fwd+bwd"
    scale = HEAD_DIM ** -0.5
    mask = shift_mask(side, side, window, window // 2, dev, dt) if nw > 1 else torch.zeros(1, n, n, dtype=dt, device=dev)
    bias = torch.randn(heads, n, n, dtype=dt, device=dev, requires_grad=backward)
    qkv = inputs(lambda: [torch.randn(nb, heads, n, HEAD_DIM, dtype=dt, device=dev, requires_grad=backward)
                          for _ in range(4)])
    # bias plus mask as the kernels read them, made once as sparqle.nn.WindowAttention keeps it
    table = sparqle.window.score_table(bias.detach(), mask, bias)
    impls = {"sparqle": lambda q, k, v, b: sparqle.window_attention(q, k, v, bias=b, mask=mask, scale=scale,
                                                                    table=table),
             "eager": lambda q, k, v, b: eager(q, k, v, b, mask, scale),
             "sdpa": lambda q, k, v, b: sdpa(q, k, v, b, mask, scale),
             "flex": lambda q, k, v, b: flex(q, k, v, b, mask, scale)}
    size = dt.itemsize
    tensor = nb * heads * n * HEAD_DIM * size
    moved = (12 if backward else 4) * tensor + (2 if backward else 1) * heads * n * n * size + nw * n * n * size
    flops = (14.0 if backward else 4.0) * nb * heads * n * n * HEAD_DIM

    def impl(name):
        def make(i):
            q, k, v, dout = qkv(i)
            return _timed(impls[name], backward)(q, k, v, bias, dout.detach())
        return Impl(name, make, moved)
    return Case(OP, {"model": model, "stage": stage, "batch": batch, "heads": heads, "n": n,
                     "dtype": dtype, "mode": mode}, flops=flops, input_bytes=4 * tensor,
                impls=[impl(name) for name in IMPLS])


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("model", "batch", "dtype", "mode"), "Swin window attention", x_key="stage")
