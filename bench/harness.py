"""Timing, roofline and reporting shared by the benchmarks.

GPU: ``triton.testing.do_bench`` medians, each call on the next of several input copies
that together exceed the L2 cache. CPU: ``torch.utils.benchmark`` medians. The memory
roof is measured in the same run (a large device-to-device copy); the compute roof is the
spec-sheet fp32 CUDA-core rate for known GPUs and is left out elsewhere. Each row also
reports the peak memory of one call (``peak_bytes``) next to its time.
"""
import ctypes
import datetime
import functools
import itertools
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import sparqle

# Spec-sheet fp32 (non-tensor-core) FLOP/s, by device name substring.
_FP32_PEAK = {"H200": 67e12, "H100 SXM": 67e12, "H100 PCIe": 51e12, "H100": 67e12,
              "A100": 19.5e12, "L40S": 91.6e12, "RTX 4090": 82.6e12}
_L2_FLUSH_BYTES = 256 << 20


@dataclass
class Impl:
    """One way to compute a case: ``make(copy)`` returns the callable timed on input copy ``copy``."""
    name: str
    make: Callable[[int], Callable[[], object]]
    bytes: float


@dataclass
class Case:
    op: str
    params: Dict[str, object]
    flops: float
    input_bytes: float
    impls: List[Impl] = field(default_factory=list)


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under torch.no_grad(): benchmarks time inference."""
    def call():
        with torch.no_grad():
            return fn()
    return call


def inputs(factory: Callable[[], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """Input copy ``i``, made by ``factory`` on first use and shared by every impl.
    Call it when building a timed callable, never inside one."""
    made: Dict[int, torch.Tensor] = {}

    def get(i: int) -> torch.Tensor:
        if i not in made:
            made[i] = factory()
        return made[i]
    return get


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def copies_for(input_bytes: float) -> int:
    """How many input copies to rotate through so that repeated calls miss the L2 cache."""
    if device().type != "cuda":
        return 1
    return max(1, min(8, int(_L2_FLUSH_BYTES // max(1.0, input_bytes)) + 1))


def time_quantiles(make: Callable[[int], Callable[[], object]], copies: int) -> Tuple[float, float, float]:
    """The 20th, 50th and 80th percentile times of one call, in milliseconds, the calls
    rotating over ``copies`` inputs: ``triton.testing.do_bench`` on a GPU (the L2 flushed
    before each call); on a CPU ``torch.utils.benchmark`` with the threads torch uses."""
    fns = [make(i) for i in range(copies)]
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        fns[state["i"]]()

    if device().type == "cuda":
        import triton.testing
        p20, p50, p80 = triton.testing.do_bench(step, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return float(p20), float(p50), float(p80)
    import torch.utils.benchmark as tb
    step()
    measured = tb.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()
                        ).blocked_autorange(min_run_time=0.2)
    times = sorted(t * 1e3 for t in measured.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.2), measured.median * 1e3, pick(0.8)


def time_ms(make: Callable[[int], Callable[[], object]], copies: int) -> float:
    """The median time of one call, in milliseconds (see :func:`time_quantiles`)."""
    return time_quantiles(make, copies)[1]


def once_ms(fn: Callable[[], object]) -> float:
    """One call's wall time in milliseconds (dry runs: the interpreter is too slow to repeat)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@functools.lru_cache(maxsize=None)
def _allocations_mapped() -> None:
    """Make glibc serve every allocation above 128 KiB from its own mapping, returned to
    the system when freed (its default, which it abandons after the first large free):
    otherwise a tensor reusing freed, still resident heap pages does not show in the
    resident set."""
    try:
        ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """The memory one call of ``fn`` holds at its peak beyond what was held before it, its
    output included: the CUDA allocator's peak on a GPU; on a Linux CPU the peak resident
    set (reset through /proc/self/clear_refs), to a page; None where neither can be read."""
    if device().type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _allocations_mapped()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current one
        before = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - before)
    except (OSError, StopIteration):
        return None


def memory_bandwidth() -> float:
    """Measured bytes/s of a large copy (read + write) on the benchmark device."""
    n = (256 << 20) // 4 if device().type == "cuda" else (64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device())
    dst = torch.empty_like(src)
    ms = time_ms(lambda _: lambda: dst.copy_(src), 1)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def fp32_peak() -> Optional[float]:
    if device().type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _FP32_PEAK.items() if k in name), None)


def device_name() -> str:
    if device().type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _commit() -> str:
    """The checkout's commit, "-dirty" when code differs from it (results and the
    performance page, which benchmarks rewrite, do not count); ``SPARQLE_COMMIT`` when set
    (a copy of the tree without its git folder, as on a lent GPU machine)."""
    if os.environ.get("SPARQLE_COMMIT"):
        return os.environ["SPARQLE_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        def git(*args):
            return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        dirty = git("status", "--porcelain", "--", ":/", ":(exclude,top)bench/results",
                    ":(exclude,top)docs/performance.md")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _driver() -> Optional[str]:
    """The NVIDIA driver's version, from nvidia-smi (None without one)."""
    if device().type != "cuda":
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        return out.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def stamp() -> dict:
    """What a result file says about where it was measured: device, date, commit, versions."""
    return {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "versions": {"sparqle": sparqle.__version__, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "driver": _driver(),
                     "python": platform.python_version(), "triton": _triton_version()},
        "backend": sparqle.backends.requested_backend(),
        "threads": torch.get_num_threads(),
    }


def run(cases: Sequence[Case], *, progress: bool = True) -> dict:
    """Time every impl of every case; speed-ups are relative to the impl named 'sparqle'."""
    bandwidth, peak = memory_bandwidth(), fp32_peak()
    rows = []
    iterator = cases
    if progress:
        from tqdm import tqdm
        iterator = tqdm(cases, desc="bench", unit="case", leave=False)
    for case in iterator:
        copies = copies_for(case.input_bytes)
        quantiles = {impl.name: time_quantiles(impl.make, copies) for impl in case.impls}
        times = {name: q[1] for name, q in quantiles.items()}
        peaks = {impl.name: peak_bytes(impl.make(0)) for impl in case.impls}
        for impl in case.impls:
            seconds = times[impl.name] * 1e-3
            roof = impl.bytes / bandwidth
            if peak is not None:
                roof = max(roof, case.flops / peak)
            rows.append({
                "op": case.op, **case.params, "impl": impl.name,
                "time_ms": times[impl.name],
                "p20_ms": quantiles[impl.name][0], "p80_ms": quantiles[impl.name][2],
                "peak_mb": None if peaks[impl.name] is None else peaks[impl.name] / 2**20,
                "tflops": case.flops / seconds / 1e12,
                "gbs": impl.bytes / seconds / 1e9,
                "roof_fraction": roof / seconds if impl.name == "sparqle" else None,
                "sparqle_speedup": times[impl.name] / times["sparqle"],
            })
    return {
        **stamp(),
        "measured_memory_bandwidth_gbs": bandwidth / 1e9,
        "fp32_peak_tflops": None if peak is None else peak / 1e12,
        "notes": "time_ms is the median, p20_ms and p80_ms the 20th and 80th percentiles; tflops "
                 "counts the useful FLOPs (2 * nnz * tokens) for every impl; gbs counts each impl's own "
                 "minimum traffic; roof_fraction = roofline time / measured time; sparqle_speedup = "
                 "impl time / sparqle time (above 1: sparqle is faster); peak_mb is the memory "
                 "one call holds at its peak beyond its inputs, output included (None: not "
                 "measurable).",
        "results": rows,
    }


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


LEGEND = ("ms: median time of one call (p20-p80 beside it); peak MB: the memory one call holds "
          "at its peak beyond its inputs, output included; roof: the roofline time over sparqle's; "
          "speed-up: the impl's time over sparqle's (above 1: sparqle is faster)")


def peak_cell(row: dict) -> str:
    """A row's peak memory per call for tables ("" where not measured)."""
    return "" if row.get("peak_mb") is None else f"{row['peak_mb']:.1f}"


def parameters(rows: Sequence[dict]) -> List[str]:
    """The fields of result ``rows`` that are parameters of the case (not measured, not the
    op or the impl), in their order."""
    return [k for k in rows[0] if k not in _MEASURED and k not in ("op", "impl")]


def result_cells(report: dict, keys: Sequence[str]) -> List[List[str]]:
    """The header, then one row of cells per result."""
    rows = [[*keys, "impl", "ms", "p20-p80 ms", "peak MB", "TFLOP/s", "GB/s", "roof", "speed-up"]]
    for r in report["results"]:
        roof = "" if r["roof_fraction"] is None else f"{100 * r['roof_fraction']:.1f}%"
        speedup = "" if r["impl"] == "sparqle" else f"{r['sparqle_speedup']:.2f}x"
        spread = f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}" if r.get("p20_ms") is not None else ""
        rows.append([*(str(r[k]) for k in keys), r["impl"], f"{r['time_ms']:.4f}", spread, peak_cell(r),
                     f"{r['tflops']:.3f}", f"{r['gbs']:.1f}", roof, speedup])
    return rows


def _where(report: dict) -> str:
    return (f"{report['device']} | torch {report['versions']['torch']} | backend "
            f"{report.get('backend', 'auto')} | {report.get('threads', '?')} threads | commit {report['commit']}")


def table(report: dict, keys: Sequence[str]) -> str:
    """The report as a text table, each column as wide as its widest cell, and its legend."""
    rows = result_cells(report, keys)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join([f"# {_where(report)}", f"# {LEGEND}"]
                     + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows])


def markdown(report: dict, keys: Sequence[str], title: str) -> str:
    """The report as a Markdown page: where and when it ran, the legend, the table."""
    head, *body = result_cells(report, keys)
    lines = [f"# {title}", "", f"{_where(report)} | {report['date']}", "", LEGEND + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def cells_table(report: dict, cells: Sequence[Sequence[str]]) -> str:
    """``cells`` (a header row, then one row per result) as a text table under where the
    report was measured, each column as wide as its widest cell: for reports with their own
    columns (bench_e2e, bench_overhead)."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join([f"# {_where(report)}"] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells])


def cells_markdown(report: dict, cells: Sequence[Sequence[str]], title: str) -> str:
    """``cells`` as a Markdown page: where and when it was measured, the report's notes, the table."""
    head, *body = cells
    lines = [f"# {title}", "", f"{_where(report)} | {report['date']}", "", report["notes"], "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def linear_grid(quick: bool, gpu_ms: Sequence[int], gpu_shapes: Sequence[tuple],
                cpu_shapes: Sequence[tuple]) -> Iterator[dict]:
    """The (tokens, out_features, in_features, dtype) cases of a linear-layer benchmark: bf16
    over ``gpu_ms`` x ``gpu_shapes`` on a GPU, fp32 over M in 1, 16, 256 x ``cpu_shapes``
    on a CPU; ``quick``: M in 1, 16 at 4096 x 4096."""
    on_gpu = device().type == "cuda"
    dtype = "bfloat16" if on_gpu else "float32"
    if quick:
        ms, shapes = [1, 16], [(4096, 4096)]
    elif on_gpu:
        ms, shapes = gpu_ms, gpu_shapes
    else:
        ms, shapes = [1, 16, 256], cpu_shapes
    for m, (n, k) in itertools.product(ms, shapes):
        yield {"tokens": m, "out_features": n, "in_features": k, "dtype": dtype}


def plot_speedups(report: dict, path: str, series_keys: Sequence[str], title: str,
                  x_key: str = "sparsity", log_x: bool = False) -> None:
    """Speed-up of sparqle over each baseline against ``x_key``, one line per value of
    ``series_keys``, one panel per baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    baselines = sorted({r["impl"] for r in rows} - {"sparqle"})
    fig, axes = plt.subplots(1, len(baselines), figsize=(6 * len(baselines), 4), squeeze=False)
    for ax, base in zip(axes[0], baselines):
        series: Dict[tuple, list] = {}
        for r in rows:
            if r["impl"] == base:
                series.setdefault(tuple(r[k] for k in series_keys), []).append(
                    (r[x_key], r["sparqle_speedup"]))
        for key, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=", ".join(f"{k}={v}" for k, v in zip(series_keys, key)))
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(title=f"sparqle vs {base}", xlabel=x_key, ylabel="speed-up (x)")
        if log_x:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
    fig.suptitle(f"{title} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, out_dir: str, op: str, keys: Optional[Sequence[str]] = None) -> str:
    """Write the report as ``<op>[-<backend>]-<device>.json`` in ``out_dir`` (the backend
    named when one was forced, so that such a run never passes for a normal one), and with
    ``keys``, its Markdown page beside it; returns the JSON's path."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in report["device"]).strip("-").lower()
    backend = report.get("backend", "auto")
    stem = os.path.join(out_dir, f"{op}-{slug}" if backend == "auto" else f"{op}-{backend}-{slug}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    if keys is not None:
        with open(stem + ".md", "w") as f:
            f.write(markdown(report, keys, op))
    return stem + ".json"


def compare(before: dict, after: dict) -> str:
    """The rows two reports share (same op, parameters and impl), with the time of each and
    after / before (below 1: ``after`` is faster): a change against main, one GPU against
    another."""
    def key(r):
        return tuple(sorted((k, str(v)) for k, v in r.items() if k in ("op", "impl") or k not in _MEASURED))
    old = {key(r): r for r in before["results"]}
    head = ["op", "case", "impl", "before ms", "after ms", "after/before"]
    rows = [head]
    for r in after["results"]:
        b = old.get(key(r))
        if b is None or not b.get("time_ms") or not r.get("time_ms"):
            continue
        case = " ".join(f"{k}={r[k]}" for k in parameters([r]))
        rows.append([r["op"], case, r["impl"], f"{b['time_ms']:.4f}", f"{r['time_ms']:.4f}",
                     f"{r['time_ms'] / b['time_ms']:.2f}x"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"# before: {before['device']}, commit {before['commit']}; after: {after['device']}, "
             f"commit {after['commit']}; {len(rows) - 1} shared rows"]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows])


# Row fields that are measurements, not parameters of the case.
_MEASURED = {"time_ms", "p20_ms", "p80_ms", "tflops", "gbs", "roof_fraction", "sparqle_speedup",
             "goal", "error", "missing", "agreement", "agrees", "peak_mb", "shape"}
