"""Every Triton kernel compiles to a cubin for Ampere (sm_80) and Hopper (sm_90), for every
autotune config and dtype, with no GPU: the interpreter never runs Triton's compiler, so
this catches what only the compiler rejects. Runs in a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys

SCRIPT = r'''
import itertools
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparqle.kernels.triton import spmm_csr

INDEX_POINTERS = {"crow_ptr", "col_ptr", "row_order_ptr", "row_ptr"}
FLOATS = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}


def compile_all(autotuner, arch):
    jit = autotuner.fn
    count = 0
    for config, (dtype, acc) in itertools.product(autotuner.configs, FLOATS.items()):
        signature, constexprs = {}, dict(config.kwargs, ACC_DTYPE=acc)
        for p in jit.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                signature[p.name] = "*i32" if p.name in INDEX_POINTERS else "*" + dtype
            else:
                signature[p.name] = "i64" if p.name.startswith("stride") else "i32"
        src = ASTSource(fn=jit, signature=signature, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": config.num_warps})
        assert kernel.asm["cubin"], (jit.__name__, config, dtype)
        count += 1
    return count


kernels = (spmm_csr._spmm_csr_kernel, spmm_csr._sddmm_csr_kernel)
total = sum(compile_all(kernel, arch) for kernel in kernels for arch in (80, 90))
expected = sum(len(kernel.configs) for kernel in kernels) * len(FLOATS) * 2
assert total == expected > 0, (total, expected)
print("compiled", total)
'''


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
