"""Timing, roofline and reporting shared by the benchmarks.

GPU: ``triton.testing.do_bench`` medians, each call on the next of several input copies
that together exceed the L2 cache. CPU: ``torch.utils.benchmark`` medians. The memory
roof is measured in the same run (a large device-to-device copy); the compute roof is the
spec-sheet fp32 CUDA-core rate for known GPUs and is left out elsewhere.
"""
import datetime
import itertools
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

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


def time_ms(make: Callable[[int], Callable[[], object]], copies: int) -> float:
    """The median time of one call, in milliseconds."""
    fns = [make(i) for i in range(copies)]
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        fns[state["i"]]()

    if device().type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    import torch.utils.benchmark as tb
    step()
    return tb.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=0.2).median * 1e3


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
        times = {impl.name: time_ms(impl.make, copies) for impl in case.impls}
        for impl in case.impls:
            seconds = times[impl.name] * 1e-3
            roof = impl.bytes / bandwidth
            if peak is not None:
                roof = max(roof, case.flops / peak)
            rows.append({
                "op": case.op, **case.params, "impl": impl.name,
                "time_ms": times[impl.name],
                "tflops": case.flops / seconds / 1e12,
                "gbs": impl.bytes / seconds / 1e9,
                "roof_fraction": roof / seconds if impl.name == "sparqle" else None,
                "sparqle_speedup": times[impl.name] / times["sparqle"],
            })
    return {
        **stamp(),
        "measured_memory_bandwidth_gbs": bandwidth / 1e9,
        "fp32_peak_tflops": None if peak is None else peak / 1e12,
        "notes": "tflops counts the useful FLOPs (2 * nnz * n) for every impl; gbs counts each "
                 "impl's own minimum traffic; roof_fraction = roofline time / measured time; "
                 "sparqle_speedup = impl time / sparqle time.",
        "results": rows,
    }


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def table(report: dict, keys: Sequence[str]) -> str:
    """The report as a fixed-width text table."""
    head = [*keys, "impl", "ms", "TFLOP/s", "GB/s", "roof", "speed-up"]
    lines = [f"# {report['device']} | torch {report['versions']['torch']} | commit {report['commit']}",
             "  ".join(f"{h:>12}" for h in head)]
    for r in report["results"]:
        roof = "" if r["roof_fraction"] is None else f"{100 * r['roof_fraction']:.1f}%"
        speedup = "" if r["impl"] == "sparqle" else f"{r['sparqle_speedup']:.2f}x"
        cells = [*(str(r[k]) for k in keys), r["impl"], f"{r['time_ms']:.4f}",
                 f"{r['tflops']:.3f}", f"{r['gbs']:.1f}", roof, speedup]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def linear_grid(quick: bool, gpu_ms: Sequence[int], gpu_shapes: Sequence[tuple],
                cpu_shapes: Sequence[tuple]) -> Iterator[dict]:
    """The (m, n, k, dtype) cases of a linear-layer benchmark, (n, k) = (out, in): bf16
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
        yield {"m": m, "n": n, "k": k, "dtype": dtype}


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


def write(report: dict, out_dir: str, op: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in report["device"]).strip("-").lower()
    path = os.path.join(out_dir, f"{op}-{slug}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path
