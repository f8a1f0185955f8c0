"""Channel permutation for N:M sparsity (after Pool and Yu, "Channel Permutations for N:M
Sparsity", 2021): a function-preserving reordering of a layer's input channels, so that the
weights that matter fall in different groups of m.

An N:M layer keeps n of every m consecutive weights of a row, so which input channels share
a group decides what can be kept together: two important channels in one group of 2:4
cost two important weights per row, the same two in different groups cost none. Where the
channels a layer reads are the outputs of other linear layers, one to one and through a
per-channel map, they may be reordered at no cost: permuting the sources' output rows (and
biases) by p and the target's input columns by p computes the same function. The pairs
(PAIRS), found from the module structure like sparqle.awq's folds:

- Hugging Face BERT: ``intermediate.dense`` -> ``output.dense`` (GELU acts per channel);
  ``attention.self.value`` -> ``attention.output.dense``, within each head (a head's
  context channels are its value channels; reordering across heads would change which
  head attends to what).
- Hugging Face Llama (Mistral, Qwen2): ``mlp.gate_proj``, ``mlp.up_proj`` ->
  ``mlp.down_proj`` (act(gate) * up per channel: both sources take p); ``self_attn.v_proj``
  -> ``self_attn.o_proj`` within each head, when v_proj's outputs are o_proj's inputs one
  to one (not with grouped-query heads).

The permutation maximizes the score that the pattern keeps: for the target's weight W
[N, K], with S = |W| diag(|x|) (|x_j| the l2 norm of input channel j over calibration
inputs: Wanda's score; |W| without them), the sum over rows and groups of the n largest
S in each group of m. The search is a hill climb over swaps of two channels in different
groups (within one head where heads bind), SWAPS_PER_CHANNEL * K tries from a fixed seed,
each kept when it raises the kept score of the two groups it touches: the score never
falls, and the result is deterministic. A criterion that refits the kept weights
(sparsegpt, admm) then works on the permuted layer; the gain is measured in
docs/calibration.md.
"""
import numbers
import random
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .awq import _MARKERS, _child
from .calibrate import collect
from .formats.nm import check_pattern

# Swap tries per input channel of the target (all-MiniLM-L6-v2's 1536-channel layers:
# 24576 tries, about 1300 kept).
SWAPS_PER_CHANNEL = 16

# (architecture: (source paths, target path, the path of the head width that binds the
# channels, or None)), under the block markers of sparqle.awq, in the order a block runs them.
PAIRS = {
    "bert": ((("attention.self.value",), "attention.output.dense", "attention.self.attention_head_size"),
             (("intermediate.dense",), "output.dense", None)),
    "llama": ((("self_attn.v_proj",), "self_attn.o_proj", "self_attn.head_dim"),
              (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", None)),
}


@dataclass
class Permuted:
    """One permuted pair: the target's name, the sources' names, the kept score before and
    after (the module doc) and the permutation p (new channel j is old channel p[j])."""
    target: str
    sources: Tuple[str, ...]
    kept_before: float
    kept_after: float
    permutation: torch.Tensor


def permute_channels(model: nn.Module, n: int = 2, m: int = 4, *,
                     calibrate: Optional[Callable[[nn.Module], object]] = None,
                     filter: Optional[Callable[[str, nn.Module], bool]] = None, seed: int = 0) -> List[Permuted]:
    """Reorder, in place, the input channels of every target of PAIRS in ``model`` whose
    name ``filter`` accepts (and its sources' output channels), so that an n:m pattern keeps
    more of what matters (the module doc); the model computes the same function, to float
    rounding. ``calibrate=run`` (as for convert) scores the channels by their inputs' norms
    over ``run(model)``; without it, by |W|. Call it on the float model, then convert::

        sparqle.permutation.permute_channels(model, 4, 8, calibrate=run)
        sparqle.convert(model, "4:8", calibrate=run, method="admm", sequential=True)

    Returns what was permuted. A pair whose layers are not all nn.Linear (converted
    already), whose width is not a multiple of m (of the head width, where heads bind), or
    whose target ``calibrate`` never reached, is left as it is; a model with no pair to
    permute warns."""
    check_pattern(n, m)
    if calibrate is not None and not callable(calibrate):
        raise TypeError(f"calibrate must be a callable run(model), got {type(calibrate).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    pairs = [pair for pair in _pairs(model, m) if filter is None or filter(pair[0], pair[1])]
    stats = {}
    if calibrate is not None and pairs:
        stats = collect(model, calibrate, {id(target): (name, target) for name, target, _, _ in pairs})
    rng = random.Random(seed)
    done: List[Permuted] = []
    with torch.no_grad():
        for name, target, sources, head in pairs:
            if calibrate is not None and id(target) not in stats:
                continue
            score = target.weight.detach().abs().float()
            if calibrate is not None:
                score = score * stats[id(target)].x_norm.to(score.device)
            before = _kept(score, n, m)
            p = _search(score, n, m, head, rng)
            after = _kept(score[:, p], n, m)
            target.weight.copy_(target.weight[:, p])
            for _, source in sources:
                source.weight.copy_(source.weight[p])
                if source.bias is not None:
                    source.bias.copy_(source.bias[p])
            done.append(Permuted(name, tuple(s for s, _ in sources), before, after, p))
    if not done:
        warnings.warn("permute_channels: no pair of layers to permute (sparqle.permutation.PAIRS)", stacklevel=2)
    return done


def _pairs(model: nn.Module, m: int) -> List[Tuple[str, nn.Linear, List[Tuple[str, nn.Linear]], Optional[int]]]:
    """(target name, target, [(source name, source)], head width or None) of every pair of
    PAIRS in ``model`` that can be permuted for groups of ``m``, in module order."""
    found = []
    for prefix, block in model.named_modules():
        for arch, markers in _MARKERS.items():
            if not all(_child(block, marker) is not None for marker in markers):
                continue
            for source_paths, target_path, head_path in PAIRS[arch]:
                target = _child(block, target_path)
                sources = [(f"{prefix}.{p}" if prefix else p, _child(block, p)) for p in source_paths]
                if type(target) is not nn.Linear or any(type(s) is not nn.Linear for _, s in sources):
                    continue
                width = target.in_features
                if any(s.out_features != width for _, s in sources):
                    continue          # grouped-query heads: v_proj narrower than o_proj's input
                head = None if head_path is None else _child(block, head_path)
                if head_path is not None and not isinstance(head, int):
                    continue
                if width % m or (head is not None and (head % m or width % head)):
                    continue
                found.append((f"{prefix}.{target_path}" if prefix else target_path, target, sources, head))
    return found


def _group_kept(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of m columns of ``score`` [N, K], the sum over rows of its n largest
    entries (float64 [K / m])."""
    rows, k = score.shape
    return score.reshape(rows, k // m, m).topk(n, dim=-1).values.to(torch.float64).sum((0, 2))


def _one_group_kept(score: torch.Tensor, group: int, n: int, m: int) -> torch.Tensor:
    """``_group_kept(score)[group]``, from that group's m columns alone (the search's step)."""
    return score[:, group * m:(group + 1) * m].topk(n, dim=-1).values.to(torch.float64).sum()


def _kept(score: torch.Tensor, n: int, m: int) -> float:
    """The sum over rows and groups of m of the n largest entries of ``score`` [N, K]."""
    return float(_group_kept(score, n, m).sum())


def _search(score: torch.Tensor, n: int, m: int, head: Optional[int], rng: random.Random) -> torch.Tensor:
    """The permutation p [K] (long) of the module doc's hill climb on ``score`` [N, K]."""
    k = score.shape[1]
    s = score.clone()
    per_group = _group_kept(s, n, m)
    p = list(range(k))
    span = k if head is None else head
    for _ in range(SWAPS_PER_CHANNEL * k):
        start = 0 if head is None else head * rng.randrange(k // head)
        a, b = start + rng.randrange(span), start + rng.randrange(span)
        ga, gb = a // m, b // m
        if ga == gb:
            continue
        s[:, [a, b]] = s[:, [b, a]]
        kept_a, kept_b = _one_group_kept(s, ga, n, m), _one_group_kept(s, gb, n, m)
        if kept_a + kept_b > per_group[ga] + per_group[gb]:
            per_group[ga], per_group[gb] = kept_a, kept_b
            p[a], p[b] = p[b], p[a]
        else:
            s[:, [a, b]] = s[:, [b, a]]
    return torch.tensor(p, device=score.device)
