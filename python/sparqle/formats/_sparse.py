"""torch.sparse compressed matrices (CSR, BSR) over a format's tensors (CSR.to_sparse_csr,
and the torch path's products), built without torch's notice that sparse compressed tensors
are in beta.

Torch gives that notice once per process (TORCH_WARN_ONCE, one site for every compressed
layout), when the first compressed tensor is built. The torch path builds them on every
call, internally, so the first one is built with that one notice ignored; every later one
is built plainly (there is nothing left to ignore), so the filters of the warnings module
are touched once, under a lock, never per call.
"""
import threading
import warnings

import torch

_NOTICE = r"Sparse (CSR|BSR) tensor support is in beta state"
_lock = threading.Lock()
_noticed = False


def _quietly(build):
    global _noticed
    if _noticed:
        return build()
    with _lock:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOTICE, category=UserWarning)
            out = build()
        _noticed = True
    return out


def csr_matrix(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """torch.sparse_csr_tensor over the given (already valid) tensors, unchecked."""
    return _quietly(lambda: torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False))


def bsr_matrix(crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, size) -> torch.Tensor:
    """torch.sparse_bsr_tensor over the given (already valid) tensors, unchecked."""
    return _quietly(lambda: torch.sparse_bsr_tensor(crow, col, blocks, size, check_invariants=False))
