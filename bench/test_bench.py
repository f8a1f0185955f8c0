"""pytest-benchmark cases: what ``sparqle bench --quick`` runs, one test per op, case and
impl. ``pytest bench --benchmark-enable`` times them; the default run checks that they run."""
import importlib

import pytest

from sparqle.cli import BENCHMARKS

CASES = []
for op in BENCHMARKS:
    module = importlib.import_module(f"sparqle.bench.bench_{op}")
    for params in module.grid(quick=True):
        for impl in module.IMPLS:
            CASES.append(pytest.param(module, params, impl,
                                      id=f"{op}-{impl}-" + "-".join(f"{k}{v}" for k, v in params.items())))


@pytest.mark.parametrize("module,params,impl", CASES)
def test_bench(benchmark, module, params, impl):
    case = module.make_case(**params)
    benchmark(next(i for i in case.impls if i.name == impl).make(0))
