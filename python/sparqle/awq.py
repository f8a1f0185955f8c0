"""Activation-aware weight quantization (AWQ, Lin et al. 2023) for int4, folded into the model.

A linear layer's output y = x W^T is unchanged when its input channels are rescaled,
W' = W diag(s), x' = x diag(1 / s). Rounding W' instead of W protects the channels whose
inputs are large: w_ij s_j is rounded on a grid whose step the group sets, so the error
seen at the output, x_j (w_ij - q_ij / s_j), shrinks on a salient channel when s_j > 1.
Int4Linear has no per-input-channel scale, so 1 / s must be folded into what feeds the
layer: a normalization's weight (and bias), or a previous linear's output rows when the
path between them is per channel linear. The pairs (FOLDS) are found from the module
structure:

- Hugging Face Llama (and Mistral, Qwen2: the same names): ``input_layernorm`` (RMSNorm)
  -> q/k/v_proj (one s for the three); ``self_attn.v_proj`` -> ``o_proj`` (attention is
  linear in V per channel; only when v_proj's outputs are o_proj's inputs one to one, not
  with grouped-query heads); ``post_attention_layernorm`` -> gate/up_proj; ``mlp.up_proj``
  -> ``down_proj`` (SwiGLU's product act(gate) * up is linear in up per channel).
- Hugging Face BERT: ``attention.self.value`` -> ``attention.output.dense`` only. BERT
  normalizes after the residual add (post-LN): the LayerNorm before q/k/v, and the one
  before the FFN's first linear, also feed the residual branch, so scaling their output
  would change the model; the FFN's output layer follows GELU. Those layers keep GPTQ
  (``convert`` warns, naming them).

The folds serve SmoothQuant's int8 scales as well (``apply_folds`` with
sparqle.quantize.smoothquant_scale: ``convert(model, "int8", calibrate=run,
method="smoothquant")``).

The scale (AutoAWQ's search): s = a^alpha / sqrt(max(a^alpha) min(a^alpha)), a = E|x_j|
over the calibration rows (InputStats.abs_mean, floored at 1e-4), alpha in AWQ_GRID; each
alpha is scored by the output error it leaves on the calibration inputs, summed over the
layers that share s, computed from H = X^T X alone:
sum_l trace(D_l H D_l^T), D_l = W_l - Q(W_l diag(s)) diag(1 / s), Q the group-wise min-max
int4 rounding. alpha = 0 (s = 1: plain min-max) is in the grid, so the chosen s never
leaves a larger error on the calibration inputs than min-max. The folded layers are then
rounded by GPTQ on the statistics of their rescaled inputs (AWQ then GPTQ).
"""
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn

from .calibrate import InputStats, output_error
from .formats._checks import cdiv
from .formats.int4 import _params, _quantize, check_group_size

AWQ_GRID = [i / 20 for i in range(20)]


@dataclass
class Fold:
    """One foldable pair: ``source`` (a LayerNorm / RMSNorm, or an nn.Linear) feeds the
    ``targets`` (nn.Linear, named) and nothing else, channel by channel, so that scaling its
    output channels by 1 / s and the targets' weight columns by s keeps the model."""
    source: nn.Module
    targets: Tuple[Tuple[str, nn.Linear], ...]


def _child(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


# (architecture, the block's attributes: source path, target paths): a block matches when
# every path exists (sources: norms or linears, targets: nn.Linear).
FOLDS = {
    "llama": (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("self_attn.v_proj", ("self_attn.o_proj",)),
              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
              ("mlp.up_proj", ("mlp.down_proj",))),
    "bert": (("attention.self.value", ("attention.output.dense",)),),
}
_MARKERS = {"llama": ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"),
            "bert": ("attention.self", "attention.output", "intermediate", "output")}


def folds(model: nn.Module) -> Iterator[Fold]:
    """The foldable pairs of ``model``'s blocks (FOLDS), in module order; a linear source
    only where its outputs are its target's inputs one to one."""
    for prefix, block in model.named_modules():
        for arch, markers in _MARKERS.items():
            if not all(_child(block, m) is not None for m in markers):
                continue
            for source_path, target_paths in FOLDS[arch]:
                source = _child(block, source_path)
                targets = [(f"{prefix}.{p}" if prefix else p, _child(block, p)) for p in target_paths]
                if source is None or not all(type(t) is nn.Linear for _, t in targets):
                    continue
                width = targets[0][1].in_features
                if isinstance(source, nn.Linear):
                    if type(source) is not nn.Linear or source.out_features != width:
                        continue
                elif getattr(source, "weight", None) is None or source.weight.shape != (width,):
                    continue
                yield Fold(source, tuple(targets))


def search_scale(weights: List[torch.Tensor], stats: InputStats, group_size: int = 128, *,
                 symmetric: bool = False) -> Tuple[torch.Tensor, float]:
    """(s [K] float32, alpha): the AWQ scale of the layers ``weights`` ([N_l, K] each) that
    share the inputs of ``stats`` (see the module doc)."""
    a = stats.abs_mean.to(weights[0].device, torch.float32).clamp(min=1e-4)
    best = None
    for alpha in AWQ_GRID:
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w in weights:
            w = w.detach().float()
            error += output_error(w, _minmax(w * s, group_size, symmetric) / s, stats.xtx)[0]
        if best is None or error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def _minmax(w: torch.Tensor, group_size: int, symmetric: bool) -> torch.Tensor:
    """``w`` [N, K] float32 rounded to the group-wise min-max int4 grid (as
    Int4Weight.from_float(w).dequantize() in float32), computed in place of packing."""
    n, k = w.shape
    width = k if group_size == -1 else check_group_size(group_size)
    g = cdiv(k, width)
    groups = torch.nn.functional.pad(w, (0, g * width - k)).view(n, g, width)
    scale, zero = _params(groups, symmetric, 1.0, torch.float32)
    return ((_quantize(groups, scale, zero) - zero) * scale).view(n, g * width)[:, :k]


def apply_folds(model: nn.Module, stats: Dict[int, InputStats],
                scale: Callable[[List[torch.Tensor], InputStats], torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Rescale ``model`` in place, before quantization: for each fold whose targets all have
    ``stats`` (by id), s = ``scale(the targets' weights, their shared stats)`` [K], multiply
    the targets' weight columns by s, divide the source's output channels (a norm's weight
    and bias, a linear's weight rows and bias) by s, and replace the targets' stats by those
    of their rescaled inputs. The float model computes the same function (up to float
    rounding). Returns id -> s of every rescaled layer."""
    scaled: Dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for fold in folds(model):
            ids = [id(t) for _, t in fold.targets]
            if not all(i in stats for i in ids) or any(i in scaled for i in ids):
                continue
            s = scale([t.weight for _, t in fold.targets], stats[ids[0]])
            for (_, target), i in zip(fold.targets, ids):
                target.weight.mul_(s.to(target.weight.dtype))
                stats[i] = stats[i].scaled(s)
                scaled[i] = s
            inv = (1 / s).to(fold.source.weight.dtype)
            fold.source.weight.mul_(inv[:, None] if fold.source.weight.dim() == 2 else inv)
            if getattr(fold.source, "bias", None) is not None:
                fold.source.bias.mul_(inv)
    return scaled


def fold_scales(model: nn.Module, stats: Dict[int, InputStats], group_size: int = 128, *,
                symmetric: bool = False) -> Dict[int, torch.Tensor]:
    """Apply AWQ to ``model`` in place, before quantization: ``apply_folds`` with the scale
    that search_scale finds. Returns id -> s of every rescaled layer; a target layer of
    ``stats`` that no fold reaches is left as it is, with a warning naming it."""
    scaled = apply_folds(model, stats, lambda weights, shared: search_scale(
        weights, shared, group_size, symmetric=symmetric)[0])
    names = {id(m): n for n, m in model.named_modules()}
    left = [names.get(i, "?") for i in stats if i not in scaled]
    if left:
        warnings.warn(f"convert(method='awq'): no foldable input scale for {len(left)} layers "
                      f"(sparqle.awq.FOLDS); they are quantized by GPTQ: {', '.join(left)}",
                      UserWarning, stacklevel=4)  # convert's caller
    return scaled
