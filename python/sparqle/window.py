"""Swin window attention and the window layout: ``window_attention``, ``window_partition``,
``window_merge``. Arguments are checked here, with errors that name them."""
from typing import Optional, Sequence, Tuple, Union

import torch

from sparqle.bindings.window_attention import score_table as _score_table

from .formats._checks import cdiv, compute_dtype

MAX_TOKENS = 256
MAX_HEAD_DIM = 128

_Pair = Union[int, Sequence[int]]


def _tensor(name: str, t, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _integers(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")


def _additive(name: str, t, shape, q: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    _tensor(name, t, 3)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if (shape[0] is not None and t.shape[0] != shape[0]) or t.shape[1:] != shape[1:]:
        want = "[nW" if shape[0] is None else f"[{shape[0]}"
        raise ValueError(f"{name} must have shape {want}, {shape[1]}, {shape[2]}], got {tuple(t.shape)}")
    _same_device(name, t, q, "q")
    return t


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     mask_index: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [B_, heads, N, d] = softmax(q k^T * scale + bias[h] + mask[m(b)]) v, fused.

    q, k, v [B_, heads, N, d]: B_ windows of N <= 256 tokens, d <= 128. ``bias``
    [heads, N, N] is shared by all windows (Swin's relative position bias, gathered from its
    table; differentiable). ``mask`` [nW, N, N] is additive (0 / -100 in Swin); window b
    uses ``mask[b % nW]`` (Swin's layout, image-major), or ``mask[mask_index[b]]`` when
    ``mask_index`` [B_] is given. ``scale`` defaults to d^-0.5. Differentiable in q, k, v and
    bias. ``table``: :func:`score_table` (bias, mask) when the caller keeps it (a layer whose
    bias is a new tensor on every call, as sparqle.nn.WindowAttention's); without it the
    Triton kernels' table is made and kept while bias and mask are the same tensors,
    unmodified. It must have been made from these bias and mask: only its shape, dtype and
    device are checked.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, 4)
    if not q.is_floating_point():
        raise TypeError(f"q must be floating point, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        _same_device(name, t, q, "q")
    nb, heads, n, d = q.shape
    if n > MAX_TOKENS:
        raise ValueError(f"q has N = {n} tokens per window; at most {MAX_TOKENS} are supported")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim d = {d}; 1 <= d <= {MAX_HEAD_DIM} is supported")
    bias = _additive("bias", bias, (heads, n, n), q)
    mask = _additive("mask", mask, (None, n, n), q)
    if mask is not None and mask.shape[0] == 0:
        raise ValueError("mask must hold at least one window's mask, got shape (0, ...)")
    if mask_index is not None:
        if mask is None:
            raise ValueError("mask_index needs a mask")
        _tensor("mask_index", mask_index, 1)
        _integers("mask_index", mask_index)
        if mask_index.shape[0] != nb:
            raise ValueError(f"mask_index must have q.shape[0] = {nb} entries, got {mask_index.shape[0]}")
        _same_device("mask_index", mask_index, q, "q")
    elif mask is not None and nb % mask.shape[0]:
        raise ValueError(f"q.shape[0] = {nb} windows is not a multiple of mask.shape[0] = "
                         f"{mask.shape[0]}; pass mask_index to choose each window's mask")
    if scale is None:
        scale = d ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if table is not None and not isinstance(table, torch.Tensor):
        raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
    return torch.ops.sparqle.window_attention(q, k, v, bias, mask, mask_index, float(scale), table)[0]


def score_table(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The score table window_attention's kernels read, for queries like ``like`` (its dtype
    and device): bias [heads, N, N] plus mask [nW, N, N] as [nW or 1, heads or 1, NP, NP] in
    fp32 (fp64 for fp64 queries), rows and columns padded to NP (the key block for N <= 64,
    else a multiple of 16: 128-bit loads, without a mask or with one constant over 16
    columns), -inf in the padded keys. window_attention gives the table no gradient: the
    bias passed beside it carries it."""
    if not isinstance(like, torch.Tensor) or not like.is_floating_point():
        raise TypeError(f"like must be a floating-point tensor (the queries), got "
                        f"{like.dtype if isinstance(like, torch.Tensor) else type(like).__name__}")
    if bias is None and mask is None:
        raise ValueError("score_table needs a bias or a mask (or both), got neither")
    n = _tensor("bias" if bias is not None else "mask", bias if bias is not None else mask, 3).shape[-1]
    bias = _additive("bias", bias, (None if bias is None else bias.shape[0], n, n), like)
    mask = _additive("mask", mask, (None, n, n), like)
    return _score_table(bias, mask, compute_dtype(like.dtype))


def _pair(name: str, value: _Pair) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def num_windows(h: int, w: int, window_size: _Pair) -> int:
    """Windows per image of an H x W map, padded to multiples of the window."""
    wh, ww = _pair("window_size", window_size)
    return cdiv(h, wh) * cdiv(w, ww)


def _layout(x, window_size: _Pair, shift: _Pair, index) -> tuple:
    _tensor("x", x, 4)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    wh, ww = _pair("window_size", window_size)
    sh, sw = _pair("shift", shift)
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size must be positive, got {(wh, ww)}")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift must satisfy 0 <= shift < window_size = {(wh, ww)}, got {(sh, sw)}")
    if index is not None:
        _tensor("index", index, 2)
        _integers("index", index)
        if index.shape[0] != x.shape[0]:
            raise ValueError(f"index must have x.shape[0] = {x.shape[0]} rows, got shape {tuple(index.shape)}")
        _same_device("index", index, x, "x")
    return wh, ww, sh, sw, index


def window_partition(x: torch.Tensor, window_size: _Pair, shift: _Pair = (0, 0),
                     index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """windows [B * K, wh * ww, C] from x [B, H, W, C]: x rolled by (-shift) over (H, W)
    (Swin's cyclic shift), zero-padded at the bottom and right to multiples of the window,
    and cut into its nW windows, row-major (window r of image i is row i * nW + r); with
    ``index`` [B, K] (distinct window ids per image) only those K windows per image, in
    that order. Differentiable."""
    wh, ww, sh, sw, index = _layout(x, window_size, shift, index)
    return torch.ops.sparqle.window_partition(x, wh, ww, sh, sw, index)


def window_merge(windows: torch.Tensor, x: torch.Tensor, window_size: _Pair, shift: _Pair = (0, 0),
                 index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [B, H, W, C]: the inverse of :func:`window_partition`: a copy of x with the
    windows [B * K, wh * ww, C] written back where partition took them (padding dropped,
    roll undone); pixels of windows not in ``index`` keep x's values. Differentiable in
    windows and x."""
    wh, ww, sh, sw, index = _layout(x, window_size, shift, index)
    _tensor("windows", windows, 3)
    per_image = index.shape[1] if index is not None else num_windows(x.shape[1], x.shape[2], (wh, ww))
    expected = (x.shape[0] * per_image, wh * ww, x.shape[3])
    if tuple(windows.shape) != expected:
        raise ValueError(f"windows must have shape {expected}, got {tuple(windows.shape)}")
    if windows.dtype != x.dtype:
        raise TypeError(f"windows has dtype {windows.dtype} but x has {x.dtype}; they must match")
    _same_device("windows", windows, x, "x")
    return torch.ops.sparqle.window_merge(windows, x, wh, ww, sh, sw, index)
