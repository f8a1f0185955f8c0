"""Float64 dense oracles and the random sparse inputs the tests share."""
import torch

# Relative to sum |a_ij| |b_jk|, the largest error each dtype's rounding allows.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_sparse(m, k, density, dtype=torch.float64, device="cpu", empty_rows=()):
    """A dense [m, k] tensor with about ``density`` of its entries nonzero and the rows in
    ``empty_rows`` all zero."""
    dense = torch.randn(m, k, dtype=torch.float64)
    dense = dense * (torch.rand(m, k) < density)
    for r in empty_rows:
        if r < m:
            dense[r] = 0
    return dense.to(device=device, dtype=dtype)


def int4_stored_byte(b):
    """Where ``packed`` stores byte b of a row in K order (q[2b] low nibble, q[2b + 1] high),
    as docs/int4.md lays it out: 64 (b // 64) + 16 (b % 4) + (b % 64) // 4 (ints or tensors)."""
    return 64 * (b // 64) + 16 * (b % 4) + (b % 64) // 4


def assert_close(actual, expected64, scale64, dtype, what):
    """|actual - expected| <= RTOL[dtype] * scale + tiny, elementwise; expected and scale in float64."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    actual = actual.detach().cpu().double()
    expected64, scale64 = expected64.detach().cpu(), scale64.detach().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries (unwritten output?)"
    bound = RTOL[dtype] * scale64 + 1e-30
    err = (actual - expected64).abs()
    if not (err <= bound).all():
        worst = (err - bound).flatten().argmax()
        raise AssertionError(f"{what}: error {err.flatten()[worst]:.3e} > bound "
                             f"{bound.flatten()[worst]:.3e} at flat index {int(worst)}")


def _scaled_rows_rule(x: torch.Tensor, qmax: float, static=None):
    """(v, scale) of the per-row quantizers' documented rule (kernels/triton/_rows.py), on the
    CPU in fp32 (fp64 for fp64 x): scale = max|x[m]| / qmax (1 for an all-zero row, NaN for a
    row holding a NaN, +Inf for one holding ±Inf), or ``static`` ([1] or [M]; NaN for a row
    holding a NaN); v = x / scale (x / static), NaN replaced by 0."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.detach().cpu().to(cdt)
    if static is None:
        scale = xc.abs().amax(1) / qmax if xc.shape[1] else torch.zeros(xc.shape[0], dtype=cdt)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        v = xc / scale[:, None]
    else:
        static = static.detach().cpu().to(cdt).reshape(-1)
        v = xc / static[:, None]
        scale = torch.where(xc.isnan().any(1), torch.nan, static.expand(xc.shape[0]))
    return torch.where(v.isnan(), torch.zeros_like(v), v), scale


def int8_rows_rule(x: torch.Tensor, static=None):
    """(q [M, K] as floats, scale [M]): q = round_half_even(clamp(v, -127, 127))."""
    v, scale = _scaled_rows_rule(x, 127, static)
    return torch.round(torch.clamp(v, -127, 127)), scale


def fp8_rows_rule(x: torch.Tensor, dtype: torch.dtype, static=None):
    """(q [M, K] in FP8 ``dtype``, scale [M]): q = fp8(clamp(v, -fmax, fmax)) rounded to
    nearest even."""
    fmax = torch.finfo(dtype).max
    v, scale = _scaled_rows_rule(x, fmax, static)
    return torch.clamp(v, -fmax, fmax).to(dtype), scale


# torch.library.opcheck's tests but test_schema, which compares the inputs before and after
# with torch.allclose: it has no FP8 kernel on the CPU (torch 2.13). Ops with FP8 tensors run
# these, and assert_no_mutation_or_alias does test_schema's job on the bits.
NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
             "test_aot_dispatch_dynamic")


def assert_no_mutation_or_alias(op, args) -> None:
    """``op(*args)`` changes no tensor argument (compared bit for bit) and returns none of
    their storage."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [t.detach().clone() for t in tensors]
    out = op(*args)
    for b, t in zip(before, tensors):
        assert torch.equal(b.view(torch.uint8) if b.element_size() == 1 else b,
                           t.detach().view(torch.uint8) if t.element_size() == 1 else t.detach())
    pointers = {t.untyped_storage().data_ptr() for t in tensors}
    for o in out if isinstance(out, tuple) else (out,):
        assert o.untyped_storage().data_ptr() not in pointers
