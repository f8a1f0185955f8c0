"""Tensors derived from others (a narrowed index copy, a vendor-compressed weight, the
transposed structure of a sparse weight), made on first use and kept while their sources
live and are not modified in place.

A source is recognised by identity and its version counter. Inference tensors keep no
version counter, so what is derived from one is made again on every call (the formats and
the sparqle.nn modules hold none: sparqle.formats._base.plain_tensor). What is kept is
made outside inference mode even when the call that first needs it runs in it (a module
used under torch.inference_mode() and then trained): an inference tensor, kept, could not
be saved for a later call's backward. What is made
during CUDA-graph capture is not kept (it holds its values only once the graph replays, and
the graph's memory pool may hand its memory to another graph); what was kept before is used.
While torch.compile or AOTAutograd traces (fake tensors) it is made into the graph, never kept.
"""
import weakref
from typing import Callable, Dict, Tuple, TypeVar

import torch

from sparqle.formats.csr import reads_u16_col_indices, u16_col_indices

from . import _capture

T = TypeVar("T")  # a tensor, a tuple of tensors, or a flag read from the sources

# (id(first source), name) -> (weak references to the sources, their versions, what was made)
_kept: Dict[Tuple[int, str], Tuple[tuple, tuple, object]] = {}


def derived(name: str, make: Callable[[], T], *sources: torch.Tensor) -> T:
    """``make()``, kept per (``sources[0]``, ``name``) and made again when any source is
    replaced or modified in place; dropped when ``sources[0]`` is freed."""
    if _capture.tracing() or any(s.is_inference() for s in sources):
        return make()
    found = kept(name, *sources)
    if found is not None:
        return found
    with torch.inference_mode(False):
        made = make()
    if _capture.capturing():
        return made
    key = (id(sources[0]), name)
    hit = _kept.get(key)
    if hit is None or hit[0][0]() is not sources[0]:
        weakref.finalize(sources[0], _kept.pop, key, None)
    _kept[key] = (tuple(weakref.ref(s) for s in sources), tuple(s._version for s in sources), made)
    return made


def kept(name: str, *sources: torch.Tensor):
    """What :func:`derived` keeps for (``sources[0]``, ``name``) if it is still valid (its
    sources the same tensors, unmodified), else None; never makes anything. None while
    tracing and for inference tensors, for which nothing is kept."""
    if _capture.tracing() or any(s.is_inference() for s in sources):
        return None
    hit = _kept.get((id(sources[0]), name))
    if (hit is not None and hit[1] == tuple(s._version for s in sources)
            and all(r() is s for r, s in zip(hit[0], sources))):
        return hit[2]
    return None


def csr_col_indices(col: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The column indices a CSR kernel reads for A [m, k] (int32 ``col``) times x of
    ``dtype``: 16-bit (sparqle.formats.csr.u16_col_indices), made on first use and kept per
    ``col`` as :func:`derived` keeps, where sparqle.formats.csr.reads_u16_col_indices says
    so; else ``col`` itself."""
    if reads_u16_col_indices(dtype, k):
        return derived("csr_u16_col_indices", lambda: u16_col_indices(col), col)
    return col
