"""FP8 linear layers: the quantization rules (checked bit for bit and against float64
nearest rounding), the GEMM on every (device, backend) against the float64 oracle of its
quantized operands, SQNR against the float layer, FP8 training (its gradients against the
oracle, and its loss curve against fp32 training; its registered op's opcheck and compile),
the quantizer's and scaled GEMM's opcheck, the module, convert, and bad input (the contract
of fp8_linear: gradients, gradcheck, opcheck, compile, state_dict: tests/test_contract.py)."""

import pytest
import torch
from torch import nn

import sparqle
from sparqle import FP8Weight
from sparqle.formats.int4 import sqnr_db
from sparqle.functional import fp8_training_linear
from sparqle.kernels.triton import fp8_linear as fp8_kernels
from sparqle.nn import FP8Linear

from ._oracle import NO_SCHEMA, assert_close, assert_no_mutation_or_alias
from ._oracle import fp8_rows_rule as rule
from .conftest import device_backends

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA, EMIN = {E4M3: 3, E5M2: 2}, {E4M3: -6, E5M2: -14}


def assert_nearest(q: torch.Tensor, v64: torch.Tensor):
    """Each FP8 value q is a nearest FP8 value to v64 (float64), up to fp32 rounding of v."""
    fmax = torch.finfo(q.dtype).max
    v64 = v64.clamp(-fmax, fmax)
    mag = v64.abs().clamp(min=2.0 ** EMIN[q.dtype])
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA[q.dtype])
    err = (q.double().cpu() - v64).abs()
    assert (err <= ulp / 2 + v64.abs() * 2.0 ** -23).all(), float((err - ulp / 2).max())


def deq(q, scale):
    return q.double().cpu() * scale.double().cpu().reshape(-1, 1)


@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_weight_quantization_rules(fp8, granularity, dtype):
    w = (torch.randn(6, 50, dtype=torch.float64) * torch.logspace(-3, 3, 6, dtype=torch.float64)[:, None]).to(dtype)
    w[3] = 0
    qw = FP8Weight.from_float(w, fp8, granularity)
    fmax = torch.finfo(fp8).max
    if granularity == "row":
        expected = w.abs().amax(1).float() / fmax
        expected[3] = 1
        column = qw.scales.double()[:, None]
    else:
        expected = w.abs().amax().float() / fmax
        column = qw.scales.double()
    assert qw.scales.dtype == torch.float32 and torch.equal(qw.scales, expected)
    assert qw.qweight.dtype == fp8 and qw.granularity == granularity and qw.dtype == dtype
    assert torch.isfinite(qw.qweight.float()).all() and qw.qweight.float().abs().max() == fmax
    assert (qw.qweight[3].float() == 0).all()
    assert_nearest(qw.qweight, w.double() / column)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(qw.dequantize(), (qw.qweight.to(cdt) * column.to(cdt)).to(dtype))
    assert qw.shape == (6, 50) and qw.to("cpu").dtype == dtype and qw.to(dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# 1030: past a block of 1024; x^T (rows as columns in memory, the column-wise kernel) of
# (130, 9): 130 past its test config's BLOCK_K = 64 (the second read), 9 rows of one tile.
@pytest.mark.parametrize("m,k", [(1, 1), (7, 70), (3, 130), (2, 1030), (130, 9)])
def test_quantize_rows_is_exact(device_backend, fp8, dtype, m, k):
    device, backend = device_backend
    x = (torch.randn(m, k, device=device) * 3).to(dtype)
    x[0] = 0
    with sparqle.use_backend(backend):
        q, scale = sparqle.fp8_quantize_rows(x, fp8)
        static = torch.tensor([0.01], device=device)
        q_static, scale_static = sparqle.fp8_quantize_rows(x, fp8, static)
        q_t, scale_t = sparqle.fp8_quantize_rows(x.t(), fp8)  # strided: each column of x
    expected_q, expected_scale = rule(x, fp8)
    assert q.dtype == fp8 and torch.equal(q.cpu().view(torch.uint8), expected_q.view(torch.uint8))
    assert torch.equal(scale.cpu(), expected_scale)
    assert_nearest(q, x.double().cpu() / scale.double().cpu()[:, None])
    expected_static, _ = rule(x, fp8, torch.full((m,), 0.01))
    assert torch.equal(q_static.cpu().view(torch.uint8), expected_static.view(torch.uint8))
    assert torch.isfinite(q_static.float()).all()  # saturated, not NaN
    assert torch.equal(scale_static.cpu(), torch.full((m,), 0.01))
    expected_t, expected_scale_t = rule(x.t(), fp8)
    assert torch.equal(q_t.cpu().view(torch.uint8), expected_t.view(torch.uint8))
    assert torch.equal(scale_t.cpu(), expected_scale_t)


def test_rounding_carries_into_the_next_binade():
    """Values just under a power of two round up across the binade (the case Triton's
    interpreter cast gets wrong), and ties go to even."""
    for fp8 in FP8:
        x = torch.tensor([[124.7, 127.9, -31.1, 1.0 + 2.0 ** -(MANTISSA[fp8] + 1), 3.0 * 2.0 ** -(MANTISSA[fp8] + 1),
                           torch.finfo(fp8).max]])
        for _, backend in device_backends():
            with sparqle.use_backend(backend):
                q, scale = sparqle.fp8_quantize_rows(x, fp8, torch.ones(1))
            assert torch.equal(q.view(torch.uint8), x.to(fp8).view(torch.uint8)), (backend, q.float())


SHAPES = [(1, 1, 1), (5, 33, 70), (17, 8, 70), (33, 19, 77)]


@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fp8,granularity", [(E4M3, "row"), (E5M2, "tensor")], ids=str)
def test_linear_matches_oracle(device_backend, m, n, k, dtype, fp8, granularity):
    """M <= 16 is weight-only (x as is); larger M quantizes x per token to e4m3."""
    device, backend = device_backend
    qw = FP8Weight.from_float(torch.randn(n, k, dtype=dtype), fp8, granularity).to(device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, qw, bias)
    w64 = deq(qw.qweight, qw.scales.expand(n))
    x64 = deq(*rule(x, E4M3)) if m > 16 else x.double().cpu()
    b64 = bias.double().cpu()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_scaled_mm_tensor_wise_mixed_and_strided(device_backend, out_dtype):
    """e5m2 x e4m3, tensor-wise a scale, row-wise b scale, a read through a transpose."""
    device, backend = device_backend
    a = (torch.randn(40, 21, device=device) * 100).to(E5M2).t()  # [21, 40], strides (1, 21)
    b = torch.randn(13, 40, device=device).to(E4M3)
    a_scale, b_scale = torch.tensor([0.5], device=device), torch.rand(13, device=device) + 0.5
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.fp8_scaled_mm(a, a_scale, b, b_scale, None, out_dtype)
    a64, b64 = a.double().cpu() * 0.5, deq(b, b_scale)
    assert_close(y, a64 @ b64.T, a64.abs() @ b64.abs().T, out_dtype, "y")


def launch_flags(monkeypatch, kernel, flag: str) -> list:
    """The values of constexpr ``flag`` that each launch of the autotuned ``kernel`` passes,
    appended as the launches happen."""
    seen, run = [], kernel.run

    def recording(*args, **kwargs):
        seen.append(kwargs[flag])
        return run(*args, **kwargs)
    monkeypatch.setattr(kernel, "run", recording)
    return seen


def _operand(rows: int, k: int, dtype: torch.dtype, layout: str, device) -> torch.Tensor:
    """A [rows, k] operand: contiguous, or a view 1 element past a 16-byte-aligned address
    (its row stride, k + 16 elements, a multiple of 16 bytes: only the address is
    misaligned), or a transpose (stride 1 along rows)."""
    if layout == "misaligned":
        return torch.randn(rows, k + 16, device=device).to(dtype)[:, 1:k + 1]
    if layout == "transposed":
        return torch.randn(k, rows, device=device).to(dtype).t()
    return torch.randn(rows, k, device=device).to(dtype)


# (K, a's layout, b's layout) -> whether the GEMM can load both operands through TMA: K = 80
# is 5 x 16 bytes a row in FP8 (and past the test config's BLOCK_K = 32: a partial K tile);
# K = 76 rows are not a multiple of 16 bytes in FP8 nor in bf16.
TMA_LAYOUTS = {(80, "contiguous", "contiguous"): True, (76, "contiguous", "contiguous"): False,
               (80, "misaligned", "contiguous"): False, (80, "contiguous", "misaligned"): False,
               (80, "transposed", "contiguous"): False}


@pytest.mark.parametrize("k,a_layout,b_layout", list(TMA_LAYOUTS), ids=str)
@pytest.mark.parametrize("a_dtype", [E4M3, torch.bfloat16], ids=str)
def test_scaled_mm_through_tma_and_through_pointers(monkeypatch, k, a_layout, b_layout, a_dtype):
    """On every Triton device (the interpreter emulates TMA), the GEMM loads its operands
    through TMA descriptors when both allow it, else through pointers, chosen per call; each
    way matches the oracle with M and N off every tile, FP8 x FP8 and weight-only."""
    devices = [device for device, backend in device_backends() if backend == "triton"]
    if not devices:
        pytest.skip("no Triton backend here")
    a_fp8 = a_dtype == E4M3
    used = launch_flags(monkeypatch, fp8_kernels._fp8_scaled_mm_kernel if a_fp8 else fp8_kernels._weight_only_mm_kernel,
                        "USE_TMA")
    for device in devices:
        a, b = _operand(37, k, a_dtype, a_layout, device), _operand(21, k, E4M3, b_layout, device)
        a_scale = torch.rand(37, device=device) + 0.5 if a_fp8 else None
        b_scale, bias = torch.rand(21, device=device) + 0.5, torch.randn(21, device=device)
        with sparqle.use_backend("triton"):
            y = torch.ops.sparqle.fp8_scaled_mm(a, a_scale, b, b_scale, bias, torch.float32)
        on_hopper = torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)
        tma = TMA_LAYOUTS[k, a_layout, b_layout] and on_hopper
        assert used.pop() == tma
        a64 = deq(a, a_scale) if a_fp8 else a.double().cpu()
        b64, bias64 = deq(b, b_scale), bias.double().cpu()
        assert_close(y, a64 @ b64.T + bias64, a64.abs() @ b64.abs().T + bias64.abs(), torch.float32, "y")


def test_float64_runs_on_the_torch_path():
    qw = FP8Weight.from_float(torch.randn(9, 30, dtype=torch.float64))
    x = torch.randn(20, 30, dtype=torch.float64)
    y = sparqle.linear(x, qw)
    x64 = deq(*rule(x, E4M3))
    w64 = deq(qw.qweight, qw.scales)
    assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, torch.float64, "y")


def test_sqnr_against_the_float_layer():
    w, x = torch.randn(256, 1024), torch.randn(64, 1024)
    qw = FP8Weight.from_float(w, E4M3, "row")
    assert sqnr_db(w, qw.dequantize()) >= 25
    assert sqnr_db(x @ w.T, sparqle.linear(x, qw)) >= 25


def test_training_gradients_match_the_oracle(device_backend):
    """Forward e4m3 x e4m3, dgrad e5m2(dy) x e4m3(W^T rows), wgrad e5m2(dy^T rows) x
    e4m3(x^T rows), each against float64 products of the rule's quantized operands."""
    device, backend = device_backend
    x = torch.randn(20, 37, device=device, requires_grad=True)
    w = torch.randn(24, 37, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    dy = torch.randn(20, 24, device=device) * 1e-3
    with sparqle.use_backend(backend):
        y = fp8_training_linear(x, w, bias)
        y.backward(dy)
    x64, w64 = deq(*rule(x, E4M3)), deq(*rule(w, E4M3))
    b64 = bias.detach().double().cpu()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), torch.float32, "y")
    dy64, wt64 = deq(*rule(dy, E5M2)), deq(*rule(w.t(), E4M3))
    assert_close(x.grad, dy64 @ wt64.T, dy64.abs() @ wt64.abs().T, torch.float32, "dx")
    dyt64, xt64 = deq(*rule(dy.t(), E5M2)), deq(*rule(x.t(), E4M3))
    assert_close(w.grad, dyt64 @ xt64.T, dyt64.abs() @ xt64.abs().T, torch.float32, "dW")
    assert_close(bias.grad, dy.double().cpu().sum(0), dy.double().cpu().abs().sum(0), torch.float32, "dbias")


def test_training_with_bf16_activations_and_fp32_master_weight(device_backend):
    device, backend = device_backend
    x = torch.randn(3, 20, 37, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(24, 37, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    with sparqle.use_backend(backend):
        y = fp8_training_linear(x, w, bias)
        y.float().pow(2).sum().backward()
    assert y.shape == (3, 20, 24) and y.dtype == torch.bfloat16
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    x64, w64 = deq(*rule(x.reshape(60, 37), E4M3)), deq(*rule(w, E4M3))
    b64 = bias.detach().double().cpu()
    assert_close(y.reshape(60, 24), x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), torch.bfloat16, "y")
    dy = 2 * y.detach().float().reshape(60, 24)
    dyt64, xt64 = deq(*rule(dy.t(), E5M2)), deq(*rule(x.reshape(60, 37).t(), E4M3))
    assert_close(w.grad, dyt64 @ xt64.T, dyt64.abs() @ xt64.abs().T, torch.float32, "dW")


def train_mlp(fp8: bool, steps: int = 200):
    """A 3-layer MLP regressing a fixed random teacher MLP on 16 -> 1, Adam, batch 64; the
    loss every step."""
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    student = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    if fp8:
        sparqle.convert(student, "fp8", training=True)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=data)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def window_means(losses, width=20):
    return [sum(losses[i:i + width]) / width for i in range(0, len(losses), width)]


def test_fp8_training_tracks_fp32_training():
    """Losses averaged over windows of 20 steps: FP8 within 15% of fp32 in every window,
    and both fall below a tenth of their first window."""
    reference, fp8 = window_means(train_mlp(False)), window_means(train_mlp(True))
    for i, (r, f) in enumerate(zip(reference, fp8)):
        assert abs(f - r) <= 0.15 * r, (i, reference, fp8)
    assert fp8[-1] < 0.1 * fp8[0] and reference[-1] < 0.1 * reference[0], (reference, fp8)


def test_opcheck_quantize_rows_and_scaled_mm():
    """(fp8_linear itself: tests/test_contract.py, with every other contract check.)"""
    qw = FP8Weight.from_float(torch.randn(20, 70))
    x, bias = torch.randn(20, 70), torch.randn(20)
    q, s = sparqle.fp8_quantize_rows(x)
    calls = [(torch.ops.sparqle.fp8_quantize_rows.default, (x, None, E5M2)),
             (torch.ops.sparqle.fp8_quantize_rows.default, (x, torch.ones(1), E4M3)),
             (torch.ops.sparqle.fp8_scaled_mm.default, (q, s, qw.qweight, qw.scales, bias, torch.float32)),
             (torch.ops.sparqle.fp8_scaled_mm.default, (x, None, qw.qweight, qw.scales[:1], None, torch.float32))]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=NO_SCHEMA)
        assert_no_mutation_or_alias(op, args)


@pytest.mark.parametrize("with_bias", [True, False])
def test_training_op_opcheck_and_compile(with_bias):
    """sparqle::fp8_training_linear is a registered op: opcheck (float inputs, so every
    check runs, test_schema included), its fake impl, and torch.compile(fullgraph=True) of
    functional.fp8_training_linear giving the eager y, dx and dW bit for bit (the FP8 ops are
    opaque to it) and dbias up to summation order."""
    x = torch.randn(5, 70, requires_grad=True)
    w = torch.randn(20, 70, requires_grad=True)
    bias = torch.randn(20, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.sparqle.fp8_training_linear.default, (x, w, bias))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.sparqle.fp8_training_linear(torch.empty(5, 70, dtype=torch.bfloat16),
                                                     torch.empty(20, 70), None)
    assert fake.shape == (5, 20) and fake.dtype == torch.bfloat16
    leaves = [x, w] + ([bias] if with_bias else [])
    dy = torch.randn(5, 20)
    expected = fp8_training_linear(x, w, bias)
    expected_grads = torch.autograd.grad(expected, leaves, dy)
    torch._dynamo.reset()
    got = torch.compile(fp8_training_linear, fullgraph=True)(x, w, bias)
    got_grads = torch.autograd.grad(got, leaves, dy)
    assert torch.equal(got, expected)
    assert torch.equal(got_grads[0], expected_grads[0]) and torch.equal(got_grads[1], expected_grads[1])
    if with_bias:  # dy.sum(0), which Inductor sums in its own order
        torch.testing.assert_close(got_grads[2], expected_grads[2])


def test_training_op_takes_no_gradient_it_is_not_asked_for():
    """Only the gradients asked for are computed: x alone, the weight alone."""
    x, w = torch.randn(4, 33), torch.randn(6, 33)
    for leaf in ("x", "weight"):
        xi, wi = x.clone().requires_grad_(leaf == "x"), w.clone().requires_grad_(leaf == "weight")
        y = torch.ops.sparqle.fp8_training_linear(xi, wi, None)
        y.sum().backward()
        assert (xi.grad is not None) == (leaf == "x") and (wi.grad is not None) == (leaf == "weight")


def test_module_convert_and_dtypes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(20, 64)
    reference = model(x)
    sparqle.convert(model, "fp8")
    assert all(isinstance(model[i], FP8Linear) for i in (0, 2)) and "granularity=row" in repr(model[0])
    assert sqnr_db(reference, model(x)) > 25
    bits, scales = model[0].qweight.clone(), model[0].scales.clone()
    model.to(torch.bfloat16)  # the FP8 bits (uint8) and the fp32 scales are left alone
    assert torch.equal(model[0].qweight, bits) and torch.equal(model[0].scales, scales)
    assert model(x.bfloat16()).dtype == torch.bfloat16 and model[0].bias.dtype == torch.bfloat16
    tiny = FP8Linear.from_linear(nn.Linear(8, 4))
    tiny.scales.fill_(1e-9)  # 0 in fp16
    assert tiny.half().scales.dtype == torch.float32 and (tiny.scales == torch.tensor(1e-9)).all()
    tensor_wise = FP8Linear.from_linear(nn.Linear(64, 48), dtype=E5M2, granularity="tensor")
    assert tensor_wise(x).shape == (20, 48) and tensor_wise.scales.dim() == 0


class TestBadInput:
    def test_from_float(self):
        with pytest.raises(ValueError, match="w must be 2-D"):
            FP8Weight.from_float(torch.randn(4, 4, 4))
        with pytest.raises(TypeError, match="w must be a floating-point tensor"):
            FP8Weight.from_float(torch.ones(4, 4, dtype=torch.int32))
        w = torch.randn(4, 8)
        w[1, 1] = float("inf")
        with pytest.raises(ValueError, match="w holds NaN or Inf"):
            FP8Weight.from_float(w)
        with pytest.raises(ValueError, match="dtype must be torch.float8_e4m3fn"):
            FP8Weight.from_float(torch.randn(4, 8), dtype="e3m4")
        with pytest.raises(ValueError, match="dtype must be torch.float8_e4m3fn"):
            FP8Weight.from_float(torch.randn(4, 8), dtype=torch.int8)
        with pytest.raises(ValueError, match="granularity must be one of"):
            FP8Weight.from_float(torch.randn(4, 8), granularity="column")

    def test_torch_without_float8(self, monkeypatch):
        monkeypatch.delattr(torch, "float8_e4m3fn")
        with pytest.raises(TypeError, match="dtype='e4m3': this torch .* has no float8 dtypes"):
            FP8Weight.from_float(torch.randn(4, 8), dtype="e4m3")
        with pytest.raises(TypeError, match="has no float8 dtypes"):
            sparqle.fp8_quantize_rows(torch.randn(4, 8))

    def test_constructor(self):
        q = torch.zeros(4, 8).to(E4M3)
        with pytest.raises(ValueError, match="qweight.dtype must be"):
            FP8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))
        with pytest.raises(TypeError, match="scales must be float32"):
            FP8Weight(q, torch.ones(4, dtype=torch.float16))
        with pytest.raises(ValueError, match=r"scales \[N\]"):
            FP8Weight(q, torch.ones(5))
        with pytest.raises(ValueError, match="scales is on meta"):
            FP8Weight(q, torch.ones(4, device="meta"))
        with pytest.raises(TypeError, match="dtype must be one of"):
            FP8Weight(q, torch.ones(4), torch.int32)

    def test_linear(self):
        qw = FP8Weight.from_float(torch.randn(8, 64))
        with pytest.raises(TypeError, match="x has dtype torch.int8"):
            sparqle.linear(torch.ones(2, 64, dtype=torch.int8), qw)
        with pytest.raises(ValueError, match="x must have w.shape"):
            sparqle.fp8_linear(torch.randn(2, 63), qw)
        with pytest.raises(ValueError, match="bias must have shape"):
            sparqle.linear(torch.randn(2, 64), qw, torch.randn(9))
        with pytest.raises(ValueError, match="x is on meta but w is on cpu"):
            sparqle.linear(torch.randn(2, 64, device="meta"), qw)
        with pytest.raises(TypeError, match="bias has dtype torch.float16"):
            sparqle.linear(torch.randn(2, 64), qw, torch.randn(8, dtype=torch.float16))
        with pytest.raises(TypeError, match="w must be a sparqle.FP8Weight"):
            sparqle.fp8_linear(torch.randn(2, 64), torch.randn(8, 64))
        with pytest.raises(ValueError, match="static_scale must be a 1-element tensor"):
            sparqle.fp8_quantize_rows(torch.randn(2, 64), static_scale=torch.ones(2))
        with pytest.raises(ValueError, match="x must be 2-D"):
            sparqle.fp8_quantize_rows(torch.randn(64))
        with pytest.raises(ValueError, match="x must have weight.shape"):
            fp8_training_linear(torch.randn(2, 63), torch.randn(8, 64))
        with pytest.raises(ValueError, match="bias must have shape"):
            fp8_training_linear(torch.randn(2, 64), torch.randn(8, 64), torch.randn(7))
        with pytest.raises(TypeError, match="weight must be floating point"):
            fp8_training_linear(torch.randn(2, 64), torch.ones(8, 64, dtype=torch.int32))
        with pytest.raises(ValueError, match="x is on meta but weight is on cpu"):
            fp8_training_linear(torch.randn(2, 64, device="meta"), torch.randn(8, 64))

    def test_module(self):
        with pytest.raises(TypeError, match="weight must be a sparqle.FP8Weight"):
            FP8Linear(torch.randn(8, 64))
        with pytest.raises(ValueError, match="training=True runs the fixed recipe"):
            FP8Linear.from_linear(nn.Linear(8, 4), dtype="e5m2", training=True)
        with pytest.raises(ValueError, match="granularity must be one of"):
            FP8Linear.from_linear(nn.Linear(8, 4), granularity="channel")
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            FP8Linear.from_linear(nn.Linear(8, 4))(torch.ones(2, 8, dtype=torch.long))

    def test_triton_takes_no_float64(self):
        if not any(b == "triton" for _, b in device_backends()):
            return
        qw = FP8Weight.from_float(torch.randn(8, 64, dtype=torch.float64))
        with sparqle.use_backend("triton"):
            with pytest.raises(ValueError, match="not torch.float64"):
                sparqle.linear(torch.randn(2, 64, dtype=torch.float64), qw)


def test_empty_batch():
    qw = FP8Weight.from_float(torch.randn(8, 16))
    for _, backend in device_backends():
        with sparqle.use_backend(backend):
            assert sparqle.linear(torch.randn(0, 16), qw).shape == (0, 8)
            assert sparqle.linear(torch.randn(2, 0, 16), qw).shape == (2, 0, 8)
