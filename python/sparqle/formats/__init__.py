"""Weight formats: small classes of plain tensors, validated on construction."""
from .bell import BlockedELL
from .csr import CSR
from .fp8 import FP8Weight
from .int4 import Int4Weight
from .int8 import Int8Weight
from .nm import SemiStructured

__all__ = ["CSR", "BlockedELL", "SemiStructured", "Int4Weight", "Int8Weight", "FP8Weight"]
