import pytest
import torch

from sparqle import prune


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_magnitude_keeps_the_largest_exact_count(sparsity):
    w = torch.randn(37, 29)
    mask = prune.magnitude(w, sparsity)
    keep = w.numel() - round(sparsity * w.numel())
    assert mask.dtype == torch.bool and mask.shape == w.shape and int(mask.sum()) == keep
    if 0 < keep < w.numel():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_magnitude_bad_input():
    w = torch.randn(4, 4)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity must lie in"):
            prune.magnitude(w, bad)
    with pytest.raises(TypeError, match="w must be a floating-point tensor"):
        prune.magnitude(torch.ones(3, dtype=torch.int64), 0.5)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="w holds NaN"):
        prune.magnitude(w, 0.5)
