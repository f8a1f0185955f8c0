"""Every Triton kernel compiles to a cubin for Ampere (sm_80) and Hopper (sm_90) and fits the
target's per-block limits, with no GPU: the interpreter never runs Triton's compiler, so this
catches what only the compiler or a launch would reject.

The specs come from real launcher calls (sparqle.bench.kernel_specs.test_specs): each case
calls a launcher on meta tensors inside planning(), which records what Triton would compile
(dtypes, constexprs, and the run-time specialisations: integers equal to 1, divisible by 16,
16-byte-aligned pointers); every recorded launch is compiled with its kernel's first config,
and each kernel's whole tuning space and its test config (the GPU check's tests tier runs it)
with the config's own num_warps and num_stages. Runs ``python -m sparqle.bench.kernel_specs``
in a subprocess without TRITON_INTERPRET, on every core.
"""
import collections
import importlib
import os
import re
import subprocess
import sys

from sparqle import registry
from sparqle.bench import kernel_specs
from sparqle.kernels.triton import window_attention


def _compiler_env():
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARQLE_AUTOTUNE")}


def test_cases_cover_every_dtype_of_every_triton_backend():
    """Every op of sparqle.registry has compile cases for each dtype its Triton backend takes
    (a new op with no cases in kernel_specs fails here)."""
    labels = {}
    for case in kernel_specs.test_cases():
        labels.setdefault(case.op, []).append(case.label)
    tables = [(kernels, importlib.import_module(f"sparqle.bindings.{kernels}").DTYPES["triton"], "")
              for kernels in registry.KERNEL_MODULES]
    tables.append(("nm_linear", importlib.import_module("sparqle.bindings.nm_linear").TO_DENSE_DTYPES["triton"],
                   "to_dense "))
    for op, dtypes, prefix in tables:
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            assert any(label.startswith(prefix) and name in label for label in labels[op]), (op, prefix, name)


# Problems the check finds that no autotune config can fix, each waiting on a kernel change:
# a pattern matching its lines, and why. The test fails when a pattern matches nothing (fixed:
# delete the entry) as well as when a problem matches none.
KNOWN_PROBLEMS: dict = {}


def test_triton_kernels_compile_and_fit_sm80_and_sm90():
    result = subprocess.run([sys.executable, "-m", "sparqle.bench.kernel_specs"], env=_compiler_env(),
                            capture_output=True, text=True, timeout=1800)
    assert "compiled" in result.stdout, result.stderr[-4000:]
    problems = [line for line in result.stdout.splitlines() if ": does not compile:" in line
                or ": cannot launch:" in line]
    unknown = [p for p in problems if not any(re.search(known, p) for known in KNOWN_PROBLEMS)]
    fixed = [known for known in KNOWN_PROBLEMS if not any(re.search(known, p) for p in problems)]
    assert not unknown, "\n".join(unknown)[-8000:]
    assert not fixed, f"fixed, delete from KNOWN_PROBLEMS: {fixed}"
    assert result.returncode == (1 if problems else 0)


def test_a_config_over_the_shared_memory_of_a_block_cannot_launch():
    """The limit check itself: Hopper takes what Ampere cannot."""
    use = kernel_specs.Usage(registers=128, shared=200 * 1024, warps=8)
    sm80, sm90 = kernel_specs.TARGETS[80], kernel_specs.TARGETS[90]
    assert kernel_specs.ctas_per_sm(use, sm90)["resident"] == 1
    assert kernel_specs.ctas_per_sm(use, sm80)["shared"] == 0
    # 255 registers x 32 warps x 32 threads is twice an SM's register file.
    assert kernel_specs.ctas_per_sm(use._replace(registers=255, warps=32, shared=0), sm90)["registers"] == 0
    # 64 registers x 4 warps: 8 blocks by registers, 16 by warps, 228 KB / 17 KB by shared memory.
    occupancy = kernel_specs.ctas_per_sm(use._replace(registers=64, warps=4, shared=16 * 1024), sm90)
    assert occupancy == {"registers": 8, "shared": 13, "warps": 16, "ctas": 32, "resident": 8}


def test_kernel_report_runs_on_one_family():
    """The report (python -m sparqle.bench.kernel_report) for window attention's headline
    points (N = 49, 144 and 256; fwd and fwd+bwd): every column filled, the kernels found,
    and no config of the tuning space spilling registers (issue 19)."""
    result = subprocess.run([sys.executable, "-m", "sparqle.bench.kernel_report", "--op", "window_attention"],
                            env=_compiler_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    text = result.stdout
    header = "| config | regs | spill st/ld | smem KB | CTAs/SM (limit) | warps/SM | MMA | cp.async | TMA "
    assert header in text
    kernels = ("_window_attention_fwd_kernel", "_window_attention_bwd_dkdv_kernel", "_window_attention_bwd_dq_kernel")
    for kernel in kernels:
        assert f"### `{kernel}`" in text
    # Each kernel at each config of the space, once per distinct compile: N = 49 (one block)
    # and N > 64 (64 x 64 blocks; N = 144 and 256 are the same compile); the fwd+bwd points'
    # forwards are the fwd points' launches, listed once.
    configs = len(window_attention._ATTENTION_CONFIGS.space)
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| warps=")]
    assert len(rows) == 2 * len(kernels) * configs and "The same launch as in window_attention" in text
    for cells in rows:
        assert len(cells) == 12 and all(cell.strip() for cell in cells[:11]), cells
        regs, spills, smem = int(cells[1]), cells[2].strip(), float(cells[3])
        assert 0 < regs <= 255 and 0 < smem <= 227 and spills == "0/0", cells
        assert cells[6].strip().startswith(("wgmma", "mma.sync")), cells[6]  # bf16 dots on tensor cores


def test_int4_and_nm_feed_the_decoded_weight_to_wgmma_from_registers():
    """int4 and 2:4 (issues 17, 18) at their headline points (M = 1, 16, 256 / 4096): the
    decoded weight tile is the left operand of the dot (y^T = W x^T), so on sm_90 every config
    whose weight tile has >= 64 rows (wgmma's M, one warpgroup's) compiles to wgmma at any
    token count, with the weight from registers, x from shared memory and MMAs left in flight
    (asynchronous: with the weight as the right operand it went through shared memory and
    each wgmma was waited for at once, and 16 tokens got mma.sync); the weight stream is
    16-byte cp.async at every config (int4's interleaved tiles: in K order it was 4-byte
    cp.async wherever wgmma took the weight from registers); no config spills."""
    result = subprocess.run([sys.executable, "-m", "sparqle.bench.kernel_report", "--op", "int4", "--op", "nm"],
                            env=_compiler_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    checked = collections.Counter()
    kernel = None
    for line in result.stdout.splitlines():
        if line.startswith("### "):
            kernel = line.split("`")[1]
        if kernel not in ("_int4_linear_kernel", "_nm_linear_kernel") or not line.startswith("| BLOCK_M="):
            continue
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        config = dict(item.split("=") for item in cells[0].split(", "))
        assert cells[2] == "0/0", (kernel, cells)
        weight = "packed_ptr" if kernel == "_int4_linear_kernel" else "values_ptr"
        assert re.search(rf"`{weight}`: cp\.async 128b x\d+(;|$)", cells[-1]), (kernel, cells)
        if int(config["BLOCK_N"]) >= 64:
            flight = re.fullmatch(r"wgmma HGMMA x\d+, (\d+) in flight", cells[6])
            assert flight and int(flight.group(1)) >= 1, (kernel, cells)
            checked[kernel, int(config["BLOCK_M"]) >= 64] += 1
    # Both kernels, at 16 tokens and in the tiled configs.
    assert set(checked) == {(k, big) for k in ("_int4_linear_kernel", "_nm_linear_kernel") for big in (False, True)}


def test_csr_main_loop_has_no_reduction_across_threads():
    """CSR (issue 18) at its headline point: no config sums across threads inside the main
    loop (each thread keeps partial sums, reduced once per row), so the loop has no barrier,
    except where the x tile is 16 rows wide and the chunk spans warps: there the nonzeros'
    columns and values, loaded one per thread, are handed to the threads that use them
    through shared memory, 2 barriers each (before: a cross-warp sum every chunk too)."""
    result = subprocess.run([sys.executable, "-m", "sparqle.bench.kernel_report", "--op", "spmm_csr"],
                            env=_compiler_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| BLOCK_X_ROWS=")]
    assert len(rows) == len(importlib.import_module("sparqle.kernels.triton.spmm_csr")._LINEAR_CONFIGS.space)
    for cells in rows:
        config = dict(item.split("=") for item in cells[0].split(", "))
        in_loops = int(re.fullmatch(r"\d+ \((\d+)\)", cells[10]).group(1))
        exchanged = config["NNZ_ACROSS_THREADS"] == "True" and config["BLOCK_X_ROWS"] == "16" \
            and config["warps"] != "1"
        assert in_loops <= (4 if exchanged else 0), cells
        assert cells[2] == "0/0", cells


def test_kernel_report_names_each_load_by_what_it_reads(tmp_path):
    """The report's streams column: a ``tl.load`` is named by its pointer, a TMA
    ``desc.load`` by its descriptor, over every line the call spans; line info that names
    a file of another checkout (a cubin Triton's cache kept from a removed worktree) is
    read from this checkout's file at the same place under kernels/."""
    from sparqle.bench import kernel_report
    source = tmp_path / "kernel.py"
    source.write_text("def k(x_ptr, a_desc, offs):\n"
                      "    x = tl.load(x_ptr + offs,\n"
                      "                mask=offs < 4)\n"
                      "    a = a_desc.load([0, 0])\n"
                      "    b = tl.load(offs)\n")
    streams = kernel_report._load_streams(str(source))
    assert streams == {2: "x_ptr", 3: "x_ptr", 4: "a_desc (descriptor)", 5: kernel_report.OTHER}
    here = importlib.import_module("sparqle.kernels.triton.spmm_csr").__file__
    moved = os.path.join(str(tmp_path), "removed-worktree", "kernels", "triton", "spmm_csr.py")
    assert os.path.samefile(kernel_report._source(moved), here)
    assert kernel_report._source(str(tmp_path / "nowhere.py")) is None
