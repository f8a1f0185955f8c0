"""torch.library registrations of sparqle's ops (``torch.ops.sparqle.*``): fake impls,
per-device kernels picked by backend, and autograd. Importing this package registers
every op."""
from . import int4_linear, int8_linear, spmm_bell, spmm_csr  # noqa: F401
from . import window_attention  # noqa: F401,E402
