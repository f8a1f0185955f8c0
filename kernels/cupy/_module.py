"""Compile the CUDA C in ``kernels/cupy/<op>.cu`` through CuPy (NVRTC) and launch its kernels.

``launch(file, name, grid, block, args, like)`` runs the ``extern "C"`` kernel ``name`` of
``file`` on the device of tensor ``like``, on torch's current CUDA stream. The module is
compiled once per (file, device, options) and cached; CuPy adds the running device's
architecture (``-arch=sm_XY``) itself, so ``OPTIONS`` names none. Tensors travel as raw
device pointers (``ptr``): no copy, no DLPack round trip; sizes go as int32 (``i32``),
strides in elements as int64 (``i64``). CuPy is imported on the first launch, so the
launchers import (and their argument handling runs) without it.
"""
import functools
import pathlib
from typing import Sequence, Tuple

import numpy as np
import torch

DIR = pathlib.Path(__file__).resolve().parent
OPTIONS = ("-std=c++17",)


@functools.lru_cache(maxsize=None)
def _module(file: str, device: int, options: Tuple[str, ...]):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(code=(DIR / file).read_text(), options=options)


def ptr(t: torch.Tensor) -> np.uint64:
    """The device address of ``t``'s first element."""
    return np.uint64(t.data_ptr())


def i32(v: int) -> np.int32:
    return np.int32(v)


def i64(v: int) -> np.int64:
    return np.int64(v)


def launch(file: str, name: str, grid: Tuple[int, ...], block: Tuple[int, ...],
           args: Sequence, like: torch.Tensor) -> None:
    """Run kernel ``name`` of ``file`` with ``args`` on ``like``'s device and current stream."""
    import cupy

    device = like.device.index if like.device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(device):
        kernel = _module(file, device, OPTIONS).get_function(name)
        with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            kernel(grid, block, tuple(args))
