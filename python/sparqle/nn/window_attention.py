"""Swin window attention on the fused kernel, and SparseViT window pruning of Swin blocks.

``WindowAttention.from_module(m)`` swaps the window attention of timm or the original Swin
code (qkv and proj Linear layers, num_heads, scale, relative_position_bias_table and
relative_position_index); ``SparseWindowBlock.from_block(block, keep_ratio)`` wraps a
SwinTransformerBlock (norm1, attn, norm2, mlp, window_size, shift_size) so that only the
windows with the largest activations are computed.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from sparqle.bindings.window_attention import reads_score_table
from sparqle.kernels import _capture
from sparqle.kernels._derived import derived

from ..formats._checks import cdiv, compute_dtype

from ..window import (MAX_HEAD_DIM, MAX_TOKENS, num_windows, score_table, window_attention, window_merge,
                      window_partition)
from ._load import CheckedLoad
from ._replace import Outcome, filtered, replace_modules

_SWIN_MASK = -100.0  # Swin's additive mask between tokens of different shifted regions
_ROOT_HINT = ("the module to convert: convert its parent, or use "
              "sparqle.nn.WindowAttention.from_module / SparseWindowBlock.from_block")
# Shift masks a SparseWindowBlock keeps, the most recently used: one per (resolution,
# device, dtype) met; a few cover training and inference at fixed sizes, and a stream of
# new resolutions no longer grows the cache without bound (120 held 340 MB).
MASK_CACHE_SIZE = 8


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def is_swin_window_attention(m: nn.Module) -> bool:
    """Whether ``m`` has the parts of Swin's WindowAttention that from_module reads: qkv and
    proj Linear layers, num_heads, and a relative position bias over exactly the window's
    tokens (BEiT-style attention, with a class token and separate q/v biases, is not one)."""
    if not (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
            and all(hasattr(m, a) for a in ("num_heads", "relative_position_bias_table",
                                            "relative_position_index", "window_size"))):
        return False
    wh, ww = _pair(m.window_size)
    return m.relative_position_index.shape == (wh * ww, wh * ww) and getattr(m, "q_bias", None) is None


def is_swin_block(m: nn.Module) -> bool:
    """Whether ``m`` has the parts of a SwinTransformerBlock that SparseWindowBlock reads."""
    return (all(hasattr(m, a) for a in ("norm1", "attn", "norm2", "mlp", "window_size", "shift_size"))
            and is_swin_window_attention(m.attn))


def _check_relative_position(table, index, num_heads: int, window_size) -> None:
    """A bias table [T, num_heads] and an index [N, N] of ints in [0, T) (N = wh * ww when
    the window size is known): checked when built and loaded, as the forward gathers
    table[index] without a bound check (a meta-device index has no values: they are checked
    when it is loaded)."""
    for name, t in (("relative_position_bias_table", table), ("relative_position_index", index)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not table.is_floating_point():
        raise TypeError(f"relative_position_bias_table must be floating point, got {table.dtype}")
    if table.shape[1] != num_heads:
        raise ValueError(f"relative_position_bias_table must be [entries, num_heads = {num_heads}], "
                         f"got {tuple(table.shape)}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"relative_position_index must hold integers, got {index.dtype}")
    n = index.shape[0]
    if index.shape[1] != n:
        raise ValueError(f"relative_position_index must be [N, N], got {tuple(index.shape)}")
    if window_size is not None and n != _pair(window_size)[0] * _pair(window_size)[1]:
        raise ValueError(f"relative_position_index must be [N, N] with N = {n} the tokens of the "
                         f"{_pair(window_size)} window, got {tuple(index.shape)}")
    if index.numel() and not index.is_meta and not bool(((index >= 0) & (index < table.shape[0])).all()):
        raise ValueError(f"relative_position_index holds values outside [0, {table.shape[0]}) (the rows "
                         f"of relative_position_bias_table): got [{int(index.min())}, {int(index.max())}]")


class WindowAttention(CheckedLoad):
    """Swin's window multi-head self-attention with relative position bias, on the fused
    :func:`sparqle.window_attention` kernel.

    ``forward(x, mask=None, mask_index=None)``: x [nW*B, N, C] (windows, image-major), mask
    [nW, N, N] additive or None -> [nW*B, N, C], as the original computes:
    proj(softmax(q k^T * scale + bias + mask) v), bias[h, i, j] =
    relative_position_bias_table[relative_position_index[i, j], h]. ``mask_index`` [nW*B]
    picks each window's mask when the windows are a subset (see SparseWindowBlock).
    Attention dropout is not supported in training (the module raises); proj_drop is kept.
    A load_state_dict is checked as the constructor checks the table and the index.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, relative_position_bias_table: torch.Tensor,
                 relative_position_index: torch.Tensor, scale: float, window_size=None,
                 proj_drop: Optional[nn.Module] = None, attn_drop: float = 0.0, index_persistent: bool = False):
        super().__init__()
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
            raise TypeError("qkv and proj must be nn.Linear layers")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int):
            raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}")
        if qkv.out_features % (3 * num_heads) or qkv.out_features == 0:
            raise ValueError(f"qkv.out_features = {qkv.out_features} is not 3 * num_heads * head_dim "
                             f"for num_heads = {num_heads} and a head_dim >= 1")
        if proj.in_features != qkv.out_features // 3:
            raise ValueError(f"proj.in_features = {proj.in_features} must be num_heads * head_dim = "
                             f"{qkv.out_features // 3}, the width of the attention's output")
        _check_relative_position(relative_position_bias_table, relative_position_index, num_heads, window_size)
        self.num_heads, self.scale, self.attn_drop = num_heads, float(scale), float(attn_drop)
        self.head_dim = qkv.out_features // (3 * num_heads)
        self.window_size = window_size
        self.qkv, self.proj = qkv, proj
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()
        self.relative_position_bias_table = (relative_position_bias_table
                                             if isinstance(relative_position_bias_table, nn.Parameter)
                                             else nn.Parameter(relative_position_bias_table.detach().clone()))
        self.register_buffer("relative_position_index", relative_position_index.detach().clone(),
                             persistent=index_persistent)

    @classmethod
    def from_module(cls, m: nn.Module) -> "WindowAttention":
        """The same attention on the fused kernel, sharing m's parameters (qkv, proj, table).
        The index buffer stays in state_dict() exactly when it is in m's."""
        if not is_swin_window_attention(m):
            raise TypeError(f"m must be a Swin WindowAttention (qkv, proj, num_heads, "
                            f"relative_position_bias_table, relative_position_index), got {type(m).__name__}")
        head_dim = m.qkv.out_features // (3 * m.num_heads)
        drop = getattr(m, "attn_drop", None)
        return cls(m.qkv, m.proj, m.num_heads, m.relative_position_bias_table, m.relative_position_index,
                   getattr(m, "scale", head_dim ** -0.5), getattr(m, "window_size", None),
                   getattr(m, "proj_drop", None), getattr(drop, "p", 0.0),
                   index_persistent="relative_position_index" in m.state_dict())

    def _check_state(self, tensors):
        _check_relative_position(tensors["relative_position_bias_table"],
                                 tensors.get("relative_position_index", self.relative_position_index),
                                 self.num_heads, self.window_size)

    def settings(self) -> Dict[str, object]:
        """What this module computes with beyond its tensors (plain types; a checkpoint
        keeps them, see sparqle.save)."""
        return {"format": "window_attention", "num_heads": self.num_heads, "scale": self.scale,
                "window_size": None if self.window_size is None else list(_pair(self.window_size)),
                "attn_drop": self.attn_drop,
                "index_persistent": "relative_position_index" not in self._non_persistent_buffers_set}

    def relative_position_bias(self) -> torch.Tensor:
        """bias [heads, N, N] gathered from the table."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def score_table(self, mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The bias plus ``mask`` as the kernels read it (:func:`sparqle.window.score_table`),
        kept while the bias table, the index and the mask are the same tensors, unmodified
        (sparqle.kernels._derived: by identity and version counter), at the same dtype and on
        the same device: made once per layer and resolution, and again after each optimizer
        step, load or ``.to()``. One masked and one unmasked table are kept per layer: a layer
        called with masks of several resolutions in turn makes its table each time. Writes
        through ``.data`` bypass the version counter, as they bypass autograd: they are not seen.
        forward passes it to the op only where the Triton kernels run (the torch path adds
        bias and mask as they are)."""
        table = self.relative_position_bias_table
        sources = [table, self.relative_position_index] + ([mask] if mask is not None else [])

        def make():  # derived makes it outside inference mode: a training call may save it later
            with torch.no_grad():
                return score_table(self.relative_position_bias(), mask, like)

        return derived(f"window_attention score table {compute_dtype(like.dtype)} on {like.device} from {table.dtype}"
                       f"{' masked' if mask is not None else ''}", make, *sources)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                mask_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training and self.attn_drop > 0:
            raise RuntimeError(f"attention dropout (p = {self.attn_drop}) is not supported by the fused "
                               f"kernel; set it to 0 to train")
        nb, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(nb, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        table = self.score_table(mask, q) if reads_score_table(q) else None
        out = window_attention(q, k, v, bias=self.relative_position_bias(), mask=mask, mask_index=mask_index,
                               scale=self.scale, table=table)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(nb, n, -1)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}"


def shift_mask(hp: int, wp: int, window_size, shift_size, device=None, dtype=torch.float32) -> torch.Tensor:
    """Swin's shifted-window mask [nW, N, N] for a padded Hp x Wp map: 0 between tokens of
    the same region of the rolled map, -100 between tokens of different regions."""
    (wh, ww), (sh, sw) = _pair(window_size), _pair(shift_size)
    regions = torch.zeros((1, hp, wp, 1), dtype=dtype, device=device)
    count = 0
    for rows in ((0, -wh), (-wh, -sh), (-sh, None)):
        for cols in ((0, -ww), (-ww, -sw), (-sw, None)):
            regions[:, rows[0]:rows[1], cols[0]:cols[1], :] = count
            count += 1
    ids = window_partition(regions, (wh, ww)).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, torch.full_like(diff, _SWIN_MASK), torch.zeros_like(diff))


def _check_keep_ratio(keep_ratio) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise TypeError(f"keep_ratio must be a float, got {type(keep_ratio).__name__}")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


class SparseWindowBlock(nn.Module):
    """A Swin block that computes only the windows with the largest activations (SparseViT).

    Per image, the score of each (shifted) window is the L2 norm over its tokens of each
    token's mean |x| over channels, on the block's input; the ``max(1, round(keep_ratio * nW))``
    windows with the largest scores go through norm1 -> window attention -> residual ->
    norm2 -> MLP -> residual exactly as in the dense block (all per token but the attention,
    which is per window), and every other token passes through unchanged. keep_ratio = 1
    computes the dense block. x is [B, H, W, C] (timm >= 0.9) or [B, H*W, C] (the original
    Swin code, with the block's input_resolution). Stochastic depth, when training with
    drop_path > 0, drops per kept window instead of per image.
    """

    def __init__(self, norm1: nn.Module, attn: WindowAttention, norm2: nn.Module, mlp: nn.Module,
                 window_size, shift_size, keep_ratio: float, drop_path1: Optional[nn.Module] = None,
                 drop_path2: Optional[nn.Module] = None, input_resolution=None):
        super().__init__()
        if not isinstance(attn, WindowAttention):
            raise TypeError(f"attn must be a sparqle.nn.WindowAttention, got {type(attn).__name__}")
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.drop_path1 = drop_path1 if drop_path1 is not None else nn.Identity()
        self.drop_path2 = drop_path2 if drop_path2 is not None else nn.Identity()
        self.window_size, self.shift_size = _pair(window_size), _pair(shift_size)
        self.input_resolution = input_resolution
        self.keep_ratio = _check_keep_ratio(keep_ratio)
        self._masks: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    @classmethod
    def from_block(cls, block: nn.Module, keep_ratio: float) -> "SparseWindowBlock":
        """Wrap ``block`` (its modules shared, its attention on the fused kernel)."""
        if not is_swin_block(block):
            raise TypeError(f"block must be a SwinTransformerBlock (norm1, attn, norm2, mlp, window_size, "
                            f"shift_size), got {type(block).__name__}")
        attn = block.attn if isinstance(block.attn, WindowAttention) else WindowAttention.from_module(block.attn)
        drop = getattr(block, "drop_path", None)
        return cls(block.norm1, attn, block.norm2, block.mlp, block.window_size, block.shift_size, keep_ratio,
                   getattr(block, "drop_path1", drop), getattr(block, "drop_path2", drop),
                   getattr(block, "input_resolution", None))

    def settings(self) -> Dict[str, object]:
        """What this block computes with beyond its modules (plain types; a checkpoint keeps
        them, see sparqle.save)."""
        return {"format": "sparse_windows", "keep_ratio": self.keep_ratio,
                "window_size": list(self.window_size), "shift_size": list(self.shift_size),
                "input_resolution": None if self.input_resolution is None else list(_pair(self.input_resolution))}

    def _mask(self, h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        """The shift mask for an h x w map, from an LRU cache of the MASK_CACHE_SIZE most
        recently used, per (h, w, device, dtype); one made during CUDA-graph capture is not
        kept (it would hold its values only once the graph replays)."""
        key = (h, w, x.device, x.dtype)
        mask = self._masks.get(key)
        if mask is not None:
            self._masks.move_to_end(key)
            return mask
        (wh, ww) = self.window_size
        with torch.inference_mode(False):  # a plain tensor: a training call saves it for backward
            mask = shift_mask(cdiv(h, wh) * wh, cdiv(w, ww) * ww, self.window_size,
                              self.shift_size, x.device, x.dtype)
        if not _capture.capturing():
            self._masks[key] = mask
            if len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            if self.input_resolution is None:
                raise ValueError("x is [B, L, C] but the block has no input_resolution; pass [B, H, W, C]")
            h, w = _pair(self.input_resolution)
            return self.forward(x.view(x.shape[0], h, w, x.shape[2])).view(x.shape)
        if x.dim() != 4:
            raise ValueError(f"x must be [B, H, W, C] or [B, H*W, C], got shape {tuple(x.shape)}")
        b, h, w, _ = x.shape
        ws, shift = self.window_size, self.shift_size
        total = num_windows(h, w, ws)
        keep = max(1, round(self.keep_ratio * total))
        with torch.no_grad():
            score = window_partition(x.abs().mean(-1, keepdim=True), ws, shift).view(b, total, -1).norm(dim=-1)
            index = score.topk(keep, dim=1).indices.sort(dim=1).values
        windows = window_partition(x, ws, shift, index)
        y = self.norm1(windows)
        if h % ws[0] or w % ws[1]:  # padding tokens are zero after norm1 in the dense block
            real = window_partition(x.new_ones((b, h, w, 1)), ws, shift, index)
            y = y * real
        mask, mask_index = (self._mask(h, w, x), index.flatten()) if any(shift) else (None, None)
        y = windows + self.drop_path1(self.attn(y, mask, mask_index))
        y = y + self.drop_path2(self.mlp(self.norm2(y)))
        return window_merge(y, x, ws, shift, index)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, keep_ratio={self.keep_ratio}"


def _attention_refusal(m: nn.Module) -> Optional[str]:
    """Why the fused kernel cannot serve Swin attention ``m`` (None when it can): it takes
    windows of at most MAX_TOKENS tokens and head dims of at most MAX_HEAD_DIM."""
    tokens = m.relative_position_index.shape[0]
    head_dim = m.qkv.out_features // (3 * m.num_heads) if m.num_heads else 0
    if tokens > MAX_TOKENS:
        return f"its windows hold {tokens} tokens; the fused kernel takes at most {MAX_TOKENS}"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"its head dim is {head_dim}; the fused kernel takes 1 to {MAX_HEAD_DIM}"
    return None


def convert_window_attention(model: nn.Module, filter=None) -> List[Outcome]:
    """Swap every Swin WindowAttention of ``model`` (for which ``filter(name, module)``, and
    that the fused kernel can serve) for :class:`WindowAttention`, in place; one
    :class:`~sparqle.nn._replace.Outcome` per Swin WindowAttention."""
    return replace_modules(model, lambda m: is_swin_window_attention(m) and not isinstance(m, WindowAttention),
                           filtered(filter, "window_attention", _attention_refusal),
                           lambda name, m, setting: WindowAttention.from_module(m), root_hint=_ROOT_HINT,
                           copies_parameters=False)


def convert_sparse_windows(model: nn.Module, filter=None,
                           keep_ratio: Union[float, Sequence[float]] = 0.5) -> List[Outcome]:
    """Wrap every Swin block of ``model`` (for which ``filter(name, module)``, and whose
    attention the fused kernel can serve) in :class:`SparseWindowBlock`, in place; one
    :class:`~sparqle.nn._replace.Outcome` per Swin block. ``keep_ratio`` is a float, or one
    float per stage (the converted blocks' parent containers, in model order)."""
    is_target = lambda m: is_swin_block(m) and not isinstance(m, SparseWindowBlock)  # noqa: E731
    decide = filtered(filter, "sparse_windows", lambda m: _attention_refusal(m.attn))
    stages = list(dict.fromkeys(n.rpartition(".")[0] for n, m in model.named_modules()
                                if is_target(m) and decide(n, m)[1] is None))
    if isinstance(keep_ratio, (list, tuple)):
        if len(keep_ratio) != len(stages):
            raise ValueError(f"keep_ratio has {len(keep_ratio)} entries but the model has {len(stages)} "
                             f"stages of Swin blocks")
        ratios = {stage: _check_keep_ratio(r) for stage, r in zip(stages, keep_ratio)}
    else:
        ratios = dict.fromkeys(stages, _check_keep_ratio(keep_ratio))
    return replace_modules(model, is_target, decide,
                           lambda name, m, setting: SparseWindowBlock.from_block(m, ratios[name.rpartition(".")[0]]),
                           root_hint=_ROOT_HINT, copies_parameters=False)
