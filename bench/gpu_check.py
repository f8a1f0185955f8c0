"""``sparqle gpu-check OUTDIR [tests|bench|all] [--op FAMILY ...]``: the one run that a rare,
short GPU lease is spent on (scripts/gpu_check.sh installs sparqle, then calls this).

- **tests** (at most about 3 minutes): the tests that run on CUDA (``pytest --cuda-only``:
  every op on the cuda backends against the float64 oracle in fp16, bf16 and fp32 with
  gradients, CUDA-graph capture and replay of every op's forward, fullgraph compile), one
  autotune config per kernel (``SPARQLE_AUTOTUNE=one``), on every core (pytest-xdist).
- **bench** (at most about 4 minutes): the headline point of every family
  (bench/headline.py), autotuned, each baseline timed in the same run on the same inputs
  (``triton.testing.do_bench`` medians, the L2 flushed before every call, inputs rotated),
  small-M points also as CUDA-graph replays; the copy bandwidth and the matrix rates are
  measured first, and each time is set against them (``roof``: the roofline time over the
  measured time).
- Before each tier it prints what it will cost: tests and compiles for ``tests``, kernel
  compiles and autotune trials for ``bench`` (counted by running the points once with
  every launch skipped: :func:`sparqle.kernels.triton._autotune.planning`).

Everything lands in OUTDIR, at most 8 files, none deeper than OUTDIR: ``bench.json`` (the
bench/results schema: one report, every row tagged with its family, stamped with device,
driver, versions and commit), ``tests.log``, ``junit.xml`` and ``summary.md`` (one page).
``--dry-run`` proves all of it on a CPU (CI): tiny shapes, the Triton kernels interpreted
with one config, pytest collecting without running.
"""
import argparse
import contextlib
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from . import harness
from .headline import FAMILIES, Point, points

TIERS = ("tests", "bench", "all")
# pytest -k expression of each family: its test files (module names count) and the tests of
# shared files (test_nn, test_cuda_graphs) named after it.
FAMILY_TESTS = {"spmm_csr": "csr", "spmm_bell": "bell", "nm": "nm", "int4": "int4",
                "int8": "int8", "fp8": "fp8", "window_attention": "window", "e2e": "e2e"}
# The sparqle result agrees with the first baseline's within this relative (Frobenius) error:
# a check that a tuned config is not broken, not an accuracy test (quantized formats differ
# from the dense baseline by their quantization error).
AGREEMENT = {"spmm_csr": 0.03, "spmm_bell": 0.03, "nm": 0.03, "int4": 0.25, "int8": 0.08,
             "fp8": 0.15, "window_attention": 0.03}
TESTS_BUDGET_S, BENCH_BUDGET_S = 180, 240


def _elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.0f} s"


def _say(*parts) -> None:
    print("[gpu-check]", *parts, flush=True)


def _compiled_kernels() -> int:
    """Kernels in Triton's on-disk cache (one cubin each): counted before and after a tier."""
    from triton import knobs
    return len(glob.glob(os.path.join(knobs.cache.dir, "**", "*.cubin"), recursive=True))


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------

def pytest_command(out: str, families: Optional[Sequence[str]], dry_run: bool) -> List[str]:
    """The tests tier's pytest command line."""
    command = [sys.executable, "-m", "pytest", "tests", "--cuda-only", "-p", "no:cacheprovider",
               "-q", "-rfEs", f"--junitxml={os.path.join(out, 'junit.xml')}"]
    if families:
        command += ["-k", " or ".join(FAMILY_TESTS[f] for f in families)]
    if dry_run:
        return command + ["--collect-only"]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(min(16, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout", "150"]  # a hang fails one test instead of the lease
    return command


def _junit_counts(path: str) -> Dict[str, int]:
    """tests, failures, errors and skipped from a JUnit XML file (zeros when absent)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if not os.path.exists(path):
        return counts
    import xml.etree.ElementTree as ElementTree
    root = ElementTree.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    return counts


def run_tests(out: str, families: Optional[Sequence[str]], dry_run: bool,
              budget_s: float = TESTS_BUDGET_S) -> dict:
    """Run the tests tier; its log and JUnit XML go to ``out``."""
    command = pytest_command(out, families, dry_run)
    env = dict(os.environ, SPARQLE_AUTOTUNE="one", PYTHONUNBUFFERED="1")
    collect = subprocess.run([*pytest_command(out, families, True), "--junitxml="], env=env,
                             capture_output=True, text=True)
    selected = re.search(r"(\d+)(?:/\d+)? tests? collected", collect.stdout)
    selected = int(selected.group(1)) if selected else 0
    _say(f"tests: {selected} tests on the CUDA backends; autotune off (SPARQLE_AUTOTUNE=one): "
         f"0 autotune trials, one compile per kernel specialisation the tests meet")
    before, start = _compiled_kernels(), time.perf_counter()
    log_path = os.path.join(out, "tests.log")
    timed_out = False
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        try:
            result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=None if dry_run else budget_s + 60)
            returncode = result.returncode
        except subprocess.TimeoutExpired:
            timed_out, returncode = True, None
            log.write(f"\n[gpu-check] stopped after {budget_s + 60:.0f} s\n")
    seconds = time.perf_counter() - start
    with open(log_path) as log:
        tail = log.read().splitlines()
    summary = next((line for line in reversed(tail) if re.search(r"passed|failed|error|collected|no tests", line)), "")
    tests = {"command": " ".join(command[2:]), "selected": selected, "returncode": returncode,
             "timed_out": timed_out, "seconds": round(seconds, 1), "summary": summary.strip("= "),
             "compiles": _compiled_kernels() - before, "dry_run": dry_run,
             **_junit_counts(os.path.join(out, "junit.xml"))}
    tests["failed_tests"] = [line[len("FAILED "):] for line in tail if line.startswith(("FAILED ", "ERROR "))][:50]
    _say(f"tests: {tests['summary'] or 'no summary'} ({seconds:.0f} s, {tests['compiles']} compiles)")
    return tests


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------

def _tiny(point: Point) -> Dict[str, object]:
    """The point's parameters shrunk for a CPU dry run (the interpreter runs the kernels)."""
    p = dict(point.params, dtype="float32")
    if point.family in ("int4", "int8", "fp8", "nm"):
        # M keeps its regime (1, a few rows, tiled) and stays distinct per point.
        m = p["tokens"]
        p.update(tokens=1 if m == 1 else 3 if m <= 16 else 32 + m.bit_length(), out_features=48,
                 in_features=128 if point.family == "int4" else 64)
    elif point.family == "spmm_csr":
        p.update(out_features=40, in_features=48, tokens=24)
    elif point.family == "spmm_bell":
        p.update(out_features=48, in_features=64, tokens=24, block=16, sparsity=0.5)
    elif point.family == "window_attention":  # the model's last stage: one window per image
        from .bench_window_attention import MODELS
        p.update(stage=len(MODELS[p["model"]][1]), batch=1, heads=2)
    elif point.family == "e2e":  # the tiny Llama, the reference Swin
        p.update(model="llama-tiny", layers=None) if "layers" in p else p.update(model="swin-reference", batch=2)
    return p


def _matrix_rates() -> Dict[str, float]:
    """Measured TFLOP/s of a large product: bf16 (cuBLAS), int8 (torch._int_mm) and FP8
    (torch._scaled_mm, sm_89+) on a GPU; fp32 on a CPU. Each rate is the roof of the
    families computing in that type."""
    rates: Dict[str, float] = {}
    dev = harness.device()
    size = 8192 if dev.type == "cuda" else 512

    def rate(key: str, fn: Callable[[], object]) -> None:
        try:
            rates[key] = 2.0 * size ** 3 / (harness.time_ms(lambda _: fn, 1) * 1e-3) / 1e12
        except (RuntimeError, TypeError) as error:  # not on this device
            _say(f"no {key} matrix rate: {error}")

    if dev.type != "cuda":
        a = torch.randn(size, size)
        rate("float32", lambda: a @ a)
        return rates
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    rate("bfloat16", lambda: a @ a)
    a8 = torch.randint(-127, 128, (size, size), device=dev, dtype=torch.int8)
    b8 = a8.t().contiguous()  # row-major [K, N], as bench_int8 passes it
    rate("int8", lambda: torch._int_mm(a8, b8))
    if torch.cuda.get_device_capability(dev) >= (8, 9):
        f8, one = a.to(torch.float8_e4m3fn), torch.ones((), device=dev)
        rate("float8", lambda: torch._scaled_mm(f8, f8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return rates


_RATE_OF_FAMILY = {"int8": "int8", "fp8": "float8"}


def _ceiling(point: Point, case: harness.Case, impl: harness.Impl, seconds: float,
             bandwidth: float, rates: Dict[str, float]) -> Optional[float]:
    """The roofline time over the measured time: memory (the measured copy bandwidth) or
    matrix rate (measured for the type the family computes in), whichever bounds."""
    rate = rates.get(_RATE_OF_FAMILY.get(point.family, "bfloat16")) or next(iter(rates.values()), None)
    roof = impl.bytes / bandwidth
    if rate:
        roof = max(roof, case.flops / (rate * 1e12))
    return roof / seconds


def _flat(result) -> torch.Tensor:
    tensors = result if isinstance(result, (tuple, list)) else [result]
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _relative_error(got, want) -> float:
    got, want = _flat(got), _flat(want)
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _graph_ms(make: Callable[[int], Callable[[], object]], copies: int) -> float:
    """Median time of a CUDA-graph replay of each input copy's call (warmed up outside capture)."""
    import triton.testing
    fns = [make(i) for i in range(copies)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    state = {"i": 0}

    def replay():
        state["i"] = (state["i"] + 1) % copies
        graphs[state["i"]].replay()
    return float(triton.testing.do_bench(replay, warmup=25, rep=100, return_mode="median"))


def _once_ms(make: Callable[[int], Callable[[], object]], copies: int) -> float:
    """One call's wall time (dry run: the interpreter is too slow to repeat)."""
    return harness.once_ms(make(0))


@contextlib.contextmanager
def _forced_triton(dry_run: bool):
    """The dry run forces Triton (interpreted) for sparqle, so that its kernels run."""
    import sparqle
    with sparqle.use_backend("triton") if dry_run else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _e2e_backend(dry_run: bool):
    """The dry run runs the e2e family's whole (tiny) models on the torch path: interpreted,
    they take minutes each, and the other points run every kernel interpreted already."""
    import sparqle
    with sparqle.use_backend("torch") if dry_run else contextlib.nullcontext():
        yield


def _build(selected: Sequence[Point], dry_run: bool) -> List[Optional[harness.Case]]:
    """The case of each point (None for the e2e family: bench_e2e.headline_rows builds and
    measures its models itself, after the other points)."""
    cases = []
    for point in selected:
        if point.family == "e2e":
            cases.append(None)
            continue
        module = importlib.import_module(f"sparqle.bench.bench_{point.family}")
        cases.append(module.make_case(**(_tiny(point) if dry_run else point.params)))
    return cases


def plan(selected: Sequence[Point], cases: Sequence[harness.Case], dry_run: bool):
    """Run sparqle's impl of every point once with every kernel launch skipped; the plan
    counts the compiles and autotune trials the real run will cause. Measurements a skipped
    launch would spoil (the N:M dispatch's timing) are forgotten afterwards."""
    from sparqle.bindings import _fastest
    from sparqle.kernels.triton._autotune import planning
    with planning() as counted, warnings.catch_warnings(), _forced_triton(dry_run):
        warnings.simplefilter("ignore")
        for case in cases:
            if case is not None:
                next(i for i in case.impls if i.name == "sparqle").make(0)()
    _fastest.forget_measurements()
    return counted


def _measured_choices() -> Dict[str, str]:
    """What auto's measured dispatch chose per key during the run (N:M, int8 W8A8, CSR on
    CUDA: bindings/_fastest.py), the key written out as text."""
    from sparqle.bindings import _fastest
    return {repr(key): name for key, name in _fastest._fastest.items()}


def run_bench(out: str, families: Optional[Sequence[str]], dry_run: bool,
              budget_s: float = BENCH_BUDGET_S) -> dict:
    """Time the headline points of ``families``; returns the report (also written to out)."""
    selected = points(families)
    start = time.perf_counter()
    bandwidth, rates = harness.memory_bandwidth(), _matrix_rates()
    _say(f"ceilings: copy {bandwidth / 1e9:.0f} GB/s; matrix "
         + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in rates.items()) + f" ({_elapsed(start)})")
    cases = _build(selected, dry_run)
    counted = plan(selected, cases, dry_run)
    trials, compiles = sum(counted.trials.values()), len(counted.compiles)
    _say(f"bench: {len(selected)} points will cause {compiles} kernel compiles and {trials} "
         f"autotune trials: " + ", ".join(f"{k} {v}" for k, v in sorted(counted.compiles_by_kernel().items())))
    before, rows = _compiled_kernels(), []
    timer = _once_ms if dry_run else harness.time_ms
    graphs = harness.device().type == "cuda"
    for point, case in zip(selected, cases):
        params = _tiny(point) if dry_run else point.params
        if time.perf_counter() - start > budget_s:
            rows.append({**_row(point, case, "sparqle", "eager"), "shape": _shape(params), **params,
                         "missing": f"not run: the {budget_s:.0f} s budget was spent"})
            continue
        if case is None:
            from .bench_e2e import headline_rows
            with _e2e_backend(dry_run):
                rows += headline_rows(params, point.goals, dry_run)
        else:
            rows += _time_point(point, case, timer, graphs and point.graphs, bandwidth, rates, dry_run)
        _say(f"{point.family} {_shape(params)}: done ({_elapsed(start)})")
    if any(case is None for case in cases):
        from .bench_e2e import forget_headline_models
        forget_headline_models()
    report = {**harness.stamp(), "kind": "gpu-check",
              "measured_memory_bandwidth_gbs": bandwidth / 1e9,
              "measured_matrix_tflops": rates, "fp32_peak_tflops": None,
              "plan": {"compiles": compiles, "autotune_trials": trials,
                       "compiles_by_kernel": counted.compiles_by_kernel(), "trials_by_kernel": counted.trials},
              "compiled": _compiled_kernels() - before, "seconds": round(time.perf_counter() - start, 1),
              "measured_choices": _measured_choices(),
              "dry_run": dry_run,
              "notes": "time_ms: do_bench median with the L2 flushed before every call (GPU) or one "
                       "call (dry run); timing: eager or graph (CUDA-graph replay); "
                       "sparqle_speedup: impl time / sparqle time of the same timing, so a baseline's "
                       "ratio is its goal's measure; roof_fraction: roofline time (measured copy "
                       "bandwidth, measured matrix rate of the family's type) / measured time; "
                       "agreement: relative error of sparqle's result against the first baseline's.",
              "results": rows}
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _shape(params: Dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("dtype", "model"))


def _row(point: Point, case: harness.Case, name: str, timing: str, ms: Optional[float] = None,
         error: Optional[str] = None, missing: Optional[str] = None) -> dict:
    """One result row; ``error``: it failed (a finding), ``missing``: it cannot run here."""
    impl = next((i for i in case.impls if i.name == name), None) if case is not None else None
    params = case.params if case is not None else {}
    return {"op": point.family, "shape": _shape(params), **params, "impl": name,
            "timing": timing, "time_ms": ms, "tflops": case.flops / (ms * 1e-3) / 1e12 if ms and case else None,
            "gbs": impl.bytes / (ms * 1e-3) / 1e9 if ms and impl else None,
            "roof_fraction": None, "sparqle_speedup": None, "goal": point.goals.get(name), "error": error,
            "missing": missing}


def _time_point(point: Point, case: harness.Case, timer, graphs: bool, bandwidth: float,
                rates: Dict[str, float], dry_run: bool) -> List[dict]:
    impls = {i.name: i for i in case.impls}
    names = ["sparqle"] + [b for b in point.goals if b in impls]
    rows = [_row(point, case, b, "eager", missing="not available on this machine")
            for b in point.goals if b not in impls]
    copies = harness.copies_for(case.input_bytes)
    agreement = None
    with _forced_triton(dry_run):
        results = {}
        for name in names[:2]:
            try:
                results[name] = impls[name].make(0)()
            except Exception as error:  # noqa: BLE001 - reported in the row
                results[name] = error
        if len(names) > 1 and not any(isinstance(r, Exception) for r in results.values()):
            agreement = _relative_error(results["sparqle"], results[names[1]])
        for timing in ("eager", "graph") if graphs else ("eager",):
            measured = {}
            for name in names:
                try:
                    ms = (_graph_ms if timing == "graph" else timer)(impls[name].make, copies)
                    measured[name] = _row(point, case, name, timing, ms)
                except Exception as error:  # noqa: BLE001 - a finding, reported in the row
                    measured[name] = _row(point, case, name, timing, error=f"{type(error).__name__}: {error}"[:300])
            base = measured["sparqle"]
            if base["time_ms"]:
                base["roof_fraction"] = _ceiling(point, case, impls["sparqle"], base["time_ms"] * 1e-3, bandwidth, rates)
                base["agreement"] = agreement
                base["agrees"] = agreement is not None and agreement <= AGREEMENT[point.family]
                for row in measured.values():
                    if row["time_ms"]:
                        row["sparqle_speedup"] = row["time_ms"] / base["time_ms"]
            rows += measured.values()
    return rows


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------

def headline_table(report: dict) -> List[str]:
    """Markdown rows, one per (point, timing, baseline): sparqle's time, the baseline's, their
    ratio beside its goal, sparqle's fraction of the roofline and its agreement."""
    lines = ["| op | shape | dtype | timing | sparqle ms | baseline | baseline ms | ratio | goal | met | roof | agrees |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, List[dict]] = {}
    for row in report["results"]:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["timing"]), []).append(row)
    for (op, shape, dtype, timing), rows in groups.items():
        mine = next(r for r in rows if r["impl"] == "sparqle")
        others = [r for r in rows if r is not mine] or [mine]
        for row in others:
            ratio, goal = row["sparqle_speedup"], row["goal"]
            baseline = row is not mine
            cells = [op, shape, dtype, timing, _num(mine["time_ms"]) or mine["error"] or mine["missing"] or "",
                     row["impl"] if baseline else "", _num(row["time_ms"]) if baseline else "",
                     f"{ratio:.2f}x" if ratio and baseline else (row["error"] or row["missing"] or "") if baseline else "",
                     f"{goal:.2f}x" if goal else "",
                     "" if ratio is None or goal is None else ("yes" if ratio >= goal else "**no**"),
                     f"{100 * mine['roof_fraction']:.0f}%" if mine["roof_fraction"] else "",
                     "" if mine.get("agreement") is None else
                     ("yes" if mine["agrees"] else "**no**") + f" ({mine['agreement']:.1e})"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _num(ms: Optional[float]) -> str:
    return "" if ms is None else f"{ms:.4f}"


def write_summary(out: str, tests: Optional[dict], bench: Optional[dict], started: float) -> str:
    """summary.md: where it ran, what the tests found, the headline table."""
    stamp = bench if bench else harness.stamp()
    versions = stamp["versions"]
    lines = ["# sparqle GPU check", "",
             f"{stamp['device']}, driver {versions.get('driver')}, torch {versions['torch']} (CUDA "
             f"{versions['cuda']}), triton {versions['triton']}; commit {stamp['commit']}, {stamp['date']}; "
             f"{time.perf_counter() - started:.0f} s in all.", ""]
    if tests is not None:
        lines += ["## Tests", "", f"`{tests['command']}` (SPARQLE_AUTOTUNE=one): {tests['summary']}; "
                  f"{tests['seconds']} s, {tests['compiles']} kernels compiled"
                  + (", **stopped at the time limit**" if tests["timed_out"] else "") + ".", ""]
        lines += [f"- {name}" for name in tests["failed_tests"]] + ([""] if tests["failed_tests"] else [])
    if bench is not None:
        lines += ["## Headline points", "",
                  f"Measured ceilings: copy {bench['measured_memory_bandwidth_gbs']:.0f} GB/s; "
                  + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in bench["measured_matrix_tflops"].items())
                  + f". Planned {bench['plan']['compiles']} compiles and {bench['plan']['autotune_trials']} "
                  f"autotune trials; {bench['compiled']} kernels compiled; {bench['seconds']} s.", "",
                  "`ratio`: baseline time / sparqle time (above 1: sparqle is faster); `goal`: the ratio "
                  "the issues ask for; `roof`: roofline time / sparqle's time; `agrees`: sparqle's result "
                  "matches the first baseline's (within the quantization error of its format).", ""]
        lines += headline_table(bench)
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sparqle gpu-check", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", help="where the JSON, logs and summary go")
    parser.add_argument("tier", nargs="?", default="all", choices=TIERS)
    parser.add_argument("--op", action="append", choices=FAMILIES, help="only this family (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="prove the check on a CPU: tiny shapes, interpreted kernels, tests collected only")


def run(args) -> int:
    """Run the tiers asked for; 0 when every test passed and every point that ran agreed and
    raised nothing (a baseline this machine lacks, or a point past the budget, is reported
    as missing, not as a failure)."""
    started = time.perf_counter()
    os.makedirs(args.outdir, exist_ok=True)
    if harness.device().type != "cuda":
        if not args.dry_run:
            _say("no CUDA device: running as --dry-run")
            args.dry_run = True
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:
                raise RuntimeError("a dry run on a CPU needs TRITON_INTERPRET=1 set before triton is imported")
            os.environ["TRITON_INTERPRET"] = "1"
    tests = bench = None
    if args.tier in ("tests", "all"):
        tests = run_tests(args.outdir, args.op, args.dry_run)
    if args.tier in ("bench", "all"):
        bench = run_bench(args.outdir, args.op, args.dry_run)
        print("\n".join(headline_table(bench)), flush=True)
    path = write_summary(args.outdir, tests, bench, started)
    _say(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    tests_ok = tests is None or (tests["returncode"] == 0 and not tests["timed_out"])
    bench_ok = bench is None or all(not r["error"] and (r["impl"] != "sparqle" or r["missing"]
                                                        or r.get("agrees") is not False)
                                    for r in bench["results"])
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
