"""The weight formats' base class (sparqle.formats._base.WeightFormat), for every format of
sparqle.registry.OPS on the registry's examples: each declares its tensors and settings,
and the unchecked rebuild, ``tensors()``, ``settings()``, ``to`` and the nn module's
buffers derived from them agree."""
import pytest
import torch
from torch import nn

import sparqle
from sparqle import registry
from sparqle.formats import Int4Weight, Int8Weight
from sparqle.formats._base import WeightFormat, layer_dtype

EXAMPLES = [pytest.param(entry, conversion, id=label)
            for entry in registry.OPS for label, conversion in entry.examples.items()]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bits (FP8 tensors compared as their bytes: torch.equal
    does not take them)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        *(t.view(torch.uint8) if t.dtype.itemsize == 1 else t for t in (a, b)))


def _module_and_weight(conversion):
    torch.manual_seed(0)
    fmt, options = conversion
    module = sparqle.convert(nn.Sequential(nn.Linear(40, 24)), fmt, **options)[0]
    if isinstance(module, sparqle.nn.FP8Linear):
        return module, module.quantized_weight(torch.float32)
    return module, module.weight


@pytest.mark.parametrize("entry, conversion", EXAMPLES)
def test_declares_what_it_holds(entry, conversion):
    module, w = _module_and_weight(conversion)
    fmt = entry.format
    assert issubclass(fmt, WeightFormat) and type(w) is fmt
    assert fmt.tensor_names and not set(fmt.tensor_names) & set(fmt.setting_names)
    # Nothing held but what is declared: a rebuild from the declared names misses nothing.
    assert set(vars(w)) == set(fmt.tensor_names + fmt.setting_names)
    assert list(w.tensors()) == list(fmt.tensor_names)
    assert all(isinstance(t, torch.Tensor) for t in w.tensors().values())
    assert not any(isinstance(v, torch.Tensor) for v in w.settings().values())
    assert set(fmt.dtype_follows) <= set(fmt.tensor_names)
    assert "dtype" in fmt.setting_names or layer_dtype in fmt.dtype_follows.values()
    assert w.shape == (24, 40) and w.dtype == torch.float32 and w.device == torch.device("cpu")


@pytest.mark.parametrize("entry, conversion", EXAMPLES)
def test_module_holds_the_declared_tensors(entry, conversion):
    """The module keeps each declared tensor under its name, and its weight is over them
    (no copy); the state_dict keys are those names, the bias and the settings."""
    module, w = _module_and_weight(conversion)
    state = module.state_dict()
    assert set(state) == set(w.tensors()) | {"bias", "_extra_state"}
    for name, t in w.tensors().items():
        assert t.data_ptr() == state[name].data_ptr() and t.shape == state[name].shape, name


@pytest.mark.parametrize("entry, conversion", EXAMPLES)
def test_trusted_rebuilds_from_tensors_and_settings(entry, conversion):
    _, w = _module_and_weight(conversion)
    again = entry.format._trusted(**w.tensors(), **w.settings())
    assert type(again) is entry.format and repr(again) == repr(w)
    assert again.settings() == w.settings()
    assert all(again.tensors()[name] is t for name, t in w.tensors().items())
    assert torch.equal(registry.dense(again), registry.dense(w))
    with pytest.raises(TypeError, match=entry.format.tensor_names[0]):
        entry.format._trusted(**w.settings())
    with pytest.raises(TypeError, match="unknown"):
        entry.format._trusted(**w.tensors(), **w.settings(), unknown=1)


@pytest.mark.parametrize("entry, conversion", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_to_dtype_is_the_layer_dtype(entry, conversion, dtype):
    """``to(dtype=)`` makes ``dtype`` the layer's float dtype: the tensors of
    ``dtype_follows`` take the dtype it maps to, the others and the settings stay; back to
    float32 from float64 gives the same tensors."""
    _, w = _module_and_weight(conversion)
    moved = w.to(dtype=dtype)
    assert type(moved) is type(w) and moved.dtype == dtype and moved.shape == w.shape
    assert {k: v for k, v in moved.settings().items() if k != "dtype"} == \
           {k: v for k, v in w.settings().items() if k != "dtype"}
    for name, t in moved.tensors().items():
        follow = w.dtype_follows.get(name)
        if follow is None:
            assert _same(t, w.tensors()[name]), name
        else:
            assert t.dtype == follow(dtype), name
    if dtype == torch.float64:
        back = moved.to(dtype=torch.float32)
        assert back.settings() == w.settings()
        assert all(_same(t, w.tensors()[name]) for name, t in back.tensors().items())
        # The same weight, computed in float64 (int4 dequantizes in its compute dtype).
        torch.testing.assert_close(registry.dense(moved).float(), registry.dense(w))


# Op -> the tensors ``to(dtype=d)`` casts, each with the dtype it takes for d (the docs of
# the formats): the others keep theirs.
FOLLOWERS = {
    "csr_linear": {"values": lambda d: d}, "bell_linear": {"values": lambda d: d},
    "nm_linear": {"values": lambda d: d},
    "int4_linear": {"scales": lambda d: d, "zeros": lambda d: d},             # stored in d
    "int8_linear": {"scales": lambda d: torch.float64 if d == torch.float64 else torch.float32},
    "fp8_linear": {},                                                           # fp32 scales
}


@pytest.mark.parametrize("entry, conversion", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_to_dtype_per_format(entry, conversion, dtype):
    assert set(FOLLOWERS) == {e.name for e in registry.OPS}
    _, w = _module_and_weight(conversion)
    moved = w.to(dtype=dtype)
    expected = {name: FOLLOWERS[entry.name].get(name, lambda d: t.dtype)(dtype)
                for name, t in w.tensors().items()}
    assert {name: t.dtype for name, t in moved.tensors().items()} == expected
    assert moved.dtype == dtype


@pytest.mark.parametrize("entry, conversion", EXAMPLES)
def test_to_device_copies_nothing_else(entry, conversion):
    _, w = _module_and_weight(conversion)
    moved = w.to("cpu")
    assert moved is not w and moved.settings() == w.settings() and moved.device == torch.device("cpu")
    assert all(_same(t, w.tensors()[name]) for name, t in moved.tensors().items())


def test_to_dtype_keeps_the_constructors_checks():
    """A cast that breaks a quantized format is refused as its constructor refuses it."""
    tiny = torch.full((2, 64), 1e-9)
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        Int4Weight.from_float(tiny, 32).to(dtype=torch.float16)       # the scale underflows
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        Int8Weight.from_float(torch.full((2, 8), 1e-300, dtype=torch.float64)).to(dtype=torch.float32)
    with pytest.raises(TypeError, match="FP8Weight: dtype must be one of"):
        sparqle.FP8Weight.from_float(torch.randn(4, 8)).to(dtype=torch.int32)


@pytest.mark.parametrize("entry, conversion", EXAMPLES)
def test_tensors_given_or_moved_in_inference_mode_are_held_as_plain_tensors(entry, conversion):
    """A format holds no inference tensor (formats._base.plain_tensor): its constructor
    copies one it is given, and ``to`` in inference mode makes plain ones; the values are
    the same."""
    _, w = _module_and_weight(conversion)
    fmt = entry.format
    with torch.inference_mode():
        given = {name: t.clone() for name, t in w.tensors().items()}
        assert all(t.is_inference() for t in given.values())
        rebuilt = fmt(**given, **w.settings()) if fmt.checked_to else None
        moved = w.to(dtype=torch.float64)
        again = moved.to(dtype=w.dtype)
    for built in [b for b in (rebuilt, moved, again) if b is not None]:
        assert not any(t.is_inference() for t in built.tensors().values())
    for name, t in w.tensors().items():
        assert _same(again.tensors()[name], t)
        if rebuilt is not None:
            assert _same(rebuilt.tensors()[name], t)
