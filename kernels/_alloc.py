"""Output allocation shared by every launcher.

With ``SPARQLE_POISON=1`` (the test suite sets it) new outputs are filled with NaN
(floats) or -1 (integers), so an element that a kernel forgets to write shows up.
"""
import os

import torch


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("SPARQLE_POISON") == "1":
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
