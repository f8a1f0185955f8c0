"""The weight-op contract, for every op of sparqle.registry and every conversion its entry
lists as an example: ``y = x @ W^T + bias`` against float64 dense math of the converted
weight, with x strided, 3-D, a single row or empty; the gradients of x, bias and (sparse
formats) the stored values; gradcheck in float64; ``torch.library.opcheck`` of the op;
``torch.compile(fullgraph=True)`` forward and backward; a state_dict round trip; and
``sparqle.spmm`` of the sparse formats. What is specific to one op (its format's rules, its
other ops, its dispatch) stays in that op's own test file.

A new registry entry is tested here by what it declares: no test to copy.
"""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparqle
from sparqle import registry
from sparqle.kernels.dispatch import FP8_WEIGHT_ONLY_MAX_M

from ._oracle import NO_SCHEMA, RTOL, assert_close, assert_no_mutation_or_alias, fp8_rows_rule, int8_rows_rule
from .conftest import device_backends

# Named by op and example ("nm_linear-2:4"), so that pytest -k selects them by op name, as the
# GPU check's families do.
EXAMPLES = [pytest.param(entry, label, conversion, id=f"{entry.name}-{label}")
            for entry in registry.OPS for label, conversion in entry.examples.items()]
IN_FEATURES, OUT_FEATURES = 40, 24


def converted(conversion, dtype=torch.float32, device="cpu", seed=0) -> nn.Module:
    """An nn.Linear(IN_FEATURES, OUT_FEATURES) with random weights (a tenth of them zero, so
    that pruning meets ties and empty rows are possible) converted with ``conversion``,
    then moved to ``dtype`` and ``device``."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator))
        linear.weight[torch.rand(linear.weight.shape, generator=generator) < 0.1] = 0
        linear.bias.copy_(torch.randn(OUT_FEATURES, generator=generator))
    fmt, options = conversion
    model = sparqle.convert(nn.Sequential(linear), fmt, **options)
    return model[0].to(device=device, dtype=dtype)


def weight_of(module: nn.Module, dtype: torch.dtype):
    """The module's weight in its format, for x of ``dtype``."""
    return module.quantized_weight(dtype) if isinstance(module, sparqle.nn.FP8Linear) else module.weight


def quantizes_input(entry, module, rows: int) -> bool:
    """Whether the op quantizes x per row before multiplying (int8 W8A8, and FP8 above the
    rows it runs weight-only): y is then not linear in x, and dx is straight through."""
    if entry.name == "int8_linear":
        return module.activation == "dynamic"
    return entry.name == "fp8_linear" and rows > FP8_WEIGHT_ONLY_MAX_M


def input_as_multiplied(entry, module, x2d: torch.Tensor) -> torch.Tensor:
    """x [M, K] in float64 as the op multiplies it: dequantized from its per-row codes where
    the op quantizes it, else x itself."""
    if quantizes_input(entry, module, x2d.shape[0]):
        q, scale = (int8_rows_rule(x2d) if entry.name == "int8_linear"
                    else fp8_rows_rule(x2d, torch.float8_e4m3fn))
        return q.double() * scale.double()[:, None]
    return x2d.detach().cpu().double()


def oracle(entry, module, x: torch.Tensor, dtype: torch.dtype):
    """(y, scale) in float64: y = x @ W^T + bias for the module's own weight, and the sum
    |x| |W|^T + |bias| that bounds its rounding."""
    w64 = entry.dense(weight_of(module, dtype)).double().cpu()
    x64 = input_as_multiplied(entry, module, x.reshape(-1, x.shape[-1]))
    bias64 = module.bias.detach().double().cpu()
    y = (x64 @ w64.T + bias64).reshape(*x.shape[:-1], OUT_FEATURES)
    scale = (x64.abs() @ w64.abs().T + bias64.abs()).reshape(*x.shape[:-1], OUT_FEATURES)
    return y, scale


def _x(rows, dtype, device, layout="strided"):
    """x [rows, K]: a column slice of a wider tensor (row stride K + 3), or 3-D [1, rows, K]."""
    wide = torch.randn(rows, IN_FEATURES + 3, dtype=torch.float32).to(device=device, dtype=dtype)
    x = wide[:, 2:2 + IN_FEATURES]
    return x.unsqueeze(0) if layout == "3-D" else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry, label, conversion", EXAMPLES)
def test_forward_matches_oracle(device_backend, entry, label, conversion, dtype):
    """Rows 1 and 5 (the small-M paths), 33 (tiled), 0; x strided and 3-D; the bias fused."""
    device, backend = device_backend
    module = converted(conversion, dtype, device)
    assert isinstance(weight_of(module, dtype), entry.format), label
    for rows, layout in ((1, "strided"), (5, "3-D"), (33, "strided"), (0, "strided")):
        x = _x(rows, dtype, device, layout)
        with sparqle.use_backend(backend):
            y = module(x)
        expected, scale = oracle(entry, module, x, dtype)
        assert_close(y, expected, scale, dtype, f"{label} {backend} rows={rows} {layout}")


def laid_out(shape, layout: str, dtype, device) -> torch.Tensor:
    """A fresh random leaf tensor of ``shape`` (1-D or 2-D) that requires grad, seen through
    ``layout``: ``transposed`` (2-D: a transposed copy's view), ``strided`` (every other
    element of the last dimension), ``expanded`` (one row, or one element, expanded)."""
    if layout == "transposed":
        return torch.randn(*shape[::-1], dtype=dtype).to(device).requires_grad_(True).t()
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype).to(device).requires_grad_(True)[..., ::2]
    return torch.randn(*(1 for _ in shape), dtype=dtype).to(device).requires_grad_(True).expand(*shape)


@pytest.mark.parametrize("x_layout, bias_layout", [("transposed", "strided"), ("strided", "expanded"),
                                                    ("expanded", "strided")])
@pytest.mark.parametrize("entry, label, conversion", EXAMPLES)
def test_any_layout_of_x_and_bias(device_backend, entry, label, conversion, x_layout, bias_layout):
    """The op reads x and the bias through their strides: y, dx, dbias and a sparse format's
    d(values) for x transposed, strided or expanded and the bias strided or expanded,
    against float64 math."""
    device, backend = device_backend
    module = converted(conversion, device=device)
    args = recorded_args(entry, module, torch.randn(20, IN_FEATURES, device=device))
    n = len(entry.tensors(weight_of(module, torch.float32)))
    x = laid_out((20, IN_FEATURES), x_layout, torch.float32, device)
    bias = laid_out((OUT_FEATURES,), bias_layout, torch.float32, device)
    leaves = (x, bias) + ((module.values,) if entry.sparse else ())
    with sparqle.use_backend(backend):
        y = entry.op.default(x, *args[1:1 + n], bias, *args[2 + n:])
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, dy)
    ref = copy.deepcopy(module).cpu().double()
    w64 = entry.dense(weight_of(ref, torch.float64)).double()
    x64, bias64, dy64 = input_as_multiplied(entry, module, x), bias.detach().double().cpu(), dy.double().cpu()
    assert_close(y, x64 @ w64.T + bias64, x64.abs() @ w64.abs().T + bias64.abs(), torch.float32, f"{label} y")
    assert_close(grads[0], dy64 @ w64, dy64.abs() @ w64.abs(), torch.float32, f"{label} dx")
    assert_close(grads[1], dy64.sum(0), dy64.abs().sum(0), torch.float32, f"{label} dbias")
    if entry.sparse:  # the values' gradient reads x through its strides too
        (x64 @ w64.T).backward(dy64)
        bound = copy.deepcopy(ref)
        bound.values.data.fill_(1)
        (x64.abs() @ entry.dense(bound.weight).T).backward(dy64.abs())
        assert_close(grads[2], ref.values.grad, bound.values.grad, torch.float32, f"{label} dvalues")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry, label, conversion", EXAMPLES)
def test_gradients_match_oracle(device_backend, entry, label, conversion, dtype):
    """dx = dy @ W, dbias = sum of dy, and for sparse formats d(values) = (dy^T @ x) at the
    stored positions: float64 autograd through a float64 copy of the module's dense weight."""
    device, backend = device_backend
    module = converted(conversion, dtype, device)
    x = _x(20, dtype, device).requires_grad_(True)  # past the small-M and weight-only paths
    dy = torch.randn(20, OUT_FEATURES).to(device=device, dtype=dtype)
    with sparqle.use_backend(backend):
        module(x).backward(dy)
    ref = copy.deepcopy(module).cpu().double()
    w64 = entry.dense(weight_of(ref, torch.float64)).double()
    x64 = input_as_multiplied(entry, module, x).requires_grad_(True)
    dy64 = dy.double().cpu()
    (x64 @ w64.T + ref.bias).backward(dy64)
    assert_close(x.grad, x64.grad, dy64.abs() @ w64.detach().abs(), dtype, f"{label} dx")
    assert_close(module.bias.grad, ref.bias.grad, dy64.abs().sum(0), dtype, f"{label} dbias")
    if entry.sparse:
        # The bound: the same gradient for |dy|, |x| and every stored value 1.
        bound = copy.deepcopy(ref)
        bound.values.data.fill_(1)
        (x64.detach().abs() @ entry.dense(bound.weight).T).backward(dy64.abs())
        assert_close(module.values.grad, ref.values.grad, bound.values.grad, dtype, f"{label} dvalues")


FLOAT64_RUNS = [pytest.param(entry, label, conversion, backend, id=f"{entry.name}-{label}-{backend}")
                for entry in registry.OPS for label, conversion in entry.examples.items()
                for _, backend in device_backends() if torch.float64 in entry.dtypes[backend]]


@pytest.mark.parametrize("entry, label, conversion, backend", FLOAT64_RUNS)
def test_gradcheck_float64(entry, label, conversion, backend):
    """In float64 on every backend whose kernel takes it: linear in x (unless the op
    quantizes x), in bias, and in the stored values of a sparse format; sparqle.spmm of a
    sparse format in b and the values."""
    module = converted(conversion, torch.float64)
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64, requires_grad=not quantizes_input(entry, module, 3))
    inputs = (x, module.bias) + ((module.values,) if entry.sparse else ())
    with sparqle.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *args: module(args[0]), inputs, fast_mode=True)
        if entry.sparse:
            b = torch.randn(IN_FEATURES, 4, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda b, values: sparqle.spmm(module.weight, b),
                                            (b, module.values), fast_mode=True)


class _Recorder(TorchDispatchMode):
    """Keeps the arguments of the calls of ``op`` made while it is active."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


def recorded_args(entry, module, x: torch.Tensor) -> tuple:
    """The arguments of the one call of the op that ``module(x)`` makes (x itself first),
    recorded through the dispatcher (x made to require a gradient, so that the call goes
    through it)."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    with _Recorder(entry.op.default) as recorder:
        module(x)
    assert len(recorder.calls) == 1, f"{type(module).__name__} called {entry.name} {len(recorder.calls)} times"
    return (x, *recorder.calls[0][1:])


@pytest.mark.parametrize("entry, label, conversion", EXAMPLES)
def test_opcheck(entry, label, conversion):
    """torch.library.opcheck of the op with the arguments the converted module passes it
    (recorded as it runs), on both sides of the small-M paths."""
    module = converted(conversion)
    for rows in (3, 20):
        x = torch.randn(rows, IN_FEATURES, requires_grad=True)
        args = recorded_args(entry, module, x)
        fp8 = any(t.element_size() == 1 and t.is_floating_point() for t in args if isinstance(t, torch.Tensor))
        torch.library.opcheck(entry.op.default, args, **({"test_utils": NO_SCHEMA} if fp8 else {}))
        if fp8:  # test_schema's check, on the bits
            assert_no_mutation_or_alias(entry.op.default, args)


@pytest.mark.parametrize("entry, label, conversion", EXAMPLES)
def test_compile_fullgraph_forward_and_backward(entry, label, conversion):
    """torch.compile(fullgraph=True) of the module: y and the gradients of x and of every
    parameter (bias, a sparse format's values: the backward's own tensors, such as A^T's
    structure, built in the graph) as eager gives them."""
    module = converted(conversion)
    x = torch.randn(5, IN_FEATURES, requires_grad=True)
    leaves = [x, *module.parameters()]

    def f(x):
        return torch.nn.functional.gelu(module(x)).sum()

    expected = f(x)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grads, expected_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry, label, conversion", EXAMPLES)
def test_state_dict_round_trip(entry, label, conversion):
    """A converted module loads into another one converted the same way from other float
    weights (torch.save, weights_only) and then computes what the saved one does."""
    saved, other = converted(conversion, seed=0), converted(conversion, seed=1)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, IN_FEATURES)
    torch.testing.assert_close(other(x), saved(x), rtol=0, atol=0)
    rebuilt = type(saved).from_state_dict(copy.deepcopy(saved.state_dict()))
    torch.testing.assert_close(rebuilt(x), saved(x), rtol=0, atol=0)


@pytest.mark.parametrize("entry, label, conversion", [p for p in EXAMPLES if p.values[0].sparse])
def test_spmm_is_the_transposed_linear(device_backend, entry, label, conversion):
    """sparqle.spmm(a, b) = a @ b for b [K, n] (and b a transposed view), against float64."""
    device, backend = device_backend
    a = converted(conversion, device=device).weight
    a64 = entry.dense(a).double().cpu()
    for b in (torch.randn(IN_FEATURES, 7, device=device), torch.randn(7, IN_FEATURES, device=device).t()):
        with sparqle.use_backend(backend):
            c = sparqle.spmm(a, b)
        b64 = b.double().cpu()
        assert_close(c, a64 @ b64, a64.abs() @ b64.abs(), torch.float32, f"{label} spmm")
        assert c.is_contiguous()


def test_every_op_has_examples_and_a_unique_name():
    assert all(entry.examples for entry in registry.OPS)
    names = [entry.name for entry in registry.OPS]
    assert len(set(names)) == len(names)
    for entry in registry.OPS:
        assert hasattr(torch.ops.sparqle, entry.name), entry.name
        assert entry.module_class.from_linear, entry.name
    assert set(RTOL) >= {torch.float32, torch.bfloat16}


@pytest.mark.parametrize("device", sorted({d for d, _ in device_backends()}))
def test_registry_answers_by_format(device):
    """weight_op names the argument and the formats when given something else."""
    with pytest.raises(TypeError, match=r"^a must be one of the formats \['CSR', 'BlockedELL', 'SemiStructured'\]"):
        sparqle.spmm(sparqle.Int8Weight.from_float(torch.randn(4, 4, device=device)), torch.randn(4, 2, device=device))
    with pytest.raises(TypeError, match="^w must be a torch.Tensor or one of the formats"):
        sparqle.linear(torch.randn(2, 4, device=device), object())


@pytest.mark.parametrize("entry, label, conversion", EXAMPLES)
def test_the_forward_called_directly_gives_the_ops_result(entry, label, conversion):
    """Where the dispatcher adds nothing (an eager call that records no gradient) the op's
    forward runs without it: the same result, bit for bit."""
    module = converted(conversion)
    x = torch.randn(5, IN_FEATURES)
    args = recorded_args(entry, module, x)
    with torch.no_grad():
        assert registry.dispatcher_adds_nothing(tuple(a for a in args if isinstance(a, torch.Tensor)))
        direct = module(x)
        through = entry.op.default(*args)
    assert torch.equal(direct, through)


def test_the_dispatcher_runs_where_it_adds_something():
    """A gradient to record, a dispatch mode, a torch function mode, the profiler, a functorch
    transform, a tensor subclass: the op goes through the dispatcher (its mode, profiler
    event and autograd see it)."""
    entry = registry.BY_FORMAT[sparqle.Int8Weight]
    module = converted(entry.examples["int8"])
    x = torch.randn(3, IN_FEATURES)
    tensors = (x, *entry.tensors(module.weight), module.bias)
    assert not registry.dispatcher_adds_nothing(tensors)  # the bias requires grad
    with torch.no_grad():
        assert registry.dispatcher_adds_nothing(tensors)
        with _Recorder(entry.op.default) as recorder:
            module(x)
        assert len(recorder.calls) == 1
        with torch.overrides.TorchFunctionMode():
            assert not registry.dispatcher_adds_nothing(tensors)
        with torch.profiler.profile() as profile:
            module(x)
        assert any(event.name == f"sparqle::{entry.name}" for event in profile.events())
        subclass = torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), x)
        assert not registry.dispatcher_adds_nothing((subclass,) + tensors[1:])
        seen = []

        def per_row(row):
            seen.append(registry.dispatcher_adds_nothing((row,) + tensors[1:]))
            return row

        torch.func.vmap(per_row)(x)
        assert seen == [False]
