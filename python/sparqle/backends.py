"""Backend choice (see sparqle.bindings._backend): ``use_backend``, ``SPARQLE_BACKEND``."""
from sparqle.bindings._backend import BACKENDS, cupy_status, requested_backend, status, triton_status, use_backend

__all__ = ["BACKENDS", "use_backend", "requested_backend", "status", "triton_status", "cupy_status"]
