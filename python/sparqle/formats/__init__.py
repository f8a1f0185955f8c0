"""Weight formats: small classes of plain tensors, validated on construction."""
from .bell import BlockedELL
from .csr import CSR
from .int4 import Int4Weight

__all__ = ["CSR", "BlockedELL", "Int4Weight"]
