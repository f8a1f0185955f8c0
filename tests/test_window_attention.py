"""sparqle.window_attention: the fused op on every (device, backend) against the float64
oracle softmax(q k^T * scale + bias + mask) v, forward and gradients (q, k, v, bias);
gradcheck, opcheck, compile, and bad input."""
import pytest
import torch

import sparqle

from ._oracle import RTOL, assert_close
from .conftest import device_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (windows, heads, N, d, nW of the mask or None, with bias, with mask_index)
CASES = [
    (6, 2, 49, 32, 3, True, False),   # Swin's 7x7 windows with the shift mask
    (5, 3, 49, 32, 4, True, True),    # windows gathered from several images
    (4, 1, 16, 16, None, False, False),
    (3, 2, 10, 24, 1, True, False),   # N and d not powers of two
    (2, 1, 1, 8, None, True, False),  # one token
    (3, 2, 81, 16, 3, True, True),    # 9x9 windows: two query blocks
    (2, 1, 144, 32, 2, True, False),  # Swin-B's 12x12 windows: five query blocks
]


def swin_mask(nw, n, dtype=torch.float32):
    """0 / -100 blocks like Swin's shift mask (each token of a window in one of 2 regions)."""
    regions = torch.randint(0, 2, (nw, n))
    return torch.where(regions[:, :, None] == regions[:, None, :], 0.0, -100.0).to(dtype)


def make(nb, heads, n, d, nw, with_bias, with_index, dtype, device):
    q, k, v = (torch.randn(nb, heads, n, d, dtype=dtype, device=device) for _ in range(3))
    bias = torch.randn(heads, n, n, dtype=dtype, device=device) if with_bias else None
    mask = swin_mask(nw, n).to(device) if nw else None
    mask_index = torch.randint(0, nw, (nb,), device=device) if with_index else None
    return q, k, v, bias, mask, mask_index


def oracle(q, k, v, bias, mask, mask_index, scale):
    """float64: (out, P, S) with S = q k^T * scale + bias + mask[m(b)], P = softmax(S)."""
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.detach().double().cpu()
    if mask is not None:
        sel = mask_index.cpu() if mask_index is not None else torch.arange(q.shape[0]) % mask.shape[0]
        s = s + mask.double().cpu()[sel][:, None]
    p = torch.softmax(s, dim=-1)
    return p @ v, p


def rounded_for_dot(scale64, dtype):
    """The error scale of a float64 operand (given by its scale) once the kernel rounds it to
    ``dtype`` for a tensor-core dot, as FlashAttention does with P before P V and dS before
    dS K: relative (RTOL[dtype] x scale), plus, below ``dtype``'s normal range, the absolute
    half step of its subnormals, which no relative bound covers (an fp16 probability under
    6.1e-5 keeps fewer than 10 bits; 2^-25 absolute in fp16). Returned in RTOL units."""
    half_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
    return scale64.abs() + half_step / RTOL[dtype]


def oracle_grads(q, k, v, bias, mask, mask_index, scale, dout):
    """float64 gradients by the chain rule, and their error scales (the same sums on |.|,
    with P and dS as the kernel rounds them to q's dtype for its dots)."""
    q64, k64, v64, do = (t.detach().double().cpu() for t in (q, k, v, dout))
    out, p = oracle(q, k, v, bias, mask, mask_index, scale)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v64.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    ds_scale = p * (do.abs() @ v64.abs().transpose(-1, -2) + (do * out).abs().sum(-1, keepdim=True))
    ds_dot = rounded_for_dot(ds_scale, q.dtype)
    grads = {"dq": ds @ k64 * scale, "dk": ds.transpose(-1, -2) @ q64 * scale, "dv": dv, "dbias": ds.sum(0)}
    scales = {"dq": ds_dot @ k64.abs() * scale, "dk": ds_dot.transpose(-1, -2) @ q64.abs() * scale,
              "dv": rounded_for_dot(p, q.dtype).transpose(-1, -2) @ do.abs(), "dbias": ds_scale.sum(0)}
    return grads, scales


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_oracle(device_backend, case, dtype):
    check_against_oracle(device_backend, case, dtype)


def check_against_oracle(device_backend, case, dtype, kept_table=False):
    """window_attention on make(*case), forward and the gradients of q, k, v and bias, against
    the oracle; given the score table a layer keeps (score_table(bias, mask)) with
    ``kept_table``."""
    device, backend = device_backend
    q, k, v, bias, mask, mask_index = make(*case, dtype, device)
    table = sparqle.window.score_table(bias, mask, q) if kept_table else None
    scale = case[3] ** -0.5
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    dout = torch.randn_like(q)
    with sparqle.use_backend(backend):
        out = sparqle.window_attention(q, k, v, bias=bias, mask=mask, mask_index=mask_index, table=table)
        out.backward(dout)
    expected, p = oracle(q, k, v, bias, mask, mask_index, scale)
    assert_close(out, expected, rounded_for_dot(p, dtype) @ v.detach().double().cpu().abs(), dtype, "out")
    grads, scales = oracle_grads(q, k, v, bias, mask, mask_index, scale, dout)
    for name, t in zip(("dq", "dk", "dv", "dbias"), leaves):
        assert_close(t.grad, grads[name], scales[name], dtype, name)


def test_lse_matches_oracle(device_backend):
    """The row logsumexp the forward saves for the backward (fp32)."""
    device, backend = device_backend
    q, k, v, bias, mask, mask_index = make(5, 2, 49, 32, 4, True, True, torch.float16, device)
    with sparqle.use_backend(backend):
        _, lse = torch.ops.sparqle.window_attention(q, k, v, bias, mask, mask_index, 0.2)
    s = q.double().cpu() @ k.double().cpu().transpose(-1, -2) * 0.2 + bias.double().cpu()
    s = s + mask.double().cpu()[mask_index.cpu()][:, None]
    expected = torch.logsumexp(s, dim=-1)
    assert lse.dtype == torch.float32
    assert_close(lse, expected, expected.abs() + 1, torch.float32, "lse")


@pytest.mark.parametrize("device", sorted({d for d, _ in device_backends()}))
def test_gradcheck_float64(device):
    q, k, v, bias, mask, mask_index = make(4, 2, 9, 5, 2, True, True, torch.float64, device)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, bias))
    with sparqle.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda q, k, v, b: sparqle.window_attention(q, k, v, bias=b, mask=mask, mask_index=mask_index,
                                                        scale=0.7), inputs)


def test_strided_inputs_and_empty(device_backend):
    """q, k, v as the views Swin's qkv reshape gives, and zero windows."""
    device, backend = device_backend
    qkv = torch.randn(6, 49, 3, 2, 32, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    with sparqle.use_backend(backend):
        out = sparqle.window_attention(q, k, v)
        nothing = [torch.randn(0, 2, 49, 32, device=device, requires_grad=True) for _ in range(3)]
        bias = torch.randn(2, 49, 49, device=device, requires_grad=True)
        empty = sparqle.window_attention(*nothing, bias=bias)
        empty.sum().backward()
    expected, p = oracle(q, k, v, None, None, None, 32 ** -0.5)
    assert_close(out, expected, p @ v.double().cpu().abs(), torch.float32, "out")
    assert empty.shape == (0, 2, 49, 32) and nothing[0].grad.shape == (0, 2, 49, 32)
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_rows_masked_out_over_a_whole_key_block(device_backend):
    """A user mask of -inf over the first key block (64 keys) of some rows, with finite
    scores in the next: the forward's online softmax starts those rows from a row max of
    -inf and must not turn exp(-inf - (-inf)) into NaN; out and the gradients match the
    oracle's softmax over the finite keys."""
    device, backend = device_backend
    q, k, v, bias, mask, mask_index = make(2, 1, 81, 16, 2, True, False, torch.float32, device)
    mask[:, ::3, :70] = float("-inf")
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    dout = torch.randn_like(q)
    with sparqle.use_backend(backend):
        out = sparqle.window_attention(q, k, v, bias=bias, mask=mask)
        out.backward(dout)
    expected, p = oracle(q, k, v, bias, mask, None, 16 ** -0.5)
    assert_close(out, expected, p @ v.detach().double().cpu().abs(), torch.float32, "out")
    grads, scales = oracle_grads(q, k, v, bias, mask, None, 16 ** -0.5, dout)
    for name, t in zip(("dq", "dk", "dv", "dbias"), (q, k, v, bias)):
        assert_close(t.grad, grads[name], scales[name], torch.float32, name)


@pytest.mark.parametrize("n, size", [(1, 16), (10, 16), (49, 64), (81, 96), (144, 144)])
def test_score_table_layout(n, size):
    """bias [heads, N, N] plus mask [nW, N, N] summed in fp32, rows and columns padded to
    NP (the block for N <= 64, else a multiple of 16): -inf in the padded keys, 0 in the
    padded query rows' real keys; without a mask one window, without a bias one head."""
    bias, mask = torch.randn(3, n, n, dtype=torch.bfloat16), swin_mask(2, n, torch.float16)
    table = sparqle.window.score_table(bias, mask, bias)
    assert table.shape == (2, 3, size, size) and table.dtype == torch.float32
    assert torch.equal(table[:, :, :n, :n], bias.float()[None] + mask.float()[:, None])
    assert torch.equal(table[:, :, n:, :n], torch.zeros(2, 3, size - n, n))
    assert (table[..., n:] == float("-inf")).all()
    assert sparqle.window.score_table(bias, None, bias).shape == (1, 3, size, size)
    assert sparqle.window.score_table(None, mask, mask.double()).shape == (2, 1, size, size)
    assert sparqle.window.score_table(None, mask, mask.double()).dtype == torch.float64


@pytest.mark.parametrize("case", [(6, 2, 49, 32, 3, True, False), (5, 3, 49, 32, 4, True, True),
                                  (3, 2, 10, 24, None, True, False), (4, 2, 81, 16, 2, False, True),
                                  (2, 1, 144, 32, 2, True, False)], ids=str)
def test_kept_table_matches_oracle(device_backend, case):
    """The op given the score table a layer keeps instead of making it: one query block and
    several, with and without mask_index, no mask (one table window), no bias (one table
    head)."""
    check_against_oracle(device_backend, case, torch.bfloat16, kept_table=True)


@pytest.mark.parametrize("n", [49, 81])
def test_the_table_is_what_is_read(device_backend, n):
    """Given a table, every backend adds it, not bias and mask: a table made from another bias
    gives that bias's attention (one block and several)."""
    device, backend = device_backend
    q, k, v, bias, mask, mask_index = make(3, 2, n, 16, 3, True, True, torch.float32, device)
    other = torch.randn_like(bias)
    with sparqle.use_backend(backend):
        out = sparqle.window_attention(q, k, v, bias=bias, mask=mask, mask_index=mask_index,
                                       table=sparqle.window.score_table(other, mask, q))
    expected, p = oracle(q, k, v, other, mask, mask_index, 16 ** -0.5)
    assert_close(out, expected, p @ v.double().cpu().abs(), torch.float32, "out")


@pytest.mark.parametrize("device", sorted({d for d, b in device_backends() if b == "triton"}))
def test_a_made_table_is_kept_while_bias_and_mask_are(device):
    """Without a table, the op on the Triton kernels makes score_table(bias, mask) once and
    keeps it (the backward and the next call with the same bias and mask read it); it is
    made again once the bias is modified in place, and the output follows."""
    from sparqle.bindings.window_attention import table_name
    from sparqle.kernels._derived import kept

    q, k, v, bias, mask, _ = make(4, 2, 49, 16, 2, True, False, torch.float32, device)
    name = table_name(bias, mask)
    with sparqle.use_backend("triton"):
        sparqle.window_attention(q, k, v, bias=bias, mask=mask)
        table = kept(name, bias, mask)
        assert table is not None and torch.equal(table, sparqle.window.score_table(bias, mask, q))
        sparqle.window_attention(q, k, v, bias=bias, mask=mask)
        assert kept(name, bias, mask) is table
        bias.add_(1.0)
        assert kept(name, bias, mask) is None
        out = sparqle.window_attention(q, k, v, bias=bias, mask=mask)
    expected, p = oracle(q, k, v, bias, mask, None, 16 ** -0.5)
    assert_close(out, expected, p @ v.double().cpu().abs(), torch.float32, "out")


def test_opcheck_and_compile():
    q, k, v, bias, mask, mask_index = make(4, 2, 12, 16, 2, True, True, torch.float32, "cpu")
    table = sparqle.window.score_table(bias, mask, q)
    for args in ((q, k, v, bias, mask, mask_index, 0.25), (q, k, v, None, mask, None, 0.25),
                 (q, k, v, None, None, None, 0.25), (q, k, v, bias, mask, mask_index, 0.25, table)):
        args = tuple(t.requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                     and t is not mask and t is not table else t for t in args)
        torch.library.opcheck(torch.ops.sparqle.window_attention.default, args)
    plain = [t.detach() for t in (q, k, v, bias)]
    out, lse = torch.ops.sparqle.window_attention(*plain, mask, mask_index, 0.25)
    for b in (plain[3], None):
        torch.library.opcheck(torch.ops.sparqle.window_attention_backward.default,
                              (torch.randn_like(out), *plain[:3], out, lse, b, mask, mask_index, 0.25))
    torch.library.opcheck(torch.ops.sparqle.window_attention_backward.default,
                          (torch.randn_like(out), *plain[:3], out, lse, plain[3], mask, mask_index, 0.25, table))

    def f(q, k, v, bias):
        return sparqle.window_attention(q, k, v, bias=bias, mask=mask, mask_index=mask_index)

    expected = f(q, k, v, bias)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, bias)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    assert bias.grad is not None and q.grad is not None


class TestBadInput:
    def args(self, **change):
        q, k, v, bias, mask, _ = make(4, 2, 9, 16, 2, True, False, torch.float32, "cpu")
        kwargs = {"q": q, "k": k, "v": v, "bias": bias, "mask": mask}
        kwargs.update(change)
        return kwargs

    def call(self, **change):
        a = self.args(**change)
        return sparqle.window_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)

    def test_shapes(self):
        with pytest.raises(ValueError, match="k must have q's shape"):
            self.call(k=torch.randn(4, 2, 9, 8))
        with pytest.raises(ValueError, match="q must be 4-D"):
            self.call(q=torch.randn(4, 9, 16))
        with pytest.raises(ValueError, match=r"mask must have shape \[nW, 9, 9\]"):
            self.call(mask=torch.zeros(2, 8, 8))
        with pytest.raises(ValueError, match=r"bias must have shape \[2, 9, 9\]"):
            self.call(bias=torch.zeros(3, 9, 9))
        with pytest.raises(ValueError, match="not a multiple of mask.shape"):
            self.call(mask=torch.zeros(3, 9, 9))

    def test_limits(self):
        big = torch.randn(1, 1, 257, 16)
        with pytest.raises(ValueError, match="at most 256"):
            sparqle.window_attention(big, big, big)
        wide = torch.randn(1, 1, 9, 129)
        with pytest.raises(ValueError, match="head dim"):
            sparqle.window_attention(wide, wide, wide)

    def test_types(self):
        with pytest.raises(TypeError, match="v has dtype"):
            self.call(v=torch.randn(4, 2, 9, 16, dtype=torch.float16))
        with pytest.raises(TypeError, match="q must be a torch.Tensor"):
            self.call(q=None)
        with pytest.raises(TypeError, match="mask_index must hold integers"):
            self.call(mask_index=torch.zeros(4))
        with pytest.raises(TypeError, match="scale must be a float"):
            self.call(scale="0.5")

    def test_mask_index(self):
        with pytest.raises(ValueError, match=r"mask_index holds values outside \[0, 2\)"):
            self.call(mask_index=torch.tensor([0, 1, 2, 0]))
        with pytest.raises(ValueError, match="mask_index must have q.shape"):
            self.call(mask_index=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="mask_index needs a mask"):
            self.call(mask=None, mask_index=torch.tensor([0, 1, 1, 0]))

    def test_table(self):
        a = self.args()
        table = sparqle.window.score_table(a["bias"], a["mask"], a["q"])
        with pytest.raises(ValueError, match=r"table must have the shape score_table\(bias, mask\) gives, "
                                             r"\(2, 2, 16, 16\)"):
            self.call(table=table[:1])
        with pytest.raises(ValueError, match="table must have the shape"):
            self.call(mask=None, table=table)  # a table of 2 windows, but no mask: one
        with pytest.raises(TypeError, match="table must be torch.float32 for q of torch.float32"):
            self.call(table=table.double())
        with pytest.raises(TypeError, match="table must be a torch.Tensor"):
            self.call(table=[1.0])
        with pytest.raises(ValueError, match="needs a bias or a mask"):
            sparqle.window.score_table(None, None, a["q"])
        with pytest.raises(ValueError, match=r"mask must have shape \[nW, 9, 9\]"):
            sparqle.window.score_table(a["bias"], torch.zeros(2, 8, 8), a["q"])
        with pytest.raises(TypeError, match="like must be a floating-point tensor"):
            sparqle.window.score_table(a["bias"], None, torch.float32)

    def test_triton_takes_no_float64(self):
        if not any(b == "triton" for _, b in device_backends()):
            return
        with sparqle.use_backend("triton"):
            with pytest.raises(ValueError, match="not torch.float64"):
                self.call(**{n: t.double() for n, t in self.args().items()})
