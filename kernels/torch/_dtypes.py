"""compute_dtype, defined in sparqle.formats._checks (one helper for formats, kernels and
bindings): the CSR and Blocked-ELL torch paths still import it from here."""
from sparqle.formats._checks import compute_dtype  # noqa: F401
