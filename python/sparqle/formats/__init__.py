"""Weight formats: small classes of plain tensors, validated on construction."""
from .csr import CSR

__all__ = ["CSR"]
