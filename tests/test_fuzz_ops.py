"""Every op (torch.ops.sparqle.*) on every (device, backend) that runs
here, with each tensor argument laid out contiguous, strided (every dimension stepping over
poisoned gaps), transposed (stored in reversed dimension order) or expanded (stride 0 along
one dimension, for arguments whose values may repeat), the gradient fed to the backward
included: against float64 math written here, on shapes hypothesis draws (empty dimensions
included). A kernel that reads an argument as contiguous reads the poison or past the end."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparqle
from sparqle import CSR, BlockedELL, FP8Weight, Int4Weight, Int8Weight, SemiStructured
from sparqle.formats._checks import cdiv
from sparqle.formats.nm import PATTERNS

from ._oracle import assert_close, fp8_rows_rule, int4_stored_byte, int8_rows_rule, random_sparse
from .conftest import device_backends
from .test_window_attention import oracle_grads, swin_mask
from .test_window_partition import pixel_map

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
F32 = torch.float32
ALL = ("contiguous", "strided", "transposed", "expanded")
STRUCTURE = ("contiguous", "strided", "transposed")  # index tensors: their values are the structure
FUZZ = settings(max_examples=6, deadline=None)
BACKENDS = pytest.mark.parametrize("device,backend", device_backends(), ids=lambda p: str(p))


def laid_out(t: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    """``t`` in ``layout``; "expanded" repeats t's first slice along ``dim`` (stride 0), so
    the values change: the oracle reads the tensor returned."""
    if layout == "strided":
        buf = t.new_empty([2 * s for s in t.shape])
        buf.view(torch.uint8).fill_(255) if t.element_size() == 1 else buf.fill_(
            float("nan") if t.is_floating_point() else -1)  # NaN (FP8's 0xff too), or -1
        view = buf[tuple(slice(None, None, 2) for _ in t.shape)]
        return view.copy_(t)
    if layout == "transposed":
        order = list(reversed(range(t.dim())))
        return t.permute(order).contiguous().permute(order)
    if layout == "expanded" and t.dim() and t.shape[dim] > 0:
        return t.narrow(dim, 0, 1).expand(t.shape)
    return t.contiguous()


def draw_layouts(data, tensors: dict, kinds: dict) -> dict:
    """The tensors re-laid out, each in a layout drawn from ``kinds[name]`` (default ALL)."""
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        layout = data.draw(st.sampled_from(kinds.get(name, ALL)), label=f"{name} layout")
        dim = data.draw(st.integers(0, max(0, t.dim() - 1)), label=f"{name} dim")
        out[name] = laid_out(t, layout, dim)
    return out


def d64(t):
    return None if t is None else t.detach().double().cpu()


def seeded(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))


def maybe_bias(data, n):
    return torch.randn(n) if data.draw(st.booleans(), label="bias") else None


def run_grads(out, grad, leaves):
    """Gradients of ``(out * grad).sum()`` for the leaves (None kept)."""
    present = [t for t in leaves if t is not None]
    got = torch.autograd.grad(out, present, grad, allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in leaves]


def with_grad(args: dict, names) -> dict:
    """``args`` with fresh leaves (same layout) that require grad for ``names``."""
    out = dict(args)
    for name in names:
        if args.get(name) is not None:
            out[name] = args[name].detach().requires_grad_(True)
    return out


def check_linear_grads(y, args, data, w64, x_used=None, what=""):
    """dx = g @ W (straight through quantization), dbias = sum of g, for a g drawn in any
    layout: the backward's own input."""
    g = draw_layouts(data, {"g": torch.randn(y.shape)}, {})["g"]
    dx, db = run_grads(y, g, [args["x"], args.get("bias")])
    g64 = d64(g)
    assert_close(dx, g64 @ w64, g64.abs() @ w64.abs(), F32, f"{what} dx")
    if db is not None:
        assert_close(db, g64.sum(0), g64.abs().sum(0), F32, f"{what} dbias")
    return g64


def linear_oracle(x64, w64, bias):
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64) if bias is None else d64(bias)
    return x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs()


def sizes(data, m_max=20, n_max=24, k_max=40, k_min=0):
    draw = data.draw
    return (draw(st.integers(0, m_max), label="M"), draw(st.integers(0, n_max), label="N"),
            draw(st.integers(k_min, k_max), label="K"))


# ---- quantized weights --------------------------------------------------------------------

@BACKENDS
@FUZZ
@given(data=st.data())
def test_int8_linear(device, backend, data):
    seeded(data)
    m, n, k = sizes(data)
    w = Int8Weight.from_float(torch.randn(n, k))
    act = data.draw(st.booleans(), label="W8A8")
    bias = maybe_bias(data, n)
    a = with_grad(draw_layouts(data, {"x": torch.randn(m, k), "qweight": w.qweight, "scales": w.scales,
                                      "bias": bias}, {}), ["x", "bias"])
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.int8_linear(a["x"], a["qweight"], a["scales"], a["bias"], act)
    w64 = d64(a["qweight"]) * d64(a["scales"])[:, None]
    x64 = (lambda q, s: d64(q) * d64(s)[:, None])(*int8_rows_rule(a["x"])) if act else d64(a["x"])
    assert_close(y, *linear_oracle(x64, w64, a["bias"]), F32, "y")
    with sparqle.use_backend(backend):
        check_linear_grads(y, a, data, w64)


@BACKENDS
@FUZZ
@given(data=st.data())
def test_int8_quantize_rows(device, backend, data):
    seeded(data)
    m, _, k = sizes(data)
    static = torch.rand(1) + 0.01 if data.draw(st.booleans(), label="static") else None
    a = draw_layouts(data, {"x": torch.randn(m, k) * 5, "static": static}, {})
    with sparqle.use_backend(backend):
        q, scale = torch.ops.sparqle.int8_quantize_rows(a["x"], a["static"])
    expected_q, expected_scale = int8_rows_rule(a["x"], a["static"])
    assert q.is_contiguous() and torch.equal(q.float(), expected_q)
    assert torch.equal(scale, expected_scale)


def unpack_int4(packed, k):
    """q [N, k] from ``packed`` as docs/int4.md lays it out (``int4_stored_byte``)."""
    rows = packed[:, int4_stored_byte(torch.arange(packed.shape[1]))]
    q = torch.stack([rows & 15, rows >> 4], dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])
    return q[:, :k].double()


def int4_dense(packed, scales, zeros, width, k):
    group = torch.arange(k) // max(1, width)
    return (unpack_int4(d64(packed).long(), k) - d64(zeros)[:, group]) * d64(scales)[:, group]


@BACKENDS
@FUZZ
@given(data=st.data())
def test_int4_linear(device, backend, data):
    seeded(data)
    m, n, k = sizes(data, k_min=1)
    w = Int4Weight.from_float(torch.randn(n, k), data.draw(st.sampled_from([32, -1]), label="group"))
    bias = maybe_bias(data, n)
    a = with_grad(draw_layouts(data, {"x": torch.randn(m, k), "packed": w.packed, "scales": w.scales,
                                      "zeros": w.zeros, "bias": bias}, {}), ["x", "bias"])
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.int4_linear(a["x"], a["packed"], a["scales"], a["zeros"], a["bias"],
                                          w.group_width)
        dense = torch.ops.sparqle.int4_dequantize(a["packed"], a["scales"], a["zeros"], w.group_width, k)
    w64 = int4_dense(a["packed"], a["scales"], a["zeros"], w.group_width, k)
    assert_close(dense, w64, w64.abs(), F32, "dequantize")
    assert_close(y, *linear_oracle(d64(a["x"]), w64, a["bias"]), F32, "y")
    with sparqle.use_backend(backend):
        check_linear_grads(y, a, data, w64)


def fp8_deq(q, scale):
    return d64(q) * d64(scale).reshape(-1, 1)


@BACKENDS
@FUZZ
@given(data=st.data())
def test_fp8_linear_and_scaled_mm(device, backend, data):
    """M <= 16 multiplies x as is, M > 16 quantizes it to e4m3 first."""
    seeded(data)
    m, n, k = sizes(data)
    fp8 = data.draw(st.sampled_from([E4M3, E5M2]), label="fp8")
    w = FP8Weight.from_float(torch.randn(n, k), fp8, data.draw(st.sampled_from(["row", "tensor"])))
    bias = maybe_bias(data, n)
    a = with_grad(draw_layouts(data, {"x": torch.randn(m, k), "qweight": w.qweight,
                                      "scales": w.scales.reshape(-1), "bias": bias}, {}), ["x", "bias"])
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.fp8_linear(a["x"], a["qweight"], a["scales"], a["bias"])
    w64 = fp8_deq(a["qweight"], a["scales"].expand(n))
    x64 = fp8_deq(*fp8_rows_rule(a["x"], E4M3)) if m > 16 else d64(a["x"])
    assert_close(y, *linear_oracle(x64, w64, a["bias"]), F32, "y")
    with sparqle.use_backend(backend):
        check_linear_grads(y, a, data, w64)
    # the GEMM alone, FP8 x FP8 with a per-row or one a scale
    q, s = fp8_rows_rule(torch.randn(m, k), E5M2)
    s = s[:1] if data.draw(st.booleans(), label="one a scale") else s
    b = draw_layouts(data, {"a": q, "a_scale": s}, {})
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.fp8_scaled_mm(b["a"], b["a_scale"], a["qweight"], a["scales"], a["bias"], F32)
    assert_close(y, *linear_oracle(fp8_deq(b["a"], b["a_scale"].expand(m)), w64, a["bias"]), F32, "scaled_mm")


@BACKENDS
@FUZZ
@given(data=st.data())
def test_fp8_quantize_rows(device, backend, data):
    seeded(data)
    m, _, k = sizes(data)
    fp8 = data.draw(st.sampled_from([E4M3, E5M2]), label="fp8")
    static = torch.rand(1) + 0.01 if data.draw(st.booleans(), label="static") else None
    a = draw_layouts(data, {"x": torch.randn(m, k) * 100, "static": static}, {})
    with sparqle.use_backend(backend):
        q, scale = torch.ops.sparqle.fp8_quantize_rows(a["x"], a["static"], fp8)
    expected_q, expected_scale = fp8_rows_rule(a["x"], fp8, a["static"])
    assert q.is_contiguous() and torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    assert torch.equal(scale, expected_scale)


@BACKENDS
@FUZZ
@given(data=st.data())
def test_fp8_training_linear(device, backend, data):
    seeded(data)
    m, n, k = sizes(data)
    bias = maybe_bias(data, n)
    a = with_grad(draw_layouts(data, {"x": torch.randn(m, k), "weight": torch.randn(n, k), "bias": bias}, {}),
                  ["x", "weight", "bias"])
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.fp8_training_linear(a["x"], a["weight"], a["bias"])
        g = draw_layouts(data, {"g": torch.randn(m, n)}, {})["g"]
        dx, dw, db = run_grads(y, g, [a["x"], a["weight"], a["bias"]])
    x64, w64 = fp8_deq(*fp8_rows_rule(a["x"], E4M3)), fp8_deq(*fp8_rows_rule(a["weight"], E4M3))
    assert_close(y, *linear_oracle(x64, w64, a["bias"]), F32, "y")
    dy64, wt64 = fp8_deq(*fp8_rows_rule(g, E5M2)), fp8_deq(*fp8_rows_rule(a["weight"].t(), E4M3))
    assert_close(dx, dy64 @ wt64.T, dy64.abs() @ wt64.abs().T, F32, "dx")
    dyt64, xt64 = fp8_deq(*fp8_rows_rule(g.t(), E5M2)), fp8_deq(*fp8_rows_rule(a["x"].t(), E4M3))
    assert_close(dw, dyt64 @ xt64.T, dyt64.abs() @ xt64.abs().T, F32, "dweight")
    if db is not None:
        assert_close(db, d64(g).sum(0), d64(g).abs().sum(0), F32, "dbias")


# ---- sparse weights -----------------------------------------------------------------------

def nm_dense(values, meta, n, m, k):
    """W [rows, k] in float64 from values and meta, by the documented bit layout."""
    rows, kc = values.shape
    bits = 2 if m <= 4 else 4
    j = torch.arange(kc)
    word = d64(meta).long()[:, j // (32 // bits)] & 0xFFFFFFFF
    cols = j // n * m + ((word >> (bits * (j % (32 // bits)))) & ((1 << bits) - 1))
    dense = torch.zeros(rows, kc // n * m, dtype=torch.float64)
    dense.scatter_(1, cols, d64(values))
    return dense[:, :k], cols


@BACKENDS
@FUZZ
@given(data=st.data())
def test_nm_linear(device, backend, data):
    seeded(data)
    rows, out, k = sizes(data, k_min=1)
    n, m = data.draw(st.sampled_from(PATTERNS), label="n:m")
    w = SemiStructured.from_dense(torch.randn(out, k), n, m)
    bias = maybe_bias(data, out)
    a = with_grad(draw_layouts(data, {"x": torch.randn(rows, k), "values": w.values, "meta": w.meta,
                                      "bias": bias}, {"meta": STRUCTURE}), ["x", "values", "bias"])
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.nm_linear(a["x"], a["values"], a["meta"], a["bias"], n, m)
        dense = torch.ops.sparqle.nm_to_dense(a["values"], a["meta"], n, m, k)
    w64, cols = nm_dense(a["values"], a["meta"], n, m, k)
    assert_close(dense, w64, w64.abs(), F32, "to_dense")
    assert_close(y, *linear_oracle(d64(a["x"]), w64, a["bias"]), F32, "y")
    with sparqle.use_backend(backend):
        g = draw_layouts(data, {"g": torch.randn(rows, out)}, {})["g"]
        dx, dvalues, db = run_grads(y, g, [a["x"], a["values"], a["bias"]])
    g64, x64 = d64(g), torch.nn.functional.pad(d64(a["x"]), (0, cols.shape[1] // n * m - k))
    assert_close(dx, g64 @ w64, g64.abs() @ w64.abs(), F32, "dx")
    assert_close(dvalues, (g64.T @ x64).gather(1, cols), (g64.abs().T @ x64.abs()).gather(1, cols), F32,
                 "dvalues")
    if db is not None:
        assert_close(db, g64.sum(0), g64.abs().sum(0), F32, "dbias")


def csr_dense(crow, col, values, shape):
    crow, col = crow.long().cpu(), col.long().cpu()
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow[1:] - crow[:-1])
    return torch.zeros(shape, dtype=torch.float64).index_put_((rows, col), d64(values), accumulate=True), rows


@BACKENDS
@FUZZ
@given(data=st.data())
def test_csr_linear_and_sddmm(device, backend, data):
    seeded(data)
    rows, mm, k = sizes(data)
    a = CSR.from_dense(random_sparse(mm, k, 0.3, F32, empty_rows=(0,)))
    args = with_grad(draw_layouts(data, {
        "x": torch.randn(rows, k), "crow": a.crow_indices, "col": a.col_indices, "values": a.values,
        "row_order": a.row_order, "bias": maybe_bias(data, mm)},
        dict.fromkeys(["crow", "col", "row_order"], STRUCTURE)), ["x", "values", "bias"])
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.csr_linear(*args.values())
        g = draw_layouts(data, {"g": torch.randn(rows, mm)}, {})["g"]
        dx, dvalues, db = run_grads(y, g, [args["x"], args["values"], args["bias"]])
    a64, a_rows = csr_dense(args["crow"], args["col"], args["values"], (mm, k))
    x64, g64 = d64(args["x"]), d64(g)
    assert_close(y, *linear_oracle(x64, a64, args["bias"]), F32, "y")
    assert_close(dx, g64 @ a64, g64.abs() @ a64.abs(), F32, "dx")
    cols = args["col"].long().cpu()
    assert_close(dvalues, (g64.T[a_rows] * x64.T[cols]).sum(1), (g64.T[a_rows].abs() * x64.T[cols].abs()).sum(1),
                 F32, "dvalues")
    if db is not None:
        assert_close(db, g64.sum(0), g64.abs().sum(0), F32, "dbias")
    s = draw_layouts(data, {"crow": a.crow_indices, "col": a.col_indices, "x": torch.randn(mm, rows),
                            "y": torch.randn(k, rows)}, {"crow": STRUCTURE, "col": STRUCTURE})
    with sparqle.use_backend(backend):
        out = torch.ops.sparqle.sddmm_csr(*s.values())
    sx64, sy64 = d64(s["x"])[a_rows], d64(s["y"])[cols]
    assert_close(out, (sx64 * sy64).sum(1), (sx64.abs() * sy64.abs()).sum(1), F32, "sddmm")


def bell_dense(ell_cols, values, shape):
    rows, width, b = values.shape[0], values.shape[1], values.shape[-1]
    cols = cdiv(shape[1], b)
    dense = torch.zeros(rows, b, cols + 1, b, dtype=torch.float64)  # column `cols`: unused slots
    c = ell_cols.long().cpu()
    c = torch.where(c >= 0, c, cols)
    dense[torch.arange(rows)[:, None], :, c] = d64(values)
    return dense[:, :, :cols].reshape(rows * b, cols * b)[:shape[0], :shape[1]]


@BACKENDS
@FUZZ
@given(data=st.data())
def test_bell_linear_and_backward_ops(device, backend, data):
    seeded(data)
    n, mm, k = sizes(data)
    b = 16
    w = BlockedELL.from_dense(random_sparse(mm, k, 0.5, F32), b)
    args = with_grad(draw_layouts(data, {"x": torch.randn(n, k), "ell_cols": w.ell_cols, "values": w.values,
                                         "bias": maybe_bias(data, mm)},
                                  {"ell_cols": STRUCTURE}),
                     ["x", "values", "bias"])
    with sparqle.use_backend(backend):
        y = torch.ops.sparqle.bell_linear(*args.values(), mm)
        g = draw_layouts(data, {"g": torch.randn(n, mm)}, {})["g"]
        dx, dvalues, db = run_grads(y, g, [args["x"], args["values"], args["bias"]])
    a64, x64, g64 = bell_dense(args["ell_cols"], args["values"], (mm, k)), d64(args["x"]), d64(g)
    assert_close(y, *linear_oracle(x64, a64, args["bias"]), F32, "y")
    assert_close(dx, g64 @ a64, g64.abs() @ a64.abs(), F32, "dx")
    if db is not None:
        assert_close(db, g64.sum(0), g64.abs().sum(0), F32, "dbias")
    cols = args["ell_cols"].long().cpu()

    def at_slots(dense):  # the b x b blocks of dense [mm, k] at the stored slots, 0 at unused ones
        padded = torch.nn.functional.pad(dense, (0, -k % b + b, 0, -mm % b))  # a zero block-column last
        blocks = padded.view(cols.shape[0], b, padded.shape[1] // b, b).permute(0, 2, 1, 3)
        return blocks[torch.arange(cols.shape[0])[:, None], torch.where(cols >= 0, cols, -1)]

    assert_close(dvalues, at_slots(g64.T @ x64), at_slots(g64.abs().T @ x64.abs()), F32, "dvalues")
    t = draw_layouts(data, dict(zip(("t_ell_cols", "t_slots"), w.transposed_structure())),
                     {"t_ell_cols": STRUCTURE, "t_slots": STRUCTURE})
    with sparqle.use_backend(backend):
        out = torch.ops.sparqle.bell_matmul(g, t["t_ell_cols"], t["t_slots"], args["values"].detach(), k)
    assert_close(out, g64 @ a64, g64.abs() @ a64.abs(), F32, "bell_matmul")


# ---- window attention and layout ------------------------------------------------------------

def attention_oracle(q, k, v, bias, mask, mask_index, scale):
    """float64 (out, lse) of softmax(q k^T * scale + bias + mask[m(b)]) v."""
    s = d64(q) @ d64(k).transpose(-1, -2) * scale
    if bias is not None:
        s = s + d64(bias)
    if mask is not None:
        sel = mask_index.long().cpu() if mask_index is not None else torch.arange(q.shape[0]) % mask.shape[0]
        s = s + d64(mask)[sel][:, None]
    p = torch.softmax(s, dim=-1)
    return p @ d64(v), torch.logsumexp(s, dim=-1), p


@BACKENDS
@FUZZ
@given(data=st.data())
def test_window_attention_and_backward(device, backend, data):
    seeded(data)
    draw = data.draw
    nb, heads, n, d = (draw(st.integers(0, 4), label="B_"), draw(st.integers(1, 2), label="heads"),
                       draw(st.integers(0, 20), label="N"), draw(st.integers(1, 20), label="d"))
    nw = draw(st.sampled_from([None, 1, 2]), label="nW")
    bias = torch.randn(heads, n, n) if draw(st.booleans(), label="bias") else None
    mask = swin_mask(nw, n) if nw else None
    index = torch.randint(0, nw, (nb,)) if nw and draw(st.booleans(), label="mask_index") else None
    if mask is not None and index is None and nb % nw:
        nb = nb // nw * nw
    scale = d ** -0.5
    a = with_grad(draw_layouts(data, {"q": torch.randn(nb, heads, n, d), "k": torch.randn(nb, heads, n, d),
                                      "v": torch.randn(nb, heads, n, d), "bias": bias, "mask": mask,
                                      "mask_index": index}, {}), ["q", "k", "v", "bias"])
    with sparqle.use_backend(backend):
        out, lse = torch.ops.sparqle.window_attention(*a.values(), scale)
        dout = draw_layouts(data, {"g": torch.randn(nb, heads, n, d)}, {})["g"]
        grads = run_grads(out, dout, [a["q"], a["k"], a["v"], a["bias"]])
    out64, lse64, p = attention_oracle(*a.values(), scale)
    assert_close(out, out64, p @ d64(a["v"]).abs(), F32, "out")
    assert_close(lse, lse64, lse64.abs() + 1, F32, "lse")
    expected, scales = oracle_grads(*a.values(), scale, dout)
    for name, got in zip(("dq", "dk", "dv", "dbias"), grads):
        if got is not None:
            assert_close(got, expected[name], scales[name], F32, name)
    # the backward op on its own, every argument laid out (all but dout keeping their values:
    # out and lse must stay those of q, k, v)
    kept = ["q", "k", "v", "out", "lse", "bias", "mask", "mask_index"]
    b = draw_layouts(data, {"dout": dout, "q": a["q"].detach(), "k": a["k"].detach(), "v": a["v"].detach(),
                            "out": out.detach(), "lse": lse, "bias": a["bias"], "mask": a["mask"],
                            "mask_index": a["mask_index"]}, dict.fromkeys(kept, STRUCTURE))
    with sparqle.use_backend(backend):
        direct = torch.ops.sparqle.window_attention_backward(*b.values(), scale)
    expected, scales = oracle_grads(b["q"], b["k"], b["v"], b["bias"], b["mask"], b["mask_index"], scale,
                                    b["dout"])
    for name, got in zip(("dq", "dk", "dv", "dbias"), direct):
        if name != "dbias" or bias is not None:
            assert_close(got, expected[name], scales[name], F32, f"backward op {name}")


def window_slots(x, ws, shift, index):
    """[(image, row of the image's windows, token, y, x)] for every real token of the
    windows partition takes (all, or those ``index`` names), by the per-pixel map."""
    b, h, w, _ = x.shape
    nw = cdiv(h, ws[0]) * cdiv(w, ws[1])
    slots = [index[i].tolist() if index is not None else list(range(nw)) for i in range(b)]
    return [(i, slots[i].index(win), t, y, xx) for (win, t), (y, xx) in pixel_map(h, w, ws, shift).items()
            for i in range(b) if win in slots[i]]


def partition_oracle(x, ws, shift, index, rows):
    """The windows of x [rows, N, C] in float64 (zero at padding)."""
    b, c = x.shape[0], x.shape[3]
    out = torch.zeros(b, rows // max(1, b), ws[0] * ws[1], c, dtype=torch.float64)
    x64 = d64(x)
    for i, r, t, y, xx in window_slots(x, ws, shift, index):
        out[i, r, t] = x64[i, y, xx]
    return out.reshape(rows, ws[0] * ws[1], c)


def merge_oracle(windows, x, ws, shift, index):
    """x in float64 with the windows' real tokens written back."""
    b, c = x.shape[0], x.shape[3]
    out, w64 = d64(x).clone(), d64(windows).reshape(b, windows.shape[0] // max(1, b), ws[0] * ws[1], c)
    for i, r, t, y, xx in window_slots(x, ws, shift, index):
        out[i, y, xx] = w64[i, r, t]
    return out


@BACKENDS
@FUZZ
@given(data=st.data())
def test_window_partition_and_merge(device, backend, data):
    seeded(data)
    draw = data.draw
    b, h, w, c = (draw(st.integers(0, 2), label="B"), draw(st.integers(0, 7), label="H"),
                  draw(st.integers(0, 7), label="W"), draw(st.integers(0, 5), label="C"))
    ws = (draw(st.integers(1, 4), label="wh"), draw(st.integers(1, 4), label="ww"))
    shift = (draw(st.integers(0, ws[0] - 1), label="sh"), draw(st.integers(0, ws[1] - 1), label="sw"))
    nw = cdiv(h, ws[0]) * cdiv(w, ws[1])
    per_image = draw(st.integers(0, nw), label="K") if draw(st.booleans(), label="index") else None
    index = (torch.stack([torch.randperm(nw)[:per_image] for _ in range(b)]) if b else
             torch.zeros(0, per_image, dtype=torch.long)) if per_image is not None else None
    rows = b * (nw if index is None else per_image)
    a = with_grad(draw_layouts(data, {"x": torch.randn(b, h, w, c), "windows": torch.randn(rows, ws[0] * ws[1], c),
                                      "index": index}, {"index": STRUCTURE}), ["x", "windows"])
    with sparqle.use_backend(backend):
        parts = torch.ops.sparqle.window_partition(a["x"], *ws, *shift, a["index"])
        merged = torch.ops.sparqle.window_merge(a["windows"], a["x"], *ws, *shift, a["index"])
    assert parts.shape == (rows, ws[0] * ws[1], c)
    assert torch.equal(d64(parts), partition_oracle(a["x"], ws, shift, a["index"], rows))
    assert torch.equal(d64(merged), merge_oracle(a["windows"], a["x"], ws, shift, a["index"]))
    with sparqle.use_backend(backend):
        g = draw_layouts(data, {"g": torch.randn(b, h, w, c)}, {})["g"]
        dwindows, dx = run_grads(merged, g, [a["windows"], a["x"]])
        gp = draw_layouts(data, {"g": torch.randn(parts.shape)}, {})["g"]
        (dx_part,) = run_grads(parts, gp, [a["x"]])
    assert torch.equal(d64(dwindows), partition_oracle(g, ws, shift, a["index"], rows))
    assert torch.equal(d64(dx), merge_oracle(torch.zeros(rows, ws[0] * ws[1], c), g, ws, shift, a["index"]))
    assert torch.equal(d64(dx_part), merge_oracle(gp, torch.zeros(b, h, w, c), ws, shift, a["index"]))
