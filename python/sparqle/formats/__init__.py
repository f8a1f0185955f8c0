"""Weight formats: small classes of plain tensors, validated on construction."""
from .bell import BlockedELL
from .csr import CSR

__all__ = ["CSR", "BlockedELL"]
