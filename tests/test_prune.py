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


@pytest.mark.parametrize("b", [16, 32])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_magnitude_blocks_keep_the_largest_norms(b, sparsity):
    w = torch.randn(70, 100)
    mask = prune.magnitude(w, sparsity, block=b)
    rows, cols = -(-70 // b), -(-100 // b)
    padded = torch.nn.functional.pad(mask, (0, cols * b - 100, 0, rows * b - 70))
    blocks = padded.view(rows, b, cols, b)
    kept = blocks.any(3).any(1)
    whole = kept.repeat_interleave(b, 0).repeat_interleave(b, 1)[:70, :100]
    assert torch.equal(mask, whole), "a block is kept whole or not at all"
    assert int(kept.sum()) == rows * cols - round(sparsity * rows * cols)
    norms = torch.nn.functional.pad(w, (0, cols * b - 100, 0, rows * b - 70)).view(
        rows, b, cols, b).pow(2).sum((1, 3)).sqrt()
    if 0 < kept.sum() < kept.numel():
        assert norms[kept].min() >= norms[~kept].max()


def test_magnitude_block_bad_input():
    with pytest.raises(ValueError, match="block must be a positive int"):
        prune.magnitude(torch.randn(4, 4), 0.5, block=0)
    with pytest.raises(ValueError, match="w must be 2-D for block pruning"):
        prune.magnitude(torch.randn(4, 4, 4), 0.5, block=2)
