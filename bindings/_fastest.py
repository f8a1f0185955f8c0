"""The measured choice: of several interchangeable ways to compute one result on a device
(N:M on CUDA: the Triton kernel, cuBLAS on the expanded weight, cuSPARSELt), run the one
measured fastest per key, each candidate's first result checked against the reference's.
"""
import statistics
import time
import warnings
from typing import Callable, Dict, Hashable, Mapping, Optional, Tuple

import torch

from sparqle.kernels import _capture

# key -> the name of the candidate measured fastest for it
_fastest: Dict[Hashable, str] = {}
# A candidate agrees with the reference within this fraction of the reference's largest |y|:
# rounding and summation order stay far below it, a mis-indexed kernel far above.
_AGREEMENT = 1e-2


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (1 for n <= 1): the timing keys' M (and CSR's
    entries per row), so that a few keys cover every size."""
    return 1 << max(0, n - 1).bit_length()


def _seconds(run: Callable[[], torch.Tensor], device: torch.device) -> float:
    """The median time of ``run()``: triton.testing.do_bench on CUDA (the L2 flushed between
    runs, about 25 ms in all), the median of 5 wall-clock runs elsewhere."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median") / 1e3
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _disagreement(y: torch.Tensor, reference: torch.Tensor) -> Optional[str]:
    """Why ``y`` is not ``reference`` up to rounding, or None."""
    scale = reference.abs().max().item() if reference.numel() else 0.0
    try:
        torch.testing.assert_close(y, reference, rtol=0, atol=_AGREEMENT * scale, equal_nan=True)
    except AssertionError as error:
        return str(error).splitlines()[0]
    return None


def fastest(key: Hashable, candidates: Mapping[str, Callable[[], torch.Tensor]],
            default: str, device: torch.device) -> torch.Tensor:
    """The result of the candidate measured fastest for ``key`` on ``device``.

    ``candidates`` are interchangeable ways to compute one result; the first is the
    reference. On the first call per key each runs, and is timed (:func:`_seconds`); one
    that raises, or whose result differs from the reference's by more than 1% of its
    largest magnitude, is dropped with a warning. Later calls run the winner only. While
    a CUDA graph is being captured nothing can be timed: the winner runs if known, else
    ``default``.
    """
    name = _fastest.get(key)
    if name is not None:
        return candidates[name]()
    if _capture.capturing():
        return candidates[default]()
    results: Dict[str, Tuple[float, torch.Tensor]] = {}
    reference = None
    for name, run in candidates.items():
        try:
            y = run()
        except Exception as error:  # e.g. a vendor library that does not run on this device
            if reference is None:
                raise
            warnings.warn(f"sparqle: {name} is not used for {key}: it raised {error!r}", RuntimeWarning)
            continue
        reference = y if reference is None else reference
        why = _disagreement(y, reference)
        if why is not None:
            warnings.warn(f"sparqle: {name} is not used for {key}: {why}", RuntimeWarning)
            continue
        results[name] = (_seconds(run, device), y)
    name = min(results, key=lambda n: results[n][0])
    _fastest[key] = name
    return results[name][1]


def forget_measurements() -> None:
    """Drop every choice :func:`fastest` has measured (the next call per key measures again)."""
    _fastest.clear()
