"""torch.library registrations of sparqle's ops (``torch.ops.sparqle.*``): fake impls,
per-device kernels picked by backend, and autograd; one module per op, imported by
sparqle.registry, which lists them."""
