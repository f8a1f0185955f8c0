"""Every dispatch of a weight op by M (the rows of x, the tokens), in one place: each
threshold with its value and its reason. None of them has been measured on a GPU yet
(no GPU timing of these ops exists in bench/results/): each is a reasoned first value,
to be replaced by a measured one, here, once the GPU check has timed both sides of it.

N:M on CUDA under ``auto`` does not use a threshold: it times its candidates per shape
(bindings/nm_linear.py) and uses NM_UNMEASURED_CUBLAS_FROM_M only for a shape it has not
timed, while a CUDA graph is being captured.
"""

# kernels/triton/_linear.launch_by_m (int4 and N:M on Triton): M <= SPLIT_K_MAX_M runs the
# split-K small-M configs, above it the tiled ones. At small M the GEMM is bound by reading
# the weight: BLOCK_M = 16 (every small-M config's) covers every row, so the weight is
# streamed once, and split-K spreads K over more programs. The value is that BLOCK_M.
# Unmeasured on a GPU.
SPLIT_K_MAX_M = 16

# bindings/fp8_linear.py: M <= FP8_WEIGHT_ONLY_MAX_M leaves x in its float dtype
# (weight-only FP8), above it x is quantized per token to e4m3 (FP8 x FP8). At small M the
# GEMM is bound by reading the weight, which FP8 halves either way; weight-only skips the
# activation quantization and its launch. The value follows SPLIT_K_MAX_M's reasoning.
# Unmeasured on a GPU.
FP8_WEIGHT_ONLY_MAX_M = 16

# kernels/triton/int4_linear.py has no threshold of its own: above SPLIT_K_MAX_M every M runs
# the tiled configs, which dequantize each weight tile inside the GEMM's main loop on the
# tensor cores (wgmma from BLOCK_M = 64), and the autotuner picks the tile per M bucket. The
# dequantize-then-cuBLAS route it replaced (from M = 1024) moved over 12 bytes per weight
# (eight torch ops reading and writing fp32 and bf16 temporaries) against the 0.5 the fused
# kernel reads: at M = 1024, N = K = 8192 about 0.8 GB, some 0.16 ms at an H200's nominal
# 4.8 TB/s, beside the GEMM's own 0.14 ms (137 GFLOP at its nominal 989 TFLOP/s bf16), so it
# could not pass about half of bf16's speed there; the in-loop dequantization adds integer
# and half-precision ALU work per weight tile instead, amortised over BLOCK_M rows. Arithmetic
# from nominal figures, unmeasured on a GPU: if a measurement shows cuBLAS ahead from some M,
# its threshold belongs here.

# bindings/nm_linear.py: while a CUDA graph is captured nothing can be timed, so a shape
# ``auto`` has not measured runs the Triton kernel below NM_UNMEASURED_CUBLAS_FROM_M and
# cuBLAS on the expanded W from it on (compute-bound there, where N:M saves no math on dense
# tensor cores: the one expansion is amortised over M rows and cuBLAS runs the dense GEMM
# faster than the in-register expanding kernel). Unmeasured on a GPU.
NM_UNMEASURED_CUBLAS_FROM_M = 1024
