"""Whether a CUDA graph is being captured. While it is, nothing may read a device tensor's
values on the host (a synchronisation, which capture forbids), be timed, or be kept for
later calls: a tensor made during capture holds its values only once the graph replays."""
import torch


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
