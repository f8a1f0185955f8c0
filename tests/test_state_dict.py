"""Loading state_dicts into converted modules (SparseLinear in every format, Int4Linear,
Int8Linear, FP8Linear in both modes, WindowAttention): a load is checked like a
constructor call and refused with a ValueError or TypeError naming the key; the format's
settings travel in the state_dict, and a state_dict saved with other settings is refused;
a refused load leaves the module as it was; a valid one gives the saved model's outputs on
every backend; an optimizer built before a load keeps training the module's parameters.

Corrupted and mismatched state_dicts are loaded, and the models run, in a fresh
interpreter (tests._modules.run_isolated), so that a crash fails one test."""
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparqle
from sparqle import registry
from sparqle.bench import swin_reference as swin
from sparqle.nn import FP8Linear, Int4Linear, Int8Linear, SparseLinear, WindowAttention

from ._modules import load_saved, run_isolated
from .conftest import device_backends


def _linears() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 16))


def _window() -> nn.Module:
    """A WindowAttention whose relative_position_index is in its state_dict."""
    ref = swin.WindowAttention(16, 2, (3, 3))
    return nn.Sequential(WindowAttention(ref.qkv, ref.proj, ref.num_heads, ref.relative_position_bias_table,
                                         ref.relative_position_index, ref.scale, ref.window_size,
                                         index_persistent=True))


def _converted(fmt, options):
    return lambda: sparqle.convert(_linears(), fmt, **options)


# kind -> the converted model, from a fresh random model: every example of sparqle.registry,
# and the settings a load must tell from them.
KINDS = {
    **{label: _converted(*conversion) for entry in registry.OPS for label, conversion in entry.examples.items()},
    "bell-32": _converted("bell", {"sparsity": 0.5, "block_size": 32}),
    "int4-64": _converted("int4", {"group_size": 64}),
    "fp8-training": _converted("fp8", {"training": True}),
    "window": _window,
}
FAMILIES = {"sparse": [label for entry in registry.OPS if entry.sparse for label in entry.examples],
            "quantized": [label for entry in registry.OPS if not entry.sparse for label in entry.examples]
            + ["fp8-training"],
            "window": ["window"]}
# (saved, loaded into): each pair differs in a setting
MISMATCHED = [("csr", "bell"), ("bell", "bell-32"), ("2:4", "4:8"), ("int4", "int4-64"),
              ("int4", "int4-symmetric"), ("int4-symmetric", "int4"), ("int8", "int8-w16"),
              ("fp8", "fp8-e5m2-tensor"), ("fp8", "fp8-training"), ("fp8-training", "fp8"),
              ("csr", "int8"), ("int8", "fp8")]


def _input(kind: str) -> torch.Tensor:
    return torch.randn(2, 9, 16) if kind == "window" else torch.randn(3, 40)


def _outputs(model: nn.Module, x: torch.Tensor, backends=None):
    """The model's output on each of ``backends`` (default: every backend that runs here)."""
    with torch.no_grad():
        outputs = {}
        for backend in backends or [backend for _, backend in device_backends()]:
            with sparqle.use_backend(backend):
                outputs[backend] = model(x)
        return outputs


def _assert_same_outputs(got, expected, what: str) -> None:
    for backend in expected:
        assert torch.equal(got[backend], expected[backend]), f"{what}: the output changed on {backend}"


# ---- corrupted state_dicts ---------------------------------------------------------

def _other(value):
    """A value of a setting that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return f"{value}-other"


def _set(t: torch.Tensor, position: int, value) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[position % t.numel()] = value
    return t


def _corruptions(name: str, t):
    """(what, function of the saved value) that make a module's state_dict entry ``name``
    invalid, whatever the saved values are."""
    if name == "_extra_state":
        for setting in t:
            yield f"{setting} changed", lambda s, setting=setting: {**s, setting: _other(s[setting])}
        yield "not a dict", lambda s: list(s.items())
        return
    yield "not a tensor", lambda t, p: t.tolist()
    yield "truncated", lambda t, p: t[:-1] if t.dim() else t[None]
    yield "extended", lambda t, p: torch.cat([t, t[:1]]) if t.dim() else torch.stack([t, t])
    yield "another dtype", lambda t, p: t.to(torch.int32) if t.is_floating_point() else t.float()
    if t.dtype in (torch.int32, torch.int64):  # indices: SparseLinear's, the window's
        yield "negative index", lambda t, p: _set(t, p, -5)
        yield "index past every range", lambda t, p: _set(t, p, 10**6)
    if name == "scales":
        for bad in (0.0, -1.0, math.nan, math.inf):
            yield f"scale {bad}", lambda t, p, bad=bad: _set(t, p, bad)
    if name == "zeros":
        for bad in (-1.0, 16.0, math.nan):
            yield f"zero point {bad}", lambda t, p, bad=bad: _set(t, p, bad)
    if name == "qweight" and t.dtype == torch.int8:
        yield "-128", lambda t, p: _set(t, p, -128)


def _checked_keys(model: nn.Module):
    """The state_dict keys of sparqle's modules (the others are torch's to check)."""
    modules = (SparseLinear, Int4Linear, Int8Linear, FP8Linear, WindowAttention)
    return [key for key in model.state_dict() if isinstance(model.get_submodule(key.rpartition(".")[0]), modules)]


def corrupted_loads_are_refused(family: str, examples: int) -> None:
    """Run in a fresh interpreter by the test below."""
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data):
        kind = data.draw(st.sampled_from(FAMILIES[family]), label="kind")
        torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        model, x = KINDS[kind](), _input(kind)
        before = _outputs(model, x, ["torch"])  # the module is what a refused load must keep
        saved = model.state_dict()
        key = data.draw(st.sampled_from(_checked_keys(model)), label="key")
        what, corrupt = data.draw(st.sampled_from(list(_corruptions(key.rpartition(".")[2], saved[key]))),
                                  label="corruption")
        position = data.draw(st.integers(0, 2**20), label="position")
        bad = dict(saved)
        bad[key] = corrupt(saved[key]) if key.endswith("_extra_state") else corrupt(saved[key], position)
        target = copy.deepcopy(model)
        strict = data.draw(st.booleans(), label="strict")
        with pytest.raises((ValueError, TypeError)) as error:
            target.load_state_dict(bad if strict else {key: bad[key]}, strict=strict)
        assert f"'{key}'" in str(error.value), f"the error does not name {key!r}: {error.value}"
        _assert_same_outputs(_outputs(target, x, ["torch"]), before, f"after a refused load of {what} {key}")
    run()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_corrupted_state_dicts_are_refused(family):
    run_isolated("tests.test_state_dict", "corrupted_loads_are_refused", family, 6 if family == "window" else 20)


# ---- state_dicts saved with other settings -----------------------------------------

def mismatched_loads_are_refused() -> None:
    """Run in a fresh interpreter by the test below."""
    for saved_kind, kind in MISMATCHED:
        torch.manual_seed(0)
        saved, model = KINDS[saved_kind]().state_dict(), KINDS[kind]()
        x = _input(kind)
        before = _outputs(model, x, ["torch"])
        for strict in (True, False):
            with pytest.raises(ValueError, match=r"'0\._extra_state'.*saved from") as error:
                model.load_state_dict(saved, strict=strict)
            assert "convert the model with the settings it was saved with" in str(error.value)
        _assert_same_outputs(_outputs(model, x, ["torch"]), before, f"{saved_kind} into {kind}")


def test_state_dicts_of_other_settings_are_refused():
    run_isolated("tests.test_state_dict", "mismatched_loads_are_refused")


# ---- valid loads -------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_valid_load_gives_the_saved_models_outputs(kind):
    """Through torch.save and torch.load(weights_only=True) (the settings are plain types),
    into a model converted from other weights (CSR and Blocked-ELL patterns of other sizes)."""
    torch.manual_seed(1)
    model, x = KINDS[kind](), _input(kind)
    torch.manual_seed(2)
    other = load_saved(model, KINDS[kind]())
    _assert_same_outputs(_outputs(other, x), _outputs(model, x), kind)


def test_settings_travel_as_plain_types():
    for kind in ("bell", "int4-symmetric", "int8-w16", "fp8-e5m2-tensor"):
        state = KINDS[kind]().state_dict()["0._extra_state"]
        assert all(isinstance(v, (str, int, bool, type(None))) for v in state.values()), state
    assert KINDS["fp8-e5m2-tensor"]().state_dict()["0._extra_state"] == {
        "format": "fp8", "training": False, "fp8_dtype": "float8_e5m2", "granularity": "tensor",
        "out_features": 24, "in_features": 40}


def test_a_state_dict_without_settings_is_still_checked():
    """A state_dict saved before the settings travelled: strict loads say the key is
    missing; non-strict ones are checked as any other."""
    model = KINDS["csr"]()
    saved = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    with pytest.raises(RuntimeError, match="Missing key.*_extra_state"):
        copy.deepcopy(model).load_state_dict(saved)
    copy.deepcopy(model).load_state_dict(saved, strict=False)
    saved["0.col_indices"] = _set(saved["0.col_indices"], 0, 40)
    with pytest.raises(ValueError, match=r"'0\.col_indices'.*must lie in \[0, 40\)"):
        copy.deepcopy(model).load_state_dict(saved, strict=False)


@pytest.mark.parametrize("fmt,options", [("csr", {"sparsity": 0.5}),
                                         ("bell", {"sparsity": 0.5, "block_size": 16})])
def test_an_optimizer_keeps_training_after_a_load_that_resizes(fmt, options):
    """The loaded pattern has another size; values stays the Parameter the optimizer holds."""
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(64, 48), format=fmt, **options)
    torch.manual_seed(1)
    saved = SparseLinear.from_linear(nn.Linear(64, 48), format=fmt, **{**options, "sparsity": 0.75})
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    values = layer.values
    layer.load_state_dict(saved.state_dict())
    assert layer.values is values and values.shape == saved.values.shape and values.requires_grad
    loaded = values.detach().clone()
    layer(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(layer.values.detach(), loaded)
    assert torch.equal(layer.weight.to_dense() != 0, saved.weight.to_dense() != 0)


# The buffers of A^T's structure a SparseLinear held before the backward derived it.
LEGACY = {"csr": ("t_crow_indices", "t_col_indices", "t_perm", "t_row_order"), "bell": ("t_ell_cols", "t_slots")}


def legacy_state_dict(model: nn.Module) -> dict:
    """``model``'s state_dict as the previous version saved it: each SparseLinear's A^T
    structure among its buffers, under the keys it had then."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear) and module.format in LEGACY:
            tensors = module.weight.transposed_structure()
            state.update({f"{name}.{key}": t for key, t in zip(LEGACY[module.format], tensors)})
    return state


@pytest.mark.parametrize("kind", ["csr", "bell"])
def test_a_state_dict_of_the_old_layout_loads(kind, tmp_path):
    """A^T's structure under its old keys: accepted and dropped (it is derived) by strict
    and non-strict loads, through torch.save with weights_only, and by from_state_dict."""
    torch.manual_seed(1)
    model, x = KINDS[kind](), _input(kind)
    old = legacy_state_dict(model)
    assert all(f"0.{key}" in old for key in LEGACY[kind]) and not any(f"0.{key}" in model.state_dict()
                                                                      for key in LEGACY[kind])
    torch.save(old, tmp_path / "old.pt")
    old = torch.load(tmp_path / "old.pt", weights_only=True)
    for strict in (True, False):
        torch.manual_seed(2)
        other = KINDS[kind]()
        result = other.load_state_dict(old, strict=strict)
        assert not result.missing_keys and not result.unexpected_keys
        assert set(other.state_dict()) == set(model.state_dict())
        _assert_same_outputs(_outputs(other, x), _outputs(model, x), f"{kind}, strict={strict}")
    layer = SparseLinear.from_state_dict({k[2:]: v for k, v in old.items() if k.startswith("0.")}, "0.")
    assert set(layer.state_dict()) == {k[2:] for k in model.state_dict() if k.startswith("0.")}
    _assert_same_outputs(_outputs(layer, x), _outputs(model[0], x), f"{kind}, from_state_dict")
