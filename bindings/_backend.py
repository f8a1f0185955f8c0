"""Which backend runs an op: ``auto`` (default), or ``triton``, ``cupy``, ``torch`` forced
by ``SPARQLE_BACKEND`` or :func:`use_backend`.

``auto`` picks Triton for CUDA tensors whose dtype the op's Triton kernel takes, and the
torch path otherwise; an op with several ways to run on CUDA (N:M) times them on first use
per shape and keeps the fastest (:func:`fastest`). A forced backend that cannot run raises
ValueError saying why; it never falls back silently.
"""
import contextlib
import contextvars
import importlib.util
import os
import statistics
import time
import warnings
from types import ModuleType
from typing import Callable, Dict, Hashable, Iterator, Mapping, Optional, Tuple

import torch

from sparqle.kernels import _capture

BACKENDS = ("auto", "triton", "cupy", "torch")
FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_ENV = "SPARQLE_BACKEND"
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("sparqle_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the ``with`` block on backend ``name``."""
    token = _forced.set(_check_name(name, "name"))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend() -> str:
    """The backend asked for now: use_backend's, else SPARQLE_BACKEND's, else ``auto``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get(_ENV, "auto") or "auto", _ENV)


def triton_status(device: torch.device) -> Tuple[bool, str]:
    """Whether Triton kernels can run on ``device``, and why not."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (f"Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                   f"imported to run on CPU tensors; got {device.type} tensors")


def cupy_status(device: torch.device) -> Tuple[bool, str]:
    """Whether CuPy kernels can run on ``device``, and why not."""
    if importlib.util.find_spec("cupy") is None:
        return False, 'CuPy is not installed (pip install "sparqle[cupy]")'
    if device.type != "cuda":
        return False, f"CuPy kernels need CUDA tensors; got {device.type} tensors"
    return True, ""


def status(backend: str, device: torch.device) -> Tuple[bool, str]:
    """Whether ``backend`` (triton, cupy or torch) can run on ``device``, and why not."""
    if backend == "torch":
        return True, ""
    return {"triton": triton_status, "cupy": cupy_status}[backend](device)


def choose(op: str, device: torch.device, dtype: torch.dtype,
           dtypes: Mapping[str, frozenset]) -> str:
    """The backend that runs ``op`` on ``device`` for ``dtype``.

    ``dtypes`` maps each backend the op has to the dtypes that backend takes.
    """
    name = requested_backend()
    if name == "auto":
        # A backend measured faster than Triton for an op on CUDA would be preferred here;
        # none is yet (the CuPy kernels are unmeasured), so auto never picks cupy.
        if device.type == "cuda" and dtype in dtypes.get("triton", ()) and triton_status(device)[0]:
            return "triton"
        return "torch"
    if name not in dtypes:
        raise ValueError(f"backend {name!r} has no kernel for sparqle::{op}; "
                         f"it has {sorted(dtypes)}")
    ok, why = status(name, device)
    if not ok:
        raise ValueError(f"backend {name!r} cannot run sparqle::{op}: {why}")
    if dtype not in dtypes[name]:
        raise ValueError(f"backend {name!r} runs sparqle::{op} in "
                         f"{sorted(str(d) for d in dtypes[name])}, not {dtype}")
    return name


# (backend, module) -> sparqle.kernels.<backend>.<module>, once imported
_kernel_modules: Dict[Tuple[str, str], ModuleType] = {}


def kernels(backend: str, module: str) -> ModuleType:
    """The module ``sparqle.kernels.<backend>.<module>``, imported on first use so that a
    missing Triton or CuPy costs nothing until it is asked for (and looked up, not imported,
    on every later call)."""
    found = _kernel_modules.get((backend, module))
    if found is None:
        found = _kernel_modules[(backend, module)] = importlib.import_module(f"sparqle.kernels.{backend}.{module}")
    return found


def launch(module: str, op: str, dtypes: Mapping[str, frozenset], like: torch.Tensor, *args):
    """Run launcher ``op`` of ``sparqle.kernels.<backend>.<module>`` on the backend chosen
    for ``like``'s device and dtype."""
    backend = choose(op, like.device, like.dtype, dtypes)
    return getattr(kernels(backend, module), op)(*args)


# key -> the name of the candidate measured fastest for it
_fastest: Dict[Hashable, str] = {}
# A candidate agrees with the reference within this fraction of the reference's largest |y|:
# rounding and summation order stay far below it, a mis-indexed kernel far above.
_AGREEMENT = 1e-2


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


def remember_backend(ctx) -> None:
    """Record on an autograd ``ctx`` the backend :func:`use_backend` forced for the forward."""
    if not torch.compiler.is_compiling():  # Dynamo does not trace a ContextVar
        ctx.forced_backend = _forced.get()


@contextlib.contextmanager
def forward_backend(ctx) -> Iterator[None]:
    """Run a backward under the backend recorded by :func:`remember_backend`: the autograd
    engine runs CUDA backwards on its own threads, which do not see the forward's context.
    A compiled backward reads the backend when it runs: there only SPARQLE_BACKEND reaches
    a CUDA backward."""
    if torch.compiler.is_compiling():
        yield
        return
    token = _forced.set(ctx.forced_backend)
    try:
        yield
    finally:
        _forced.reset(token)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)``, the backward run under the
    backend forced for the forward (see :func:`forward_backend`)."""
    def setup(ctx, inputs, output):
        remember_backend(ctx)
        setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        with forward_backend(ctx):
            return backward(ctx, *grads)

    op.register_autograd(run_backward, setup_context=setup)
