"""The host path at small batch: what one call of each weight op costs above its kernel
(``sparqle bench --op overhead``).

For each format, on a small layer (64 x 64 on a CPU, 4096 x 4096 on a GPU) at one token, through
the module a converted model calls (``Int4Linear`` ...) and through ``sparqle.linear``:

- ``call_us``: one call (the best of 7 runs of back-to-back calls; on a GPU the calls are
  queued without synchronising, so a host-bound call's time is its host time);
- ``stubbed_us`` (CPU): the same call with the op's kernel launcher (the backend's function
  in ``sparqle.kernels.<backend>.<op>``) replaced by a stub that returns a preallocated
  output: the cost of everything above the kernel (argument checks, the custom op's
  dispatch, the backend choice, reshapes, and the extra tensor ops around the kernel);
- ``extra_ops``: the ATen kernels that stubbed call still runs (each a launch on a GPU:
  copies, casts, a bias add);
- ``python_calls``: the Python-level calls of that (stubbed, on a CPU) call: the host
  path's work as a count, which a loaded machine does not change as it changes times;
- ``over_bare_us``: call_us (GPU) or stubbed_us (CPU) minus one ``F.linear`` call on the
  dense weight, a bare launch of a library kernel.

The issue's goal is at most 15 us above a bare launch, eagerly on a GPU; a CPU's number is
the host path's cost on that CPU, its kernels excluded.
"""
import contextlib
import importlib
import sys
import time
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F

import sparqle
from sparqle.nn import FP8Linear, Int4Linear, Int8Linear, SparseLinear

from . import harness

OP = "overhead"
KEYS = ("op", "entry", "tokens", "out_features", "in_features")
# Profiler events that launch nothing (metadata, views, allocation).
_NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::view", "aten::reshape", "aten::t",
              "aten::transpose", "aten::as_strided", "aten::_reshape_alias", "aten::expand",
              "aten::detach", "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::select",
              "aten::slice", "aten::narrow", "aten::permute", "aten::resolve_conj",
              "aten::resolve_neg", "aten::lift_fresh", "aten::contiguous", "aten::numpy_T",
              "aten::empty_like", "aten::unbind", "aten::split", "aten::chunk", "aten::_unsafe_view"}


def _modules(linear: torch.nn.Linear) -> Dict[str, Tuple[torch.nn.Module, List[Tuple[str, str]]]]:
    """op -> (the converted module, the kernel launchers one forward at M = 1 calls, as
    (module under sparqle.kernels.<backend>, function))."""
    w = linear.weight.detach()
    return {
        "int4": (Int4Linear.from_linear(linear, group_size=32 if w.shape[1] < 128 else 128),
                 [("int4_linear", "int4_linear")]),
        "int8": (Int8Linear.from_linear(linear), [("int8_linear", "int8_linear")]),
        "int8-w8a16": (Int8Linear.from_linear(linear, activation=None), [("int8_linear", "int8_linear")]),
        "fp8": (FP8Linear.from_linear(linear), [("fp8_linear", "scaled_mm")]),
        "2:4": (SparseLinear.from_linear(linear, format="2:4"), [("nm_linear", "nm_linear")]),
        "csr": (SparseLinear.from_linear(linear, 0.9, format="csr"), [("spmm_csr", "csr_linear")]),
        "bell": (SparseLinear.from_linear(linear, 0.5, format="bell", block_size=16 if w.shape[0] < 256 else 64),
                 [("spmm_bell", "bell_linear")]),
    }


@contextlib.contextmanager
def stubbed(backend: str, launchers: List[Tuple[str, str]]) -> Iterator[None]:
    """Each launcher replaced by a stub that returns the output its first call gave (so a
    call costs everything above the kernel and nothing of it)."""
    saved = []
    for module_name, name in launchers:
        module = importlib.import_module(f"sparqle.kernels.{backend}.{module_name}")
        real, kept = getattr(module, name), {}

        def stub(*args, real=real, kept=kept, **kwargs):
            if "out" not in kept:
                kept["out"] = real(*args, **kwargs)
            return kept["out"]
        saved.append((module, name, real))
        setattr(module, name, stub)
    try:
        yield
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """The best of 7 runs of back-to-back calls (at most ``calls`` each, fewer when that
    would take over 50 ms), per call, in microseconds (a GPU synchronised before and after
    each run only): the host path's cost, which other work on the machine can only add to."""
    sync = torch.cuda.synchronize if harness.device().type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        fn()
    sync()
    calls = max(10, min(calls, int(0.05 / max(1e-9, (time.perf_counter() - start) / 10))))
    runs = []
    for _ in range(7):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return min(runs)


def python_calls(fn: Callable[[], object]) -> int:
    """The Python-level calls (functions, builtins and C methods such as ``x.dim()``) one
    call of ``fn`` makes: a count of the host path's work that the machine's load does not
    change."""
    fn()
    count = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            count[0] += 1
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0] - 1  # sys.setprofile(None) itself


def extra_ops(fn: Callable[[], object]) -> List[str]:
    """The ATen kernels one call of ``fn`` runs (leaf profiler events that launch)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(e.name for e in prof.events()
                  if e.name.startswith("aten::") and not e.cpu_children and e.name not in _NO_LAUNCH)


def report(quick: bool, progress: bool = True) -> dict:
    dev = harness.device()
    size = 4096 if dev.type == "cuda" else 64
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    calls = 200 if quick else 2000
    torch.manual_seed(0)
    linear = torch.nn.Linear(size, size, device=dev, dtype=dtype)
    x = torch.randn(1, size, device=dev, dtype=dtype)
    backend = "triton" if dev.type == "cuda" else "torch"
    rows = []
    with torch.no_grad(), sparqle.use_backend(backend):
        bare = per_call_us(lambda: F.linear(x, linear.weight, linear.bias), calls)
        rows.append({"op": "dense", "entry": "F.linear", "tokens": 1, "out_features": size, "in_features": size,
                     "call_us": bare,
                     "stubbed_us": None, "over_bare_us": 0.0, "extra_ops": None,
                     "python_calls": python_calls(lambda: F.linear(x, linear.weight, linear.bias))})
        for op, (module, launchers) in _modules(linear).items():
            weight = module.weight if not isinstance(module, FP8Linear) else module.quantized_weight(dtype)
            if isinstance(module, Int8Linear):
                weight = sparqle.Int8Weight._trusted(qweight=module.qweight, scales=module.scales, dtype=dtype)
            entries = {"module": lambda module=module: module(x),
                       "sparqle.linear": (lambda weight=weight, module=module: sparqle.functional.int8_linear(
                           x, weight, module.bias, module.activation)) if isinstance(module, Int8Linear)
                       else (lambda weight=weight, module=module: sparqle.linear(x, weight, module.bias))}
            for entry, fn in entries.items():
                row = {"op": op, "entry": entry, "tokens": 1, "out_features": size, "in_features": size}
                row["call_us"] = per_call_us(fn, calls)
                if dev.type == "cuda":
                    row.update(stubbed_us=None, over_bare_us=row["call_us"] - bare, extra_ops=None,
                               python_calls=python_calls(fn))
                else:
                    with stubbed(backend, launchers):
                        row["stubbed_us"] = per_call_us(fn, calls)
                        ops, count = extra_ops(fn), python_calls(fn)
                    row.update(over_bare_us=row["stubbed_us"] - bare, extra_ops=ops, python_calls=count)
                rows.append(row)
                if progress:
                    print(f"{op} {entry}: {row['call_us']:.1f} us/call"
                          + ("" if row["stubbed_us"] is None else f", stubbed {row['stubbed_us']:.1f} us, "
                             f"extra ops {row['extra_ops']}"), flush=True)
        stamp = harness.stamp()
    return {**stamp, "kind": OP,
            "notes": "call_us: one call, the best of 7 runs of back-to-back calls; stubbed_us (CPU): "
                     "the call with the kernel launcher stubbed (returns a preallocated output): the "
                     "host path above the kernel; extra_ops: the ATen kernels the stubbed call still "
                     "runs; over_bare_us: call_us (GPU) or stubbed_us (CPU) minus F.linear's call_us; "
                     "python_calls: the Python-level calls of one (stubbed) call, a count the "
                     "machine's load does not change.",
            "results": rows}


def cells(report_: dict) -> List[List[str]]:
    """The report's table: a header row, then one row per result (harness.cells_table and
    cells_markdown print it)."""
    rows = [["op", "entry", "tokens", "out", "in", "call us", "stubbed us", "over F.linear us", "Python calls",
             "extra ATen ops"]]
    for r in report_["results"]:
        rows.append([r["op"], r["entry"], str(r["tokens"]), str(r["out_features"]), str(r["in_features"]),
                     f"{r['call_us']:.1f}",
                     "" if r["stubbed_us"] is None else f"{r['stubbed_us']:.1f}", f"{r['over_bare_us']:.1f}",
                     str(r["python_calls"]), "" if r["extra_ops"] is None else (", ".join(r["extra_ops"]) or "none")])
    return rows


def plot(report_: dict, path: str) -> None:
    """us per call above F.linear, per op and entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in report_["results"] if r["op"] != "dense"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([f"{r['op']}\n{r['entry']}" for r in rows], [r["over_bare_us"] for r in rows])
    ax.axhline(15.0, color="red", linewidth=0.8, label="goal (GPU, eager)")
    ax.set(ylabel="us per call above F.linear", title=f"host path on {report_['device']}")
    ax.tick_params(axis="x", labelsize=6)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
