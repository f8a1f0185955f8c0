"""Whether a CUDA graph is being captured. While it is, nothing may read a device tensor's
values on the host (a synchronisation, which capture forbids), be timed, or be kept for
later calls: a tensor made during capture holds its values only once the graph replays."""
from typing import Callable

import torch


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tracing() -> bool:
    """True while torch.compile, AOTAutograd or make_fx traces with fake tensors: tensors
    hold no values to read, and what is made belongs to the traced graph."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def host_reads_allowed() -> bool:
    """Whether a device tensor's values may be read on the host now: not while tracing
    (fake tensors hold none) nor while a CUDA graph is captured (a sync breaks capture)."""
    return not (tracing() or capturing())


def check_values(holds: Callable[[], torch.Tensor], message: str) -> None:
    """ValueError(message) unless ``holds()`` (a bool tensor) is true: read on the host (a
    device sync) eagerly; while a CUDA graph is captured, where nothing may be read, asserted
    on the device instead (a failing replay stops with a device-side assert, not a wrong
    result). torch.compile traces no check: one that must hold compiled is made inside an op
    (the window ops' index checks), which runs eagerly within the compiled graph."""
    if torch.compiler.is_compiling():
        return
    if capturing():
        torch._assert_async(holds(), message)
    elif not bool(holds()):
        raise ValueError(message)
