"""Every Triton kernel compiles to a cubin for Ampere (sm_80) and Hopper (sm_90), for every
autotune config, dtype and variant (block size, direction, bias), with no GPU: the interpreter never runs Triton's compiler, so
this catches what only the compiler rejects. Runs in a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys

SCRIPT = r'''
import itertools
import multiprocessing
import os

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import torch
from sparqle.bindings import int4_linear as int4_binding, int8_linear as int8_binding
from sparqle.bindings import nm_linear as nm_binding
from sparqle.bindings import spmm_bell as bell_binding, spmm_csr as csr_binding
from sparqle.bindings import window_attention as window_binding
from sparqle.kernels.triton import int4_linear, int8_linear, nm_linear, spmm_bell, spmm_csr, window_attention

INDEX_POINTERS = {"crow_ptr", "col_ptr", "row_order_ptr", "row_ptr", "cols_ptr", "slots_ptr", "meta_ptr",
                  "mask_index_ptr", "index_ptr"}
FP32_POINTERS = {"lse_ptr", "dbias_ptr"}
FLOATS = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
DOT = {"fp16": "ieee", "bf16": "ieee", "fp32": "tf32", "fp64": "ieee"}


def variants(jit):
    """Extra constexprs: every block size and both directions for the Blocked-ELL kernels,
    every N:M pattern."""
    names = {p.name for p in jit.params}
    blocks = [{"B": b} for b in (16, 32, 64, 128)] if "B" in names else [{}]
    directions = [{"TRANSPOSED": t} for t in (False, True)] if "TRANSPOSED" in names else [{}]
    biases = [{"HAS_BIAS": h} for h in (False, True)] if "HAS_BIAS" in names else [{}]
    flag_names = [f for f in ("W8A8", "STATIC", "HAS_INDEX", "MERGE") if f in names]
    flags = [dict(zip(flag_names, v)) for v in itertools.product((True, False), repeat=len(flag_names))]
    if "HEAD_DIM" in names:
        return window_attention_variants("SPLIT" in names)
    patterns = ([{"KEEP": n, "GROUP": m, "BITS": 2 if m <= 4 else 4}
                 for n, m in ((2, 4), (1, 2), (1, 4), (2, 8), (4, 8))] if "KEEP" in names else [{}])
    return [{**b, **d, **h, **f, **p} for b in blocks for d in directions for h in biases
            for f in flags for p in patterns]


def window_attention_variants(has_split):
    """Swin-T's N = 49 with the shift mask (by b % nW and by mask_index), the smallest tile
    without bias or mask, d = 128 over two query blocks, Swin-B's N = 144 over five."""
    tiles = [(64, 64, 32, True, True, False), (64, 64, 32, True, True, True), (16, 16, 16, False, False, False),
             (64, 128, 128, True, True, False), (32, 256, 32, True, True, False)]
    out = []
    for m, t, d, bias, mask, index in tiles:
        v = {"BLOCK_M": m, "BLOCK_T": t, "HEAD_DIM": d, "HAS_BIAS": bias, "HAS_MASK": mask, "MASK_INDEX": index}
        if has_split:
            v["SPLIT"] = m < t
        out.append(v)
    return out


def pointer_type(name, dtype, config, extra):
    """The element type of pointer argument ``name`` for a float ``dtype`` run."""
    if name == "packed_ptr":
        return "*u8"
    if name in ("w_ptr", "q_ptr") or (name == "x_ptr" and extra.get("W8A8")):
        return "*i8"
    if name in FP32_POINTERS or (name in ("dkey_ptr", "dvalue_ptr") and extra.get("SPLIT")):
        return "*fp32"
    if name in ("scale_ptr", "static_ptr") or (name == "x_scale_ptr" and extra.get("W8A8")):
        return "*fp32"
    if name == "y_ptr" and config.kwargs.get("SPLIT_K", 1) > 1:
        return "*fp32"  # the split-K workspace
    return "*i32" if name in INDEX_POINTERS else "*" + dtype


def combinations(autotuner, dtypes):
    """Every autotune config in fp16 with the first variant, and every dtype (those the op's
    binding gives its Triton backend) and variant with the first config."""
    first_variant, first_config = variants(autotuner.fn)[0], autotuner.configs[0]
    combos = [(c, "fp16", first_variant) for c in autotuner.configs]
    combos += [(first_config, d, v) for d in dtypes for v in variants(autotuner.fn)
               if (d, v) != ("fp16", first_variant)]
    return combos


def specs(autotuner, dtypes, arch):
    """(jit, signature, constexprs, num_warps, arch) of every combination to compile."""
    jit = autotuner.fn
    names = {p.name for p in jit.params}
    for config, dtype, extra in combinations(autotuner, dtypes):
        signature, constexprs = {}, dict(config.kwargs, **extra)
        if "ACC_DTYPE" in names:
            constexprs["ACC_DTYPE"] = FLOATS[dtype]
        if "PRECISION" in names:
            constexprs.update(PRECISION=DOT[dtype], UPCAST=False)
        for p in jit.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                signature[p.name] = pointer_type(p.name, dtype, config, extra)
            else:
                signature[p.name] = ("i64" if p.name.startswith("stride")
                                     else "fp32" if p.name == "scale" else "i32")
        yield jit, signature, constexprs, config.num_warps, arch


def triton_dtypes(binding):
    return sorted(NAMES[d] for d in binding._DTYPES["triton"])


kernels = [(k, triton_dtypes(csr_binding)) for k in (spmm_csr._spmm_csr_kernel, spmm_csr._sddmm_csr_kernel)]
kernels += [(k, triton_dtypes(bell_binding)) for k in (spmm_bell._spmm_bell_kernel, spmm_bell._sddmm_bell_kernel)]
kernels += [(k, triton_dtypes(int4_binding)) for k in (int4_linear._tiled, int4_linear._small_m)]
kernels += [(k, triton_dtypes(int8_binding)) for k in (int8_linear._quantize_rows_kernel, int8_linear._int8_linear_kernel)]
kernels += [(k, triton_dtypes(nm_binding)) for k in (nm_linear._tiled, nm_linear._small_m)]
kernels += [(nm_linear._to_dense, sorted(NAMES[d] for d in nm_binding._TO_DENSE_DTYPES["triton"]))]
kernels += [(k, triton_dtypes(window_binding)) for k in (
    window_attention._window_attention_fwd_kernel, window_attention._window_attention_bwd_kernel,
    window_attention._window_copy_kernel)]
SPECS = [spec for kernel, dtypes in kernels for arch in (80, 90) for spec in specs(kernel, dtypes, arch)]
assert len(SPECS) == sum(len(combinations(k, dtypes)) for k, dtypes in kernels) * 2 > 0

# FP8 kernels: Hopper only (the e4m3 type needs sm_89+; on older GPUs ``auto`` runs the torch
# path). Every config with the first variant, then every FP8 format, output dtype and flag.
from sparqle.bindings import fp8_linear as fp8_binding
from sparqle.kernels.triton import fp8_linear
FP8S = [torch.float8_e4m3fn, torch.float8_e5m2]


def fp8_variants(jit):
    """The quantizer: each FP8 format, static scale or not. The GEMM: FP8 x FP8 in every
    pair of formats, or weight-only with each weight format; with and without bias."""
    names = {p.name for p in jit.params}
    if "A_FP8" not in names:
        return [dict(fp8_linear.fp8_format(f), STATIC=s) for f in FP8S for s in (False, True)]
    return [{"A_FP8": a, "A_DTYPE": fp8_linear.fp8_format(fa)["Q_DTYPE"],
             "B_DTYPE": fp8_linear.fp8_format(fb)["Q_DTYPE"], "HAS_BIAS": h}
            for a in (True, False) for fa in FP8S for fb in FP8S for h in (False, True)
            if a or fa == fb]


def fp8_signature(jit, dtype, extra):
    signature = {}
    for p in jit.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in ("q_ptr", "b_ptr") or (p.name == "a_ptr" and extra.get("A_FP8")):
            signature[p.name] = "*u8"
        elif p.name.endswith("scale_ptr") or p.name == "static_ptr":
            signature[p.name] = "*fp32"
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + dtype
        else:
            signature[p.name] = "i64" if p.name.startswith("stride") else "i32"
    return signature


for autotuner in (fp8_linear._quantize_rows_kernel, fp8_linear._fp8_scaled_mm_kernel):
    jit = autotuner.fn
    combos = [(c, "fp16", fp8_variants(jit)[0]) for c in autotuner.configs]
    combos += [(autotuner.configs[0], d, v) for d in triton_dtypes(fp8_binding) for v in fp8_variants(jit)]
    for config, dtype, extra in combos:
        constexprs = dict(config.kwargs, **extra)
        if "ACC_DTYPE" in constexprs or "A_FP8" in extra:
            constexprs.update(ACC_DTYPE=tl.float32, PRECISION=DOT[dtype], UPCAST=False)
        SPECS.append((jit, fp8_signature(jit, dtype, extra), constexprs, config.num_warps, 90))


def compile_spec(i):
    jit, signature, constexprs, num_warps, arch = SPECS[i]
    kernel = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert kernel.asm["cubin"], (jit.__name__, signature, constexprs, arch)


# One compile per process at a time, on every core (forked workers inherit SPECS).
with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
    pool.map(compile_spec, range(len(SPECS)), chunksize=1)
total = len(SPECS)
print("compiled", total)
'''


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
