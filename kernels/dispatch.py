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

# kernels/triton/int4_linear.py: M >= INT4_DEQUANTIZE_FROM_M dequantizes W once and lets
# cuBLAS multiply; below it the Triton kernel dequantizes tile by tile in registers. At large
# M the GEMM is compute-bound, the one dequantization is amortised over M rows, and cuBLAS
# runs the dense GEMM faster than the in-register dequantizing kernel. Unmeasured on a GPU.
INT4_DEQUANTIZE_FROM_M = 1024

# bindings/nm_linear.py: while a CUDA graph is captured nothing can be timed, so a shape
# ``auto`` has not measured runs the Triton kernel below NM_UNMEASURED_CUBLAS_FROM_M and
# cuBLAS on the expanded W from it on (compute-bound there, where N:M saves no math on dense
# tensor cores). INT4_DEQUANTIZE_FROM_M's reasoning. Unmeasured on a GPU.
NM_UNMEASURED_CUBLAS_FROM_M = 1024
