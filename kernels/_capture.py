"""Whether a CUDA graph is being captured. While it is, nothing may read a device tensor's
values on the host (a synchronisation, which capture forbids), be timed, or be kept for
later calls: a tensor made during capture holds its values only once the graph replays."""
from typing import Callable

import torch


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
