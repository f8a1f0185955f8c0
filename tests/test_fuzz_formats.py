"""Fuzzing with hypothesis: every public op and format on every (device, backend) that runs
here, with random sizes (empty ones included), dtypes and memory layouts of every tensor
argument (contiguous, strided with NaN in the gaps, column-major, expanded with stride 0),
against the float64 oracle of the op's own (quantized) operands, gradients included; and
every format's constructor against classes of broken input (truncated, out-of-range,
negative, non-monotone, mistyped, NaN / zero / negative / infinite scales, int4 zero
points outside [0, 15], int8 -128), which must raise ValueError or TypeError.

Interpreted Triton is slow: it gets fewer examples than the torch path."""
import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sparqle
from sparqle import CSR, BlockedELL, FP8Weight, Int4Weight, Int8Weight, SemiStructured
from sparqle.formats.nm import PATTERNS

from ._oracle import RTOL
from ._oracle import assert_close as _assert_close
from .test_fp8_linear import E4M3, E5M2, deq, rule
from .test_int8_linear import quantize_rows_rule
from .test_nn import _strided
from .test_window_attention import oracle as attention_oracle
from .test_window_attention import oracle_grads as attention_oracle_grads
from .test_window_attention import rounded_for_dot
from .test_window_partition import merge_oracle, swin_partition

EXAMPLES = {"torch": 15, "triton": 6}


def fuzz(backend: str, examples=None):
    """The hypothesis settings of one property on ``backend``. A failure on interpreted
    Triton is reported as drawn, not shrunk (shrinking would rerun the kernels minutes)."""
    phases = [phase for phase in Phase if backend == "torch" or phase not in (Phase.shrink, Phase.explain)]
    return settings(max_examples=examples or EXAMPLES[backend], deadline=None, database=None, phases=phases,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def dtypes(backend: str):
    """The float dtypes every op takes on ``backend`` (Triton takes no float64)."""
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend == "torch" else [])


def assert_close(actual, expected64, scale64, dtype, what):
    """_oracle.assert_close with one subnormal step of ``dtype`` allowed besides: random
    sizes reach results so small that storing them in fp16 rounds them by that absolute
    step, whatever their relative bound."""
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    _assert_close(actual, expected64, scale64 + subnormal_step / RTOL[dtype], dtype, what)


LAYOUTS = ("contiguous", "strided", "column-major", "expanded")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor in ``layout`` holding t's values ("expanded": t's first slice along dim 0
    broadcast with stride 0, so its values are that slice's). Strided gaps hold NaN, so a
    kernel that reads them shows it."""
    if layout == "strided" and t.numel():
        return torch.stack([t, torch.full_like(t, math.nan)], -1)[..., 0]
    if layout == "column-major" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded" and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    return t


def leaf_in_layout(data, shape, dtype, device, name) -> torch.Tensor:
    """A random tensor of ``shape`` in a drawn layout, requiring grad (a non-leaf of a leaf)."""
    layout = data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
    return laid_out(torch.randn(shape, dtype=dtype, device=device).requires_grad_(), layout)


def seed(data) -> None:
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def fuzzed(prop):
    """The pytest test, over ``device_backend`` and prop's other parameters, that runs the
    hypothesis property ``prop(data, device, backend, ...)`` (torch seeded from ``data``)
    with the backend's number of examples."""
    params = list(inspect.signature(prop).parameters)[3:]

    def test(device_backend, **kwargs):
        device, backend = device_backend

        @fuzz(backend)
        @given(st.data())
        def run(data):
            seed(data)
            prop(data, device, backend, **kwargs)
        run()

    test.__name__, test.__qualname__, test.__doc__ = prop.__name__, prop.__qualname__, prop.__doc__
    test.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                            for name in ["device_backend", *params]])
    return test


# ---- linear (x @ W^T + bias) in every format ---------------------------------------

def _dense64(w) -> torch.Tensor:
    """The float64 [out, in] weight a format stands for (dequantized in float64)."""
    if isinstance(w, (CSR, BlockedELL, SemiStructured)):
        return w.to_dense().double().cpu()
    if isinstance(w, Int4Weight):
        g = w.group_width
        expand = (lambda t: t.double().cpu().repeat_interleave(max(g, 1), 1)[:, :w.shape[1]])
        return (w.unpack().double().cpu() - expand(w.zeros)) * expand(w.scales)
    if isinstance(w, Int8Weight):
        return w.qweight.double().cpu() * w.scales.double().cpu()[:, None]
    return deq(w.qweight, w.scales.expand(w.shape[0]))


def _weight(data, fmt: str, w: torch.Tensor):
    """A random weight of format ``fmt`` from the dense ``w``, its tensors maybe strided."""
    if fmt == "csr":
        density = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="density")
        fw = CSR.from_dense(w * (torch.rand_like(w) < density))
    elif fmt == "bell":
        b = data.draw(st.sampled_from([16, 32]), label="block size")
        fw = BlockedELL.from_dense(w, b, mask=sparqle.prune.magnitude(w, 0.5, block=b))
    elif fmt == "n:m":
        fw = SemiStructured.from_dense(w, *data.draw(st.sampled_from(PATTERNS), label="n:m"))
    elif fmt == "int4":
        fw = Int4Weight.from_float(w, data.draw(st.sampled_from([32, -1]), label="group"),
                                   symmetric=data.draw(st.booleans(), label="symmetric"))
    elif fmt in ("int8", "int8-w16"):
        fw = Int8Weight.from_float(w)
    else:
        fw = FP8Weight.from_float(w, data.draw(st.sampled_from([E4M3, E5M2]), label="fp8"),
                                  data.draw(st.sampled_from(["row", "tensor"]), label="granularity"))
    if data.draw(st.booleans(), label="strided format tensors"):
        fw = _restrided(fw)
    return fw


def _restrided(fw):
    """The same format over strided copies of its tensors (rebuilt through its constructor)."""
    if isinstance(fw, CSR):
        return CSR(*map(_strided, (fw.crow_indices, fw.col_indices, fw.values)), fw.shape)
    if isinstance(fw, BlockedELL):
        return BlockedELL(_strided(fw.ell_cols), _strided(fw.values), fw.shape)
    if isinstance(fw, SemiStructured):
        return SemiStructured(_strided(fw.values), _strided(fw.meta), fw.shape, fw.n, fw.m)
    if isinstance(fw, Int4Weight):
        return Int4Weight(*map(_strided, (fw.packed, fw.scales, fw.zeros)), fw.shape, fw.group_size, fw.symmetric)
    if isinstance(fw, Int8Weight):
        return Int8Weight(_strided(fw.qweight), _strided(fw.scales), fw.dtype)
    return FP8Weight(_strided(fw.qweight), _strided(fw.scales), fw.dtype)


LINEAR_FORMATS = ["csr", "bell", "n:m", "int4", "int8", "int8-w16", "fp8"]


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
@fuzzed
def test_linear_matches_oracle(data, device, backend, fmt):
    """y = x @ W^T + bias for W in ``fmt`` (its tensors maybe strided), x [..., in] and bias
    in every layout, and the gradients of x and bias."""
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    out, k = data.draw(st.integers(0, 40), label="out"), data.draw(st.integers(0, 48), label="in")
    lead = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=2), label="leading dims")
    w = _weight(data, fmt, torch.randn(out, k, dtype=dtype)).to(device)
    x = leaf_in_layout(data, (*lead, k), dtype, device, "x")
    bias = (leaf_in_layout(data, (out,), dtype, device, "bias")
            if data.draw(st.booleans(), label="with bias") else None)
    with sparqle.use_backend(backend):
        y = (sparqle.int8_linear(x, w, bias, activation=None) if fmt == "int8-w16"
             else sparqle.linear(x, w, bias))
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x] + ([bias] if bias is not None else []), dy) if y.numel() else None
    rows = math.prod(lead)
    x2d = x.detach().reshape(rows, k)
    if fmt == "int8":
        q, scale = quantize_rows_rule(x2d)
        x64 = q.double() * scale.double()[:, None]
    elif fmt == "fp8" and rows > 16:
        x64 = deq(*rule(x2d, E4M3))
    else:
        x64 = x2d.double().cpu()
    w64 = _dense64(w)
    b64 = bias.detach().double().cpu() if bias is not None else torch.zeros(out, dtype=torch.float64)
    assert y.shape == (*lead, out)
    assert_close(y.reshape(rows, out), x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")
    if grads is not None:
        dy64 = dy.reshape(rows, out).double().cpu()
        assert_close(grads[0].reshape(rows, k), dy64 @ w64, dy64.abs() @ w64.abs(), dtype, "dx")
        if bias is not None:
            assert_close(grads[1], dy64.sum(0), dy64.abs().sum(0), dtype, "dbias")


@pytest.mark.parametrize("fmt", ["csr", "bell", "n:m"])
@fuzzed
def test_spmm_matches_oracle(data, device, backend, fmt):
    """C = a @ b with b in every layout, and the gradient of b."""
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    m, k, n = (data.draw(st.integers(0, 40), label=name) for name in "mkn")
    a = _weight(data, fmt, torch.randn(m, k, dtype=dtype)).to(device)
    b = leaf_in_layout(data, (k, n), dtype, device, "b")
    with sparqle.use_backend(backend):
        c = sparqle.spmm(a, b)
        dc = torch.randn_like(c)
        (db,) = torch.autograd.grad(c, b, dc) if c.numel() else (None,)
    a64, b64 = _dense64(a), b.detach().double().cpu()
    assert_close(c, a64 @ b64, a64.abs() @ b64.abs(), dtype, "c")
    if db is not None:
        dc64 = dc.double().cpu()
        assert_close(db, a64.T @ dc64, a64.abs().T @ dc64.abs(), dtype, "db")


@pytest.mark.parametrize("kind", ["int8", E4M3, E5M2], ids=str)
@fuzzed
def test_quantize_rows_is_exact(data, device, backend, kind):
    """Per-row quantization of x in every layout, dynamic or with a static scale: exactly
    the documented rule."""
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    m, k = data.draw(st.integers(0, 20), label="m"), data.draw(st.integers(0, 70), label="k")
    x = leaf_in_layout(data, (m, k), dtype, device, "x").detach() * 3
    static = data.draw(st.sampled_from([None, 0.01, 0.5, 3.0]), label="static scale")
    static_t = None if static is None else torch.tensor([static], device=device)
    with sparqle.use_backend(backend):
        if kind == "int8":
            q, scale = sparqle.quantize_rows(x, static_t)
        else:
            q, scale = sparqle.fp8_quantize_rows(x, kind, static_t)
    if kind == "int8":
        expected_q, expected_scale = quantize_rows_rule(x, static_t)
        assert q.dtype == torch.int8 and torch.equal(q.cpu().float(), expected_q)
    else:
        expected_q, expected_scale = rule(x, kind, None if static is None else torch.full((m,), static))
        # Equal values: the Triton quantizer with a static scale rounds a tiny negative x
        # to +0 where torch's cast gives -0, the same value.
        assert q.dtype == kind and torch.equal(q.cpu().float(), expected_q.float())
    assert torch.equal(scale.cpu(), expected_scale)  # fp32, fp64 for fp64 x


@fuzzed
def test_fp8_training_linear_matches_oracle(data, device, backend):
    """Forward e4m3(x) x e4m3(W) and dgrad e5m2(dy) x e4m3(W^T rows), x and W in every layout."""
    rows, out, k = (data.draw(st.integers(1, 24), label=name) for name in ("rows", "out", "in"))
    x = leaf_in_layout(data, (rows, k), torch.float32, device, "x")
    w = leaf_in_layout(data, (out, k), torch.float32, device, "weight")
    bias = leaf_in_layout(data, (out,), torch.float32, device, "bias")
    dy = torch.randn(rows, out, device=device) * 1e-3
    with sparqle.use_backend(backend):
        y = sparqle.functional.fp8_training_linear(x, w, bias)
        (dx,) = torch.autograd.grad(y, x, dy)
    x64, w64 = deq(*rule(x, E4M3)), deq(*rule(w, E4M3))
    b64 = bias.detach().double().cpu()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), torch.float32, "y")
    dy64, wt64 = deq(*rule(dy, E5M2)), deq(*rule(w.detach().t(), E4M3))
    assert_close(dx, dy64 @ wt64.T, dy64.abs() @ wt64.abs().T, torch.float32, "dx")


# ---- window attention, partition, merge --------------------------------------------

@fuzzed
def test_window_attention_matches_oracle(data, device, backend):
    """q, k, v, bias and mask in every layout, with and without mask / mask_index, forward
    and gradients of q, k, v and bias."""
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    nb, heads = data.draw(st.integers(1, 4), label="windows"), data.draw(st.integers(1, 3), label="heads")
    n, d = data.draw(st.integers(1, 40), label="N"), data.draw(st.integers(1, 40), label="d")
    q, k, v = (leaf_in_layout(data, (nb, heads, n, d), dtype, device, name) for name in "qkv")
    bias = (leaf_in_layout(data, (heads, n, n), dtype, device, "bias")
            if data.draw(st.booleans(), label="with bias") else None)
    nw = data.draw(st.sampled_from([None] + [w for w in range(1, nb + 1) if nb % w == 0] + [-3]), label="nW")
    mask = mask_index = None
    if nw is not None:
        regions = torch.randint(0, 2, (abs(nw), n))
        mask = torch.where(regions[:, :, None] == regions[:, None, :], 0.0, -100.0).to(dtype=dtype, device=device)
        mask = laid_out(mask, data.draw(st.sampled_from(LAYOUTS), label="mask layout"))
        if nw < 0:
            mask_index = torch.randint(0, -nw, (nb,), device=device)
    scale = data.draw(st.floats(0.05, 2.0), label="scale")
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    with sparqle.use_backend(backend):
        out = sparqle.window_attention(q, k, v, bias=bias, mask=mask, mask_index=mask_index, scale=scale)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
    expected, p = attention_oracle(q, k, v, bias, mask, mask_index, scale)
    assert_close(out, expected, rounded_for_dot(p, dtype) @ v.detach().double().cpu().abs(), dtype, "out")
    oracle, bounds = attention_oracle_grads(q, k, v, bias, mask, mask_index, scale, dout)
    for name, g in zip(("dq", "dk", "dv", "dbias"), grads):
        assert_close(g, oracle[name], bounds[name], dtype, name)


@fuzzed
def test_window_partition_and_merge_match_oracle(data, device, backend):
    """x and windows in every layout; every window, or a drawn subset by ``index``."""
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    b, h, w, c = (data.draw(st.integers(1, 12), label=name) for name in "bhwc")
    ws = (data.draw(st.integers(1, 6), label="wh"), data.draw(st.integers(1, 6), label="ww"))
    shift = (data.draw(st.integers(0, ws[0] - 1), label="sh"), data.draw(st.integers(0, ws[1] - 1), label="sw"))
    nw = -(-h // ws[0]) * -(-w // ws[1])
    x = leaf_in_layout(data, (b, h, w, c), dtype, device, "x").detach()
    index = None
    if data.draw(st.booleans(), label="with index"):
        kept = data.draw(st.integers(1, nw), label="kept")
        index = torch.stack([torch.randperm(nw)[:kept] for _ in range(b)]).to(device)
    with sparqle.use_backend(backend):
        windows = sparqle.window_partition(x, ws, shift, index)
        new = laid_out(torch.randn_like(windows), data.draw(st.sampled_from(LAYOUTS), label="windows layout"))
        merged = sparqle.window_merge(new, x, ws, shift, index)
    expected = swin_partition(x, ws, shift)
    if index is not None:
        expected = expected[torch.arange(b)[:, None], index.cpu()]
    assert torch.equal(windows.cpu().double(), expected.reshape(windows.shape))
    assert torch.equal(merged.cpu().double(), merge_oracle(new, x, ws, shift, None if index is None else index.cpu()))


# ---- constructors refuse broken formats --------------------------------------------

def _set(t: torch.Tensor, position: int, value) -> torch.Tensor:
    """A copy of t with flat entry ``position`` (mod numel) set to ``value``."""
    t = t.clone()
    t.view(-1)[position % t.numel()] = value
    return t


def _corruptions(fw):
    """(name, arguments of the constructor) for broken copies of the valid format fw; each
    is invalid whatever fw's values are (given fw has at least one stored entry)."""
    if isinstance(fw, CSR):
        m, k = fw.shape
        args = {"crow_indices": fw.crow_indices, "col_indices": fw.col_indices, "values": fw.values, "shape": fw.shape}
        yield "col past k", {**args, "col_indices": lambda p: _set(fw.col_indices, p, k)}
        yield "negative col", {**args, "col_indices": lambda p: _set(fw.col_indices, p, -1)}
        yield "truncated values", {**args, "values": lambda p: fw.values[:-1]}
        yield "truncated col", {**args, "col_indices": lambda p: fw.col_indices[:-1]}
        yield "crow decreasing", {**args, "crow_indices": lambda p: _set(fw.crow_indices, 1 + p % m, -1)}
        yield "crow past nnz", {**args, "crow_indices": lambda p: _set(fw.crow_indices, p, fw.nnz + 1)}
        yield "float col", {**args, "col_indices": lambda p: fw.col_indices.float()}
        yield "2-D values", {**args, "values": lambda p: fw.values[None]}
        yield "float shape", {**args, "shape": lambda p: (m + 0.5, k)}
        yield "col past int32", {**args, "shape": lambda p: (m, 2**31 + 8),
                                 "col_indices": lambda p: _set(fw.col_indices.long(), p, 2**31 + 3)}
    elif isinstance(fw, BlockedELL):
        cols = -(-fw.shape[1] // fw.block_size)
        args = {"ell_cols": fw.ell_cols, "values": fw.values, "shape": fw.shape}
        yield "block column past k", {**args, "ell_cols": lambda p: _set(fw.ell_cols, p, cols)}
        yield "block column below -1", {**args, "ell_cols": lambda p: _set(fw.ell_cols, p, -2)}
        yield "repeated block column", {**args, "ell_cols": lambda p: torch.zeros_like(fw.ell_cols)
                                        if fw.ell_cols.shape[1] > 1 else fw.ell_cols[:, :0]}
        yield "truncated values", {**args, "values": lambda p: fw.values[:-1]}
        yield "block size 8", {**args, "values": lambda p: fw.values[..., :8, :8]}
        yield "float ell_cols", {**args, "ell_cols": lambda p: fw.ell_cols.float()}
    elif isinstance(fw, SemiStructured):
        args = {"values": fw.values, "meta": fw.meta, "shape": fw.shape, "n": fw.n, "m": fw.m}
        if (fw.n, fw.m) != (1, 4):  # 2-bit positions of 3 are valid for 1:4
            yield "all-ones meta word", {**args, "meta": lambda p: _set(fw.meta, p, -1)}
        yield "truncated values", {**args, "values": lambda p: fw.values[:, :-1]}
        yield "int64 meta", {**args, "meta": lambda p: fw.meta.long()}
        yield "pattern 3:4", {**args, "n": lambda p: 3}
    elif isinstance(fw, Int4Weight):
        args = {"packed": fw.packed, "scales": fw.scales, "zeros": fw.zeros, "shape": fw.shape,
                "group_size": fw.group_size, "symmetric": fw.symmetric}
        for bad in (0.0, -0.5, math.nan, math.inf):
            yield f"scale {bad}", {**args, "scales": lambda p, bad=bad: _set(fw.scales, p, bad)}
        for bad in (-1.0, 16.0, math.nan):
            yield f"zero point {bad}", {**args, "zeros": lambda p, bad=bad: _set(fw.zeros, p, bad)}
        yield "int8 packed", {**args, "packed": lambda p: fw.packed.view(torch.int8)}
        yield "truncated packed", {**args, "packed": lambda p: fw.packed[:-1]}
        yield "float group size", {**args, "group_size": lambda p: float(fw.group_size)}
        yield "symmetric with another zero", {**args, "symmetric": lambda p: True,
                                              "zeros": lambda p: _set(fw.zeros, p, 7.0)}
    elif isinstance(fw, Int8Weight):
        args = {"qweight": fw.qweight, "scales": fw.scales}
        for bad in (0.0, -0.5, math.nan, math.inf):
            yield f"scale {bad}", {**args, "scales": lambda p, bad=bad: _set(fw.scales, p, bad)}
        yield "-128", {**args, "qweight": lambda p: _set(fw.qweight, p, -128)}
        yield "uint8 qweight", {**args, "qweight": lambda p: fw.qweight.view(torch.uint8)}
        yield "truncated scales", {**args, "scales": lambda p: fw.scales[:-1]}
    else:
        args = {"qweight": fw.qweight, "scales": fw.scales, "dtype": fw.dtype}
        for bad in (0.0, -0.5, math.nan, math.inf):
            yield f"scale {bad}", {**args, "scales": lambda p, bad=bad: _set(fw.scales, p, bad)}
        yield "float16 scales", {**args, "scales": lambda p: fw.scales.half()}
        yield "int8 qweight", {**args, "qweight": lambda p: fw.qweight.view(torch.int8)}
        yield "N + 1 scales", {**args, "scales": lambda p: fw.scales.reshape(-1)[:1].expand(fw.shape[0] + 1).clone()}


@pytest.mark.parametrize("fmt", ["csr", "bell", "n:m", "int4", "int8", "fp8"])
@fuzz("torch", examples=60)
@given(data=st.data())
def test_constructors_refuse_broken_formats(fmt, data):
    seed(data)
    out, k = data.draw(st.integers(1, 40), label="out"), data.draw(st.integers(1, 48), label="in")
    w = torch.randn(out, k, dtype=data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype"))
    fw = _weight(data, "n:m" if fmt == "n:m" else fmt, w)
    if isinstance(fw, CSR) and fw.nnz == 0:
        fw = CSR.from_dense(w)
    name, args = data.draw(st.sampled_from(list(_corruptions(fw))), label="corruption")
    position = data.draw(st.integers(0, 2**20), label="position")
    args = {key: value(position) if callable(value) else value for key, value in args.items()}
    with pytest.raises((ValueError, TypeError)):
        type(fw)(**args)


@pytest.mark.parametrize("quantize", [sparqle.quantize_rows, sparqle.fp8_quantize_rows])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, 1e39])
def test_static_scales_must_be_finite_and_positive(quantize, bad):
    """1e39 is finite in float64 but Inf in the fp32 the kernels use."""
    with pytest.raises(ValueError, match="static_scale must be finite and > 0"):
        quantize(torch.randn(3, 8), static_scale=torch.tensor([bad], dtype=torch.float64))
