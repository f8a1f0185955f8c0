"""torch.library registrations of sparqle's ops (``torch.ops.sparqle.*``): fake impls,
per-device kernels picked by backend, and autograd. Importing this package registers
every op."""
from . import fp8_linear, int4_linear, int8_linear, nm_linear, spmm_bell, spmm_csr, window_attention  # noqa: F401
