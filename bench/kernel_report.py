"""The kernel report: what sparqle's Triton kernels compile to on Hopper (sm_90) at the
headline points (bench/headline.py), without a GPU.

    python -m sparqle.bench.kernel_report [--out PATH] [--op FAMILY ...]

For each headline point the launchers that its ``sparqle`` impl calls run on meta tensors of
the point's shapes inside ``planning()`` (see kernel_specs: nothing is launched or
allocated), and each kernel they call is compiled for sm_90 with every config of its tuning
space at the specialisation that call records. Per kernel and config the report gives, from
Triton's bundled ``ptxas -v`` and ``nvdisasm`` of the cubin: registers, spills, shared
memory, the occupancy those allow, the matrix instructions (wgmma or mma.sync), and per
``tl.load`` stream whether it goes through the software pipeline (cp.async or TMA) and at
what width. Output: Markdown, one table per kernel (``bench/results/kernel-report-sm90.md``
is the committed run). Run it without ``TRITON_INTERPRET``.
"""
import argparse
import ast
import collections
import datetime
import functools
import importlib
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
import triton
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

from . import kernel_specs
from .headline import FAMILIES, Point, points
from .kernel_specs import TARGETS, Case, Spec, tensor

ARCH = 90
TARGET = TARGETS[ARCH]

# --- the launcher calls of each family's headline impl -----------------------------------


def _dtype(params: Dict[str, object]) -> torch.dtype:
    return getattr(torch, str(params["dtype"]))


def _csr(p) -> List[Case]:
    """sparqle.spmm(A [m, k] CSR, b [k, n]): csr_linear of x = b^T (a transposed view) with
    m * k * (1 - sparsity) entries, and the tensor-core path the binding times against it."""
    nnz = round(p["out_features"] * p["in_features"] * (1 - p["sparsity"]))
    return (kernel_specs.csr_cases(p["out_features"], p["in_features"], p["tokens"], nnz, _dtype(p),
                                   transposed_x=True, sddmm=False, archs=(ARCH,))
            + kernel_specs.csr_bitmap_cases(p["out_features"], p["in_features"], p["tokens"], nnz, _dtype(p),
                                            transposed_x=True, archs=(ARCH,)))


def _bell(p) -> List[Case]:
    """sparqle.linear(x [n, k], A [m, k] Blocked-ELL): bell_linear. The width (the most blocks
    kept in a block-row) depends on the weights; the mean is taken: it only sets a loop count."""
    width = math.ceil((1 - p["sparsity"]) * p["in_features"] / p["block"])
    return kernel_specs.bell_cases(p["tokens"], p["out_features"], p["in_features"], p["block"], width, _dtype(p),
                                   ("linear",), archs=(ARCH,))


def _nm(p) -> List[Case]:
    """sparqle.linear(x [m, k], W [n, k] 2:4): the Triton kernel, and nm_to_dense (the
    expansion for cuBLAS and cuSPARSELt), the candidates the binding times."""
    x = tensor(p["tokens"], p["in_features"], dtype=_dtype(p))
    return kernel_specs.nm_cases(x, p["out_features"], 2, 4, False, to_dense=True, archs=(ARCH,))


def _int4(p) -> List[Case]:
    from .bench_int4 import GROUP
    x = tensor(p["tokens"], p["in_features"], dtype=_dtype(p))
    return kernel_specs.int4_cases(x, p["out_features"], False, GROUP, (ARCH,))


def _int8(p) -> List[Case]:
    """sparqle.linear(x, Int8Weight): W8A8 (x quantized per row first, by the launcher), the
    Triton GEMM and torch._int_mm's epilogue, the candidates the binding times."""
    x = tensor(p["tokens"], p["in_features"], dtype=_dtype(p))
    return (kernel_specs.int8_cases(x, p["out_features"], False, True, (ARCH,))
            + kernel_specs.int8_int_mm_cases(x, p["out_features"], False, (ARCH,)))


def _fp8(p) -> List[Case]:
    """sparqle.linear(x, FP8Weight e4m3) with row-wise and tensor-wise weight scales (the
    ``sparqle`` and ``sparqle-tensor`` impls): above FP8_WEIGHT_ONLY_MAX_M
    (sparqle.kernels.dispatch), x quantized per row to e4m3 and FP8 x FP8; at or below it,
    weight-only."""
    from sparqle.bindings.fp8_linear import E4M3
    from sparqle.kernels.dispatch import FP8_WEIGHT_ONLY_MAX_M
    x = tensor(p["tokens"], p["in_features"], dtype=_dtype(p))
    if p["tokens"] <= FP8_WEIGHT_ONLY_MAX_M:
        return [c for rows in (True, False)
                for c in kernel_specs.fp8_mm_cases(x, p["out_features"], E4M3, x.dtype, False, rows)]
    q = tensor(p["tokens"], p["in_features"], dtype=E4M3)
    return kernel_specs.fp8_quantize_cases(x, E4M3, False) + [
        c for rows in (True, False)
        for c in kernel_specs.fp8_mm_cases(q, p["out_features"], E4M3, x.dtype, False, rows)]


def _window_attention(p) -> List[Case]:
    """sparqle.window_attention on the stage's windows with the relative-position bias and
    the shift mask (by b % nW); with its backward for ``fwd+bwd``."""
    from .bench_window_attention import HEAD_DIM, MODELS
    window, sides, _ = MODELS[p["model"]]
    per_image = (sides[p["stage"] - 1] // window) ** 2
    return kernel_specs.window_attention_cases(p["batch"] * per_image, p["heads"], p["n"], HEAD_DIM, _dtype(p), True,
                                               per_image, False, backward=p["mode"] == "fwd+bwd", archs=(ARCH,))


HEADLINE_CASES = {"spmm_csr": _csr, "spmm_bell": _bell, "nm": _nm, "int4": _int4, "int8": _int8,
                  "fp8": _fp8, "window_attention": _window_attention}
# Families of whole models (e2e) are left out: their kernels are the other families'.


# --- reading a compiled kernel ------------------------------------------------------------

class Spills(NamedTuple):
    stores: int    # bytes of spill stores per thread
    loads: int     # bytes of spill loads per thread


def spills(ptx: str) -> Spills:
    """ptxas -v's spill bytes for ``ptx`` on sm_90 (ptxas run as Triton runs it)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(ARCH).path, "-lineinfo", "-v",
                              f"--gpu-name={sm_arch_from_capability(ARCH)}", source, "-o", source + ".o"],
                             check=True, capture_output=True, text=True).stderr
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return Spills(*map(int, found.groups()))


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
WGMMA = ("HGMMA", "QGMMA", "IGMMA", "BGMMA")   # warpgroup MMA (wgmma): Hopper
MMA_SYNC = ("HMMA", "IMMA", "DMMA", "BMMA")   # warp MMA (mma.sync): Ampere's, also on Hopper
TMA = ("UTMALDG", "UBLKCP")                   # the tensor memory accelerator's loads
OTHER = "(other)"  # a load whose line info names a line without a tl.load


def _width(suffixes: str) -> int:
    """The bits of a load from its SASS suffixes (.128, .64, .U16, .S8, ...; none: 32)."""
    for token, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if token in suffixes + ".":
            return bits
    return 32


@functools.lru_cache(maxsize=None)
def _source(path: str) -> Optional[str]:
    """The file of this checkout that line info's ``path`` names: itself, or, for a cubin that
    Triton's cache kept from a compile of the same source in another checkout (a worktree
    since removed), the file at the same place under this checkout's ``kernels/``."""
    if os.path.exists(path):
        return path
    parts = path.replace(os.sep, "/").split("/")
    if "kernels" in parts:
        tail = parts[len(parts) - 1 - parts[::-1].index("kernels") + 1:]
        here = os.path.join(os.path.dirname(importlib.import_module("sparqle.kernels").__file__), *tail)
        if os.path.exists(here):
            return here
    return None


@functools.lru_cache(maxsize=None)
def _load_streams(path: str) -> Dict[int, str]:
    """Source line -> what a load on that line reads: a ``tl.load``'s pointer (its first
    ``*_ptr`` name), or the tensor descriptor of a ``desc.load`` (TMA)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    lines: Dict[int, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and node.args):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id != "tl":
                name = f"{owner.id} (descriptor)"
            else:
                names = [n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name) and n.id.endswith("_ptr")]
                name = names[0] if names else OTHER
            for line in range(node.lineno, node.end_lineno + 1):
                lines[line] = name
    return lines


class Sass(NamedTuple):
    mma: Dict[str, int]                   # matrix instruction -> count
    ldg: Dict[int, int]                   # plain global loads: bits -> count
    cp_async: int                         # LDGSTS
    tma: int                              # UTMALDG, UBLKCP
    barriers: int                         # BAR (bar.sync and its kin): CTA-wide barriers
    streams: Dict[str, Dict[str, int]]    # pointer -> {"cp.async 128b": count, "LDG 16b": ...}


def sass(cubin: bytes) -> Sass:
    """The matrix instructions and global loads of ``cubin`` (``nvdisasm --print-line-info``),
    each load attributed to the ``tl.load`` whose source line it carries."""
    text = kernel_specs.read_cubin("nvdisasm", cubin, "--print-line-info", "-c")
    mma, ldg = collections.Counter(), collections.Counter()
    streams: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    cp_async = tma = barriers = 0
    where: Optional[Tuple[str, int]] = None
    for line in text.splitlines():
        located = _LINE.search(line)
        if located:
            where = (located.group(1), int(located.group(2)))
            continue
        found = _INSTRUCTION.search(line)
        if not found:
            continue
        op, suffixes = found.groups()
        if op == "BAR":
            barriers += 1
            continue
        if op in WGMMA or op in MMA_SYNC:
            mma[op] += 1
            continue
        if op == "LDG":
            kind = f"LDG {_width(suffixes)}b"
            ldg[_width(suffixes)] += 1
        elif op == "LDGSTS":
            kind = f"cp.async {_width(suffixes)}b"
            cp_async += 1
        elif op in TMA:
            kind = "TMA"
            tma += 1
        else:
            continue
        source = _source(where[0]) if where is not None else None
        stream = OTHER if source is None else _load_streams(source).get(where[1], OTHER)
        streams[stream][kind] += 1
    return Sass(dict(mma), dict(ldg), cp_async, tma, barriers, {k: dict(v) for k, v in streams.items()})


class Row(NamedTuple):
    """One compiled kernel's line of the report."""
    config: str
    problem: Optional[str]     # why it does not compile, else None
    usage: Optional[kernel_specs.Usage] = None
    spills: Optional[Spills] = None
    sass: Optional[Sass] = None
    in_flight: Optional[int] = None  # see wgmma_in_flight
    loop_barriers: int = 0           # see loop_barriers


def wgmma_in_flight(ptx: str) -> Optional[int]:
    """The most wgmma groups a ``wgmma.wait_group N`` of ``ptx`` leaves in flight (0: every
    wgmma is waited for at once, so loads and MMAs do not overlap inside a warpgroup; 1:
    one MMA runs while the next K step is issued), None without wgmma."""
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    return max(waits) if waits else None


_LOOP_HEADER = re.compile(r"^(\$L__BB\d+_\d+):.*Loop Header")
_PTX_BARRIER = re.compile(r"\b(?:bar|barrier)(?:\.cta)?\.sync\b")


def loop_barriers(ptx: str) -> int:
    """The CTA barriers (``bar.sync`` and kin) of ``ptx`` inside loops: between a line LLVM
    marks as a loop header and the last branch back to it (a barrier in a main loop is paid
    every step: a reduction across warps, a layout exchange through shared memory)."""
    lines = ptx.splitlines()
    inside = [False] * len(lines)
    for i, line in enumerate(lines):
        header = _LOOP_HEADER.match(line)
        if not header:
            continue
        back = re.compile(r"\bbra(?:\.uni)?\s+" + re.escape(header.group(1)) + r";")
        ends = [j for j in range(i, len(lines)) if back.search(lines[j])]
        for j in range(i, ends[-1] + 1 if ends else i):
            inside[j] = True
    return sum(1 for flag, line in zip(inside, lines) if flag and _PTX_BARRIER.search(line))


def _config(config) -> str:
    meta = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta + ', ' if meta else ''}warps={config.num_warps}, stages={config.num_stages}"


def analyse(spec: Spec) -> Row:
    try:
        kernel = kernel_specs.compile_spec(spec)
    except Exception as error:  # noqa: BLE001 - the report says so
        return Row(_config(spec.config), f"does not compile: {str(error).strip().splitlines()[0][:200]}")
    return Row(_config(spec.config), None, kernel_specs.usage(kernel), spills(kernel.asm["ptx"]),
               sass(kernel.asm["cubin"]), wgmma_in_flight(kernel.asm["ptx"]), loop_barriers(kernel.asm["ptx"]))


# --- Markdown -----------------------------------------------------------------------------

LEGEND = """\
Columns, per kernel and config (each row one config of the kernel's tuning space, compiled
for sm_90 at the specialisation the headline call makes):

- **regs**: registers per thread; **spill st/ld**: bytes of spill stores / loads per thread
  (`ptxas -v`; 0/0: no spills).
- **smem KB**: shared memory per block (Triton's dynamic plus the cubin's static; the limit is
  227 KB).
- **CTAs/SM (limit)**: blocks resident per SM, and what bounds it (registers, shared, warps,
  ctas), from 65536 registers (allocated per warp in 256s in 4 sub-partitions), 228 KB shared
  memory with 1 KB reserved per block, 64 warps and 32 blocks per SM (0: the config cannot
  launch); **warps/SM**: CTAs/SM x warps per CTA (of 64).
- **MMA**: matrix instructions in the SASS: `wgmma` (HGMMA, QGMMA fp8, IGMMA int8: Hopper's
  warpgroup MMA), `mma.sync` (HMMA, IMMA, DMMA: Ampere's warp MMA) or none, with counts;
  for wgmma, `N in flight`: the most wgmma groups the PTX's `wgmma.wait_group N` leaves
  running (0: each is waited for at once; 1: asynchronous, an MMA overlaps the next step).
- **cp.async / TMA**: global loads that go through the software pipeline: `LDGSTS`
  (cp.async, global to shared) and `UTMALDG`/`UBLKCP` (TMA) instructions.
- **LDG 128/64/32/16/8**: plain global loads (to registers, not pipelined) by width in bits.
- **BAR (in loops)**: CTA-wide barriers in the SASS (`BAR.SYNC` and kin), wherever they
  sit, and in brackets those of the PTX inside loops (between a loop header and its branch
  back: paid every step of a main loop): a reduction across warps or a layout change
  through shared memory needs one each time.
- **streams**: per `tl.load` (named by the pointer it reads), its loads in the SASS (by the
  source line `nvdisasm --print-line-info` gives each instruction): `cp.async 128b x2`
  means two 128-bit cp.async instructions. A TMA load (`desc.load`) is named by its
  descriptor: `src (descriptor)` is the shared tile loader of kernels/triton/_rows.py,
  whatever operand it loads. `(other)`: loads whose line info names a line with no load
  (ptxas schedules instructions away from their source line).

Specialisation: Triton compiles integer arguments equal to 1 as constants and marks integers
divisible by 16 and 16-byte-aligned pointers (`tt.divisibility`); the line above each table
says which arguments of the call were which.
"""


def _specialisation(launch) -> str:
    """Which run-time arguments of ``launch`` Triton specialises, and how."""
    constexprs = {p.name for p in launch.kernel.fn.params if p.is_constexpr}
    arguments = {k: v for k, v in launch.arguments.items() if k not in constexprs}
    ones = [k for k, v in arguments.items() if isinstance(v, int) and not isinstance(v, bool) and v == 1]
    sixteens = [k for k, v in arguments.items() if isinstance(v, int) and not isinstance(v, bool)
                and v != 1 and v % 16 == 0]
    plain = [k for k, v in arguments.items() if isinstance(v, int) and not isinstance(v, bool) and v != 1 and v % 16]
    pointers = [k for k, v in arguments.items() if hasattr(v, "data_ptr")]
    misaligned = [k for k in pointers if arguments[k].data_ptr() % 16]
    parts = [f"constant 1: {', '.join(ones) or '-'}", f"divisible by 16: {', '.join(sixteens) or '-'}",
             f"neither: {', '.join(plain) or '-'}",
             "pointers: " + (f"misaligned {', '.join(misaligned)}" if misaligned else "all 16-byte aligned")]
    return "; ".join(parts)


def _mma(s: Sass, in_flight: Optional[int]) -> str:
    if not s.mma:
        return "none"
    kinds = sorted(s.mma.items())
    family = "wgmma" if any(op in WGMMA for op, _ in kinds) else "mma.sync"
    waits = "" if in_flight is None else f", {in_flight} in flight"
    return family + " " + " ".join(f"{op} x{n}" for op, n in kinds) + waits


def _streams(s: Sass) -> str:
    return "; ".join(f"`{name}`: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
                     for name, kinds in sorted(s.streams.items()))


def table(rows: List[Row]) -> List[str]:
    lines = ["| config | regs | spill st/ld | smem KB | CTAs/SM (limit) | warps/SM | MMA | cp.async | TMA "
             "| LDG 128/64/32/16/8 | BAR (in loops) | streams |", "|" + "---|" * 12]
    for row in rows:
        if row.problem is not None:
            lines.append(f"| {row.config} | {row.problem} |" + " |" * 10)
            continue
        occupancy = kernel_specs.ctas_per_sm(row.usage, TARGET)
        resident = occupancy["resident"]
        limit = [k for k in ("registers", "shared", "warps", "ctas") if occupancy[k] == resident][0]
        ldg = "/".join(str(row.sass.ldg.get(bits, 0)) for bits in (128, 64, 32, 16, 8))
        lines.append(f"| {row.config} | {row.usage.registers} | {row.spills.stores}/{row.spills.loads} "
                     f"| {row.usage.shared / 1024:.1f} | {resident} ({limit}) | {resident * row.usage.warps} "
                     f"| {_mma(row.sass, row.in_flight)} | {row.sass.cp_async} | {row.sass.tma} | {ldg} | {row.sass.barriers} ({row.loop_barriers}) "
                     f"| {_streams(row.sass)} |")
    return lines


class Section(NamedTuple):
    point: Point
    case: Case
    launch: object           # _autotune.Launch
    specs: List[Spec]        # one per config; empty: the launch is already reported above
    first: str               # where it was reported first


def sections(selected: Iterable[Point]) -> List[Section]:
    """Per headline point, each distinct kernel launch its impl makes, with a spec per config
    of the kernel's space (a launch met at an earlier point is listed once)."""
    out, seen = [], {}
    for point in selected:
        for case in HEADLINE_CASES[point.family](point.params):
            for key, launch in kernel_specs.launches(case).items():
                title = f"{point.family} {case.label}"
                if key in seen:
                    out.append(Section(point, case, launch, [], seen[key]))
                    continue
                seen[key] = title
                specs = [Spec(launch, config, ARCH, case.label) for config in launch.kernel.space]
                out.append(Section(point, case, launch, specs, title))
    return out


def _point(point: Point) -> str:
    return point.family + " " + ", ".join(f"{k}={v}" for k, v in point.params.items())


def report(selected: List[Point], command: str) -> str:
    """The Markdown report of ``selected`` headline points."""
    parts = sections(selected)
    rows = kernel_specs.pool_map(analyse, [s for part in parts for s in part.specs])
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    lines = ["# Kernel report: sparqle's Triton kernels on sm_90 at the headline points", "",
             f"`{command}` at commit {commit} (triton {triton.__version__}, torch {torch.__version__}, "
             f"{datetime.date.today()}). Compiled for sm_90 without a GPU: nothing here was run or timed.", "",
             LEGEND]
    parts_of = collections.defaultdict(list)
    for part in parts:
        parts_of[id(part.point)].append(part)
    for point in selected:
        lines += [f"## {_point(point)}", ""]
        if not parts_of[id(point)]:
            lines += ["No sparqle Triton kernel runs at this point: the launcher takes a torch path "
                      "here (see the family's kernel module).", ""]
        for part in parts_of[id(point)]:
            lines += [f"### `{part.launch.kernel.name}` ({part.case.label})", ""]
            if not part.specs:
                lines += [f"The same launch as in {part.first}.", ""]
                continue
            lines += [_specialisation(part.launch), ""]
            lines += table([rows.pop(0) for _ in part.specs]) + [""]
    return "\n".join(lines)


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparqle.bench.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the Markdown here (default: print it)")
    families = [f for f in FAMILIES if f in HEADLINE_CASES]
    parser.add_argument("--op", action="append", choices=families, metavar="FAMILY",
                        help=f"only this family's headline points (repeatable): {', '.join(families)}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    command = "python -m sparqle.bench.kernel_report" + "".join(f" --op {f}" for f in args.op or ())
    text = report(points(args.op or families), command)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
