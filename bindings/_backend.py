"""Which backend runs an op: ``auto`` (default), or ``triton``, ``cupy``, ``torch`` forced
by ``SPARQLE_BACKEND`` or :func:`use_backend`.

``auto`` picks Triton for CUDA tensors whose dtype the op's Triton kernel takes, and the
torch path otherwise; an op with several ways to run on CUDA (N:M) times them on first use
per shape and keeps the fastest (bindings/_fastest.py). A forced backend that cannot run
raises ValueError saying why; it never falls back silently. The backward runs on the
forward's backend (bindings/_autograd.py).
"""
import contextlib
import contextvars
import importlib.util
import os
from types import ModuleType
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch

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
