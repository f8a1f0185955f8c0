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
