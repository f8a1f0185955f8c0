// CSR linear and SDDMM, Sputnik-style (Gale et al., "Sparse GPU Kernels for Deep Learning", 2020).
//
// Linear: y [M, m] = x [M, k] @ A^T + bias, A [m, k] in CSR (crow [m+1], col [nnz], values [nnz]),
// computed as C = A @ B + bias[:, None] with B = x^T [k, n = M] (strides stride_bk, stride_bn in
// elements; the launcher stages x^T contiguously for the vector loads) and C = y^T [m, n], written
// through its strides (stride_cm, stride_cn): one scalar store per element, y's rows being
// C's columns. The bias (stride_bias, 0 when expanded; null for none) is added in fp32 before
// the one rounding to T.
//   * 1-D tiling: a subwarp of SUBWARP threads owns one sparse row and SUBWARP * VEC
//     consecutive output columns; each thread keeps VEC fp32 accumulators.
//   * Subwarp tiling: a block of 128 threads holds 128 / SUBWARP subwarps, one row each, and
//     the launcher sizes SUBWARP (4..32) to n, so that short rows and narrow outputs do not
//     leave most of a warp idle.
//   * The subwarp streams its row's nonzeros in chunks of SUBWARP * SPARSE_VEC: each thread
//     loads SPARSE_VEC values and column indices with one vector load each, then the chunk is
//     broadcast through warp shuffles and every thread gathers VEC elements of the matching
//     row of B with one vector load (16 bytes).
//   * Reverse-offset alignment: a row starts at an arbitrary nonzero index, which would break
//     the vector loads. The sweep starts instead at the aligned index at or below the row's
//     start; the entries before the start (the end of the previous row) are loaded and skipped.
//   * Rows are taken in row_order (longest first): the row swizzle that balances the load.
//   * Index is int (32-bit) or unsigned short (16-bit column indices where k <= 65536, for
//     fp16/bf16: half the index traffic).
// SDDMM: out[i] = sum_j X[row_i, j] * Y[col_i, j] over a CSR pattern, X [m, n], Y [k, n]:
//   one subwarp per nonzero (every subwarp does the same work); it finds its row by binary
//   search in crow, strides over j with VEC-wide loads and reduces with shuffles.
// tests/test_cupy.py mirrors the linear's schedule and the SDDMM row search in Python.
// Accumulation is in fp32 for every dtype. Only cuda_fp16.h and cuda_bf16.h are included:
// NVRTC has them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int THREADS = 128;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ int to_int(int v) { return v; }
__device__ __forceinline__ int to_int(unsigned short v) { return static_cast<int>(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements, aligned so that one load or store instruction moves them all.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// The lanes of the calling thread's subwarp (SUBWARP consecutive lanes of its warp).
template <int SUBWARP>
__device__ __forceinline__ unsigned subwarp_mask() {
  if constexpr (SUBWARP == 32) {
    return 0xffffffffu;
  } else {
    const int first = (threadIdx.x + threadIdx.y * blockDim.x) & 31 & ~(SUBWARP - 1);
    return ((1u << SUBWARP) - 1) << first;
  }
}

// blockDim = (SUBWARP, THREADS / SUBWARP); grid = (cdiv(m, THREADS / SUBWARP), cdiv(n, SUBWARP * VEC)).
// VEC > 1 needs stride_bn == 1, stride_bk and n multiples of VEC, and 16-byte aligned b;
// SPARSE_VEC > 1 needs values and col aligned to SPARSE_VEC elements (the launcher checks).
template <typename T, typename Index, int SUBWARP, int VEC, int SPARSE_VEC>
__device__ __forceinline__ void csr_linear(const int* __restrict__ crow, const Index* __restrict__ col,
                                           const T* __restrict__ values, const int* __restrict__ row_order,
                                           const T* __restrict__ b, const T* __restrict__ bias,
                                           T* __restrict__ c, int m, int n, int nnz,
                                           long long stride_bk, long long stride_bn,
                                           long long stride_cm, long long stride_cn, long long stride_bias) {
  // 64-bit slot and nonzero indices: with m or nnz near 2^31 the last block's slots and the
  // last chunk's indices (chunk + 127) pass INT_MAX.
  const long long slot = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (slot >= m) return;  // the whole subwarp leaves together
  const unsigned mask = subwarp_mask<SUBWARP>();
  const int lane = threadIdx.x;
  const int row = row_order[slot];
  const long long start = crow[row], end = crow[row + 1];
  const int col0 = (blockIdx.y * SUBWARP + lane) * VEC;
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.f;

  // Reverse offset: begin at the aligned index at or below `start`.
  for (long long chunk = start - start % SPARSE_VEC; chunk < end; chunk += SUBWARP * SPARSE_VEC) {
    const long long mine = chunk + lane * SPARSE_VEC;
    float vals[SPARSE_VEC];
    int cols[SPARSE_VEC];
    if (mine + SPARSE_VEC <= nnz) {
      const Vec<T, SPARSE_VEC> v = *reinterpret_cast<const Vec<T, SPARSE_VEC>*>(values + mine);
      const Vec<Index, SPARSE_VEC> ci = *reinterpret_cast<const Vec<Index, SPARSE_VEC>*>(col + mine);
#pragma unroll
      for (int e = 0; e < SPARSE_VEC; ++e) {
        vals[e] = to_float(v.v[e]);
        cols[e] = to_int(ci.v[e]);
      }
    } else {  // the last chunk of the matrix: no load past nnz
#pragma unroll
      for (int e = 0; e < SPARSE_VEC; ++e) {
        const bool in = mine + e < nnz;
        vals[e] = in ? to_float(values[mine + e]) : 0.f;
        cols[e] = in ? to_int(col[mine + e]) : 0;
      }
    }
    for (int src = 0; src < SUBWARP; ++src) {
      const long long first = chunk + src * SPARSE_VEC;
      if (first >= end) break;  // uniform over the subwarp
#pragma unroll
      for (int e = 0; e < SPARSE_VEC; ++e) {
        const float a = __shfl_sync(mask, vals[e], src, SUBWARP);
        const int k = __shfl_sync(mask, cols[e], src, SUBWARP);
        if (first + e < start || first + e >= end) continue;  // the previous or the next row
        const T* brow = b + static_cast<long long>(k) * stride_bk;
        if (VEC > 1 && col0 + VEC <= n) {
          const Vec<T, VEC> bv = *reinterpret_cast<const Vec<T, VEC>*>(brow + col0);
#pragma unroll
          for (int q = 0; q < VEC; ++q) acc[q] += a * to_float(bv.v[q]);
        } else {
#pragma unroll
          for (int q = 0; q < VEC; ++q)
            if (col0 + q < n) acc[q] += a * to_float(brow[(col0 + q) * stride_bn]);
        }
      }
    }
  }

  // The epilogue: the bias, then C's row `row` (a column of y) through its strides.
  const float bias_row = bias == nullptr ? 0.f : to_float(bias[static_cast<long long>(row) * stride_bias]);
  T* c_row = c + static_cast<long long>(row) * stride_cm;
#pragma unroll
  for (int q = 0; q < VEC; ++q)
    if (col0 + q < n) c_row[static_cast<long long>(col0 + q) * stride_cn] = from_float<T>(acc[q] + bias_row);
}

// blockDim = (SUBWARP, THREADS / SUBWARP); grid = (cdiv(nnz, THREADS / SUBWARP)).
// VEC > 1 needs unit column strides, row strides multiples of VEC and 16-byte aligned x, y.
template <typename T, int SUBWARP, int VEC>
__device__ __forceinline__ void sddmm_csr(const int* __restrict__ crow, const int* __restrict__ col,
                                          const T* __restrict__ x, const T* __restrict__ y,
                                          T* __restrict__ out, int m, int nnz, int n,
                                          long long stride_xm, long long stride_xn,
                                          long long stride_ym, long long stride_yn) {
  // 64-bit: with nnz near 2^31 the last block's entries pass INT_MAX.
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (i >= nnz) return;  // the whole subwarp leaves together
  const unsigned mask = subwarp_mask<SUBWARP>();
  const int lane = threadIdx.x;
  // The row of entry i: crow[lo] <= i < crow[hi] holds throughout, and empty rows never satisfy it.
  int lo = 0, hi = m;
  while (hi - lo > 1) {
    const int mid = lo + ((hi - lo) >> 1);  // lo + hi would pass INT_MAX for m > 2^30
    if (crow[mid] <= i) lo = mid; else hi = mid;
  }
  const T* xrow = x + static_cast<long long>(lo) * stride_xm;
  const T* yrow = y + static_cast<long long>(col[i]) * stride_ym;
  float acc = 0.f;
  for (int j = lane * VEC; j < n; j += SUBWARP * VEC) {
    if (VEC > 1 && j + VEC <= n) {
      const Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(xrow + j);
      const Vec<T, VEC> yv = *reinterpret_cast<const Vec<T, VEC>*>(yrow + j);
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc += to_float(xv.v[q]) * to_float(yv.v[q]);
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q)
        if (j + q < n) acc += to_float(xrow[(j + q) * stride_xn]) * to_float(yrow[(j + q) * stride_yn]);
    }
  }
#pragma unroll
  for (int offset = SUBWARP / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(mask, acc, offset, SUBWARP);
  if (lane == 0) out[i] = from_float<T>(acc);
}

}  // namespace

// Entry points: csr_linear_<dtype>_<index>_s<SUBWARP>_<vec|scalar>, sddmm_csr_<dtype>_s<SUBWARP>_<vec|scalar>.
// "vec" loads 16 bytes of B (or X, Y) per thread and 4 nonzeros per thread; "scalar" takes any
// strides and alignment.
#define LINEAR_ENTRY(NAME, T, INDEX, SUBWARP, VEC, SPARSE_VEC)                                             \
  extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                            \
      const int* crow, const INDEX* col, const T* values, const int* row_order, const T* b,             \
      const T* bias, T* c, int m, int n, int nnz, long long stride_bk, long long stride_bn,              \
      long long stride_cm, long long stride_cn, long long stride_bias) {                                 \
    csr_linear<T, INDEX, SUBWARP, VEC, SPARSE_VEC>(crow, col, values, row_order, b, bias, c, m, n, nnz,    \
                                                 stride_bk, stride_bn, stride_cm, stride_cn, stride_bias); \
  }

#define LINEAR_SUBWARPS(DT, T, IX, INDEX, VEC)                            \
  LINEAR_ENTRY(csr_linear_##DT##_##IX##_s4_vec, T, INDEX, 4, VEC, 4)        \
  LINEAR_ENTRY(csr_linear_##DT##_##IX##_s8_vec, T, INDEX, 8, VEC, 4)        \
  LINEAR_ENTRY(csr_linear_##DT##_##IX##_s16_vec, T, INDEX, 16, VEC, 4)      \
  LINEAR_ENTRY(csr_linear_##DT##_##IX##_s32_vec, T, INDEX, 32, VEC, 4)      \
  LINEAR_ENTRY(csr_linear_##DT##_##IX##_s32_scalar, T, INDEX, 32, 1, 1)

LINEAR_SUBWARPS(f32, float, i32, int, 4)
LINEAR_SUBWARPS(f16, __half, i32, int, 8)
LINEAR_SUBWARPS(f16, __half, u16, unsigned short, 8)
LINEAR_SUBWARPS(bf16, __nv_bfloat16, i32, int, 8)
LINEAR_SUBWARPS(bf16, __nv_bfloat16, u16, unsigned short, 8)

#define SDDMM_ENTRY(NAME, T, SUBWARP, VEC)                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                       \
      const int* crow, const int* col, const T* x, const T* y, T* out, int m, int nnz, int n,      \
      long long stride_xm, long long stride_xn, long long stride_ym, long long stride_yn) {           \
    sddmm_csr<T, SUBWARP, VEC>(crow, col, x, y, out, m, nnz, n, stride_xm, stride_xn, stride_ym,    \
                               stride_yn);                                                          \
  }

#define SDDMM_SUBWARPS(DT, T, VEC)                     \
  SDDMM_ENTRY(sddmm_csr_##DT##_s4_vec, T, 4, VEC)      \
  SDDMM_ENTRY(sddmm_csr_##DT##_s8_vec, T, 8, VEC)      \
  SDDMM_ENTRY(sddmm_csr_##DT##_s16_vec, T, 16, VEC)    \
  SDDMM_ENTRY(sddmm_csr_##DT##_s32_vec, T, 32, VEC)    \
  SDDMM_ENTRY(sddmm_csr_##DT##_s32_scalar, T, 32, 1)

SDDMM_SUBWARPS(f32, float, 4)
SDDMM_SUBWARPS(f16, __half, 8)
SDDMM_SUBWARPS(bf16, __nv_bfloat16, 8)
