"""pytest-benchmark cases for CSR SpMM, the same as ``sparqle bench --quick`` runs.
Run ``pytest bench --benchmark-enable`` to time them (the default run only checks that
they run)."""
import pytest

from .bench_spmm_csr import grid, make_case

CASES = list(grid(quick=True))


@pytest.mark.parametrize("params", CASES, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("impl", ["sparqle", "dense", "torch.sparse"])
def test_spmm_csr(benchmark, params, impl):
    case = make_case(**params)
    fn = next(i for i in case.impls if i.name == impl).make(0)
    benchmark(fn)
