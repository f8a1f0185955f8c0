"""kernels._derived: a derived tensor is kept while its sources live unchanged, made again
when one is modified in place or replaced, dropped with its first source, never kept
for inference tensors (which have no version counter), and kept as a plain tensor when
first made in inference mode."""
import gc

import torch

from sparqle.kernels import _derived
from sparqle.kernels._derived import derived


def _counting(make):
    calls = []

    def counted():
        calls.append(1)
        return make()
    return counted, calls


def test_kept_until_a_source_changes_in_place():
    a, b = torch.randn(5), torch.randn(3)
    make, calls = _counting(lambda: a * 2 + b.sum())
    first = derived("t", make, a, b)
    assert derived("t", make, a, b) is first and len(calls) == 1
    b.add_(1)
    second = derived("t", make, a, b)
    assert len(calls) == 2 and torch.equal(second, a * 2 + b.sum())
    a.mul_(3)
    assert torch.equal(derived("t", make, a, b), a * 2 + b.sum()) and len(calls) == 3


def test_a_replaced_second_source_or_another_name_makes_it_again():
    a, b, c = torch.randn(4), torch.randn(4), torch.randn(4)
    assert torch.equal(derived("t", lambda: a + b, a, b), a + b)
    assert torch.equal(derived("t", lambda: a + c, a, c), a + c)
    assert torch.equal(derived("u", lambda: a - c, a, c), a - c)


def test_dropped_with_its_first_source():
    a = torch.randn(4)
    derived("t", lambda: torch.ones(4), a)
    key = (id(a), "t")
    assert key in _derived._kept
    del a
    gc.collect()
    assert key not in _derived._kept


def test_inference_tensors_are_never_kept():
    with torch.inference_mode():
        a = torch.randn(4)
    make, calls = _counting(lambda: a + 1)
    derived("t", make, a)
    derived("t", make, a)
    assert len(calls) == 2


def test_made_in_inference_mode_it_is_kept_as_a_plain_tensor_a_backward_can_save():
    """A module's buffers are plain tensors; a call under torch.inference_mode() that first
    needs what derives from them makes it as a plain tensor, so a later training call that
    saves it for backward works."""
    a = torch.randn(4)
    with torch.inference_mode():
        made = derived("t", lambda: a * 2, a)
    assert not made.is_inference()
    assert derived("t", lambda: a * 3, a) is made
    x = torch.randn(4, requires_grad=True)
    (x * made).sum().backward()            # mul saves `made` for backward
    torch.testing.assert_close(x.grad, a * 2)
