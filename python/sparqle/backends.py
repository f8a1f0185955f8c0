"""Backend choice (see sparqle.bindings._backend): ``use_backend``, ``SPARQLE_BACKEND``."""
from sparqle.bindings._backend import BACKENDS, cupy_status, requested_backend, triton_status, use_backend

__all__ = ["BACKENDS", "use_backend", "requested_backend", "triton_status", "cupy_status"]
