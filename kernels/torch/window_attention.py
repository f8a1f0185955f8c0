"""Swin window attention and the window layout in plain PyTorch (see
kernels/triton/window_attention.py for the maths). fp16 and bf16 compute in fp32."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from sparqle.formats._checks import cdiv, compute_dtype


def _scores(q, k, bias, mask, mask_index, scale, cdt, table):
    """S [B_, heads, N, N] = q k^T * scale + bias[h] + mask[t(b)], t(b) = b % nW or
    mask_index[b]; bias plus mask read from ``table`` [T, 1 or heads, NP, NP] (its first N
    rows and columns, see the Triton launcher's score_table) when given."""
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)).mul_(scale)
    nb, heads, n, _ = s.shape
    if table is None:
        if bias is not None:
            s += bias.to(cdt)
        if mask is None:
            return s
        table = mask[:, None]
    table = table[:, :, :n, :n].to(cdt)
    if mask_index is not None:
        s += table[mask_index]
    else:  # windows are image-major: view them as [images, T, ...]
        s.view(nb // table.shape[0], table.shape[0], heads, n, n).add_(table[None])
    return s


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], mask_index: Optional[torch.Tensor],
                     scale: float, table: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B_, heads, N, d], lse [B_, heads, N]) with out = softmax(S) v and lse the
    logsumexp of S's rows (fp32, fp64 for fp64 inputs)."""
    cdt = compute_dtype(q.dtype)
    if q.shape[2] == 0:  # no tokens: S has no rows to reduce
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=cdt)
    s = _scores(q, k, bias, mask, mask_index, scale, cdt, table)
    p = torch.softmax(s, dim=-1)
    # P's largest entry is exp(max S - lse) >= 1 / N: lse = max S - log(max P), well
    # conditioned, and cheaper on the CPU than a separate logsumexp pass.
    lse = s.amax(dim=-1) - p.amax(dim=-1).log()
    return (p @ v.to(cdt)).to(q.dtype), lse


def window_attention_backward(dout, q, k, v, out, lse, bias, mask, mask_index, scale, table=None):
    """(dq, dk, dv, dbias): P = softmax(S) (= exp(S - lse); softmax is the faster way on the
    CPU, where exp of the masked scores' denormal results is 20x slower), dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K * scale, dK = dS^T Q * scale, dbias = sum
    over windows of dS (empty [0] without a bias)."""
    cdt = compute_dtype(q.dtype)
    p = torch.softmax(_scores(q, k, bias, mask, mask_index, scale, cdt, table), dim=-1)
    do = dout.to(cdt)
    dv = p.transpose(-1, -2) @ do
    delta = (do * out.to(cdt)).sum(-1, keepdim=True)
    ds = (do @ v.to(cdt).transpose(-1, -2)).sub_(delta).mul_(p)
    dq = (ds @ k.to(cdt)).mul_(scale)
    dk = (ds.transpose(-1, -2) @ q.to(cdt)).mul_(scale)
    dbias = ds.sum(0).to(bias.dtype) if bias is not None else q.new_empty((0,))
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias


def _padded_windows(x, wh, ww, sh, sw):
    """x [B, H, W, C] rolled by (-sh, -sw), zero-padded to multiples of the window, as
    [B, nW, N, C]."""
    b, h, w, c = x.shape
    x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else x
    x = F.pad(x, (0, 0, 0, -w % ww, 0, -h % wh))
    hp, wp = x.shape[1], x.shape[2]
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hp // wh) * (wp // ww), wh * ww, c)


def window_partition(x: torch.Tensor, wh: int, ww: int, sh: int, sw: int,
                     index: Optional[torch.Tensor]) -> torch.Tensor:
    """windows [B * K, N, C]: the windows of x [B, H, W, C] (rolled, padded), all nW per
    image (K = nW) or those ``index`` [B, K] names."""
    windows = _padded_windows(x, wh, ww, sh, sw)
    if index is not None:
        windows = windows[torch.arange(x.shape[0], device=x.device)[:, None], index]
    return _fresh(windows.flatten(0, 1), x)


def _fresh(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out`` contiguous and in new memory (without a pad, a roll or a gather, the layout
    of 1 x 1 windows is a view of ``src``; ops must not return views of their inputs)."""
    out = out.contiguous()
    return out.clone() if out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() else out


def window_merge(windows: torch.Tensor, x: torch.Tensor, wh: int, ww: int, sh: int, sw: int,
                 index: Optional[torch.Tensor]) -> torch.Tensor:
    """out [B, H, W, C]: x with the windows written back where window_partition took them
    (the padding dropped, the roll undone)."""
    b, h, w, c = x.shape
    hp, wp = cdiv(h, wh) * wh, cdiv(w, ww) * ww
    per_image = index.shape[1] if index is not None else (hp // wh) * (wp // ww)
    grid = windows.reshape(b, per_image, wh * ww, c)
    if index is not None:
        grid, windows = _padded_windows(x, wh, ww, sh, sw).clone(), grid
        grid[torch.arange(b, device=x.device)[:, None], index] = windows
    out = grid.view(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    out = out[:, :h, :w]
    return _fresh(torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if sh or sw else out, windows)
