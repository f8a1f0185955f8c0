// 2:4 sparse linear on the sparse tensor cores: y [M, N] = x [M, K] @ W^T + bias, with
// mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16} (inline PTX, sm_80 and newer).
//
// W [N, K] is 2:4 sparse in the N:M format: Kp = K rounded up to a multiple of 4,
// Kc = Kp / 2; values [N, Kc] holds, for row r and group g (dense columns 4g..4g+3), its 2
// kept values at values[r, 2g], values[r, 2g+1] in increasing column order; meta int32
// [N, ceil(Kc / 16)] holds their positions in the group, 2 bits each, LSB first: word w of
// row r covers groups 8w..8w+7 (dense columns 32w..32w+31), group 8w+j in bits 4j..4j+3
// (first index in the low 2 bits). That is the per-row encoding mma.sp reads.
//
// The product is computed transposed, y^T = W @ x^T, so that W is the sparse operand A
// (16 weight rows per mma) and x^T is B (8 tokens per mma, x's rows being B's columns:
// "col" layout). Accumulation is in fp32; bias is added in fp32 before the one rounding.
//
// Tiling: a block of 4 warps computes 64 weight rows x 64 tokens; warp w takes weight rows
// 32 * (w / 2) .. +32 (two m16 tiles) and tokens 32 * (w % 2) .. +32 (four n8 tiles). Each
// step of the K loop covers 32 dense columns (16 compressed ones): the warp loads its A
// fragments, metadata and B fragments straight from global memory into registers and
// issues 2 x 4 mma.sp. No shared-memory staging or cp.async pipeline yet.
//
// Fragments, per lane (groupID g = lane / 4, threadID_in_group t = lane % 4), for the k step
// starting at dense column k0 and the m16 tile whose first weight row is r0:
//   A (compressed 16 x 16 tile, the layout of dense mma.m16n8k16's A): register j (0..3) holds
//     values[r0 + g + 8 * (j & 1), k0 / 2 + 2 t + 8 * (j >> 1) + {0, 1}] (low half first):
//     the 2 kept values of dense group k0 / 4 + t + 4 * (j >> 1).
//   metadata, sparsity selector 0 (threads t = 0 and 1 of each quad supply it): thread t holds
//     16-bit half t of meta[r0 + g, k0 / 32] in its low 16 bits and half t of
//     meta[r0 + g + 8, k0 / 32] in its high 16 bits: row g's and row g + 8's groups
//     4t .. 4t + 3 of the 32-column step, one nibble each.
//   B (x^T, 32 x 8): register j (0..3) holds x[n0 + g, k0 + 2 t + 8 j + {0, 1}] for the n8 tile
//     whose first token is n0.
//   D (16 x 8, fp32): d[q] is weight row r0 + g + 8 * (q >> 1), token n0 + 2 t + (q & 1).
// tests/test_cupy.py mirrors this index math in Python and checks it against the PTX ISA's
// description of the fragments on the CPU.
//
// Out-of-range weight rows, compressed columns past Kc and dense columns past K load as 0;
// metadata nibbles of groups past Kp and of rows past N become 0b0100 (positions 0 and 1),
// since mma.sp leaves 0b0000, 0b0101, 0b1010 and 0b1111 undefined.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The metadata holds each group's positions in increasing order, so ::ordered_metadata (PTX
// 8.5, CUDA 12.5; ptxas advises it for future architectures) means the same as plain .sp.
#if __CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
#define MMA_SP "mma.sp::ordered_metadata"
#else
#define MMA_SP "mma.sp"
#endif

namespace {

constexpr int THREADS = 128;
constexpr int BLOCK_ROWS = 64;     // weight rows per block
constexpr int BLOCK_TOKENS = 64;   // tokens per block
constexpr int WARP_ROWS = 32;      // two m16 tiles
constexpr int WARP_TOKENS = 32;    // four n8 tiles
constexpr int K_STEP = 32;         // dense columns per mma.sp
constexpr unsigned VALID_NIBBLES = 0x44444444u;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> struct MmaSp;

template <> struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[4],
                                             unsigned e) {
    asm volatile(
        MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

template <> struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[4],
                                             unsigned e) {
    asm volatile(
        MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
};

// Two consecutive 16-bit elements p[0], p[1] in one register, p[0] in the low half.
__device__ __forceinline__ unsigned load_pair(const unsigned short* p) {
  return *reinterpret_cast<const unsigned*>(p);
}

// Row `row`'s metadata word for the k step at k0, its nibbles past Kp made valid; rows past N
// get valid nibbles only.
__device__ __forceinline__ unsigned meta_word(const unsigned* __restrict__ meta, int row, int N, int meta_words,
                                              int k0, int Kp) {
  if (row >= N) return VALID_NIBBLES;
  const unsigned word = meta[static_cast<long long>(row) * meta_words + k0 / K_STEP];
  const int groups = (Kp - k0) / 4;
  if (groups >= 8) return word;
  const unsigned kept = (1u << (4 * groups)) - 1;
  return (word & kept) | (VALID_NIBBLES & ~kept);
}

template <typename T>
__device__ __forceinline__ void nm24_linear(const unsigned short* __restrict__ x,
                                            const unsigned short* __restrict__ values,
                                            const unsigned* __restrict__ meta, const T* __restrict__ bias,
                                            T* __restrict__ y, int M, int N, int K, int Kc, int meta_words) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row_base = blockIdx.x * BLOCK_ROWS + (warp >> 1) * WARP_ROWS;
  const int token_base = blockIdx.y * BLOCK_TOKENS + (warp & 1) * WARP_TOKENS;
  const int Kp = 2 * Kc;
  // x pairs are 4-byte aligned when K is even (k is always even) and x is.
  const bool x_pairs = K % 2 == 0 && (reinterpret_cast<unsigned long long>(x) & 3) == 0;

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int jn = 0; jn < 4; ++jn)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][jn][q] = 0.f;

  for (int k0 = 0; k0 < Kp; k0 += K_STEP) {
    unsigned a[2][4], e[2], b[4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r0 = row_base + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = r0 + g + 8 * (j & 1);
        const int c = k0 / 2 + 2 * t + 8 * (j >> 1);  // even, and Kc is even: the pair is all in or all out
        a[i][j] = row < N && c < Kc ? load_pair(values + static_cast<long long>(row) * Kc + c) : 0u;
      }
      const unsigned lo = meta_word(meta, r0 + g, N, meta_words, k0, Kp);
      const unsigned hi = meta_word(meta, r0 + g + 8, N, meta_words, k0, Kp);
      e[i] = t == 0 ? (lo & 0xffffu) | (hi << 16) : (lo >> 16) | (hi & 0xffff0000u);
    }
#pragma unroll
    for (int jn = 0; jn < 4; ++jn) {
      const int token = token_base + 8 * jn + g;
      const unsigned short* xrow = x + static_cast<long long>(token) * K;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = k0 + 2 * t + 8 * j;
        unsigned pair = 0u;
        if (token < M && k < K) {
          if (x_pairs) {
            pair = load_pair(xrow + k);
          } else {
            pair = xrow[k];
            if (k + 1 < K) pair |= static_cast<unsigned>(xrow[k + 1]) << 16;
          }
        }
        b[jn][j] = pair;
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jn = 0; jn < 4; ++jn) MmaSp<T>::run(acc[i][jn], a[i], b[jn], e[i]);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int row = row_base + 16 * i + g + 8 * (q >> 1);
      if (row >= N) continue;
      const float shift = bias != nullptr ? to_float(bias[row]) : 0.f;
#pragma unroll
      for (int jn = 0; jn < 4; ++jn) {
        const int token = token_base + 8 * jn + 2 * t + (q & 1);
        if (token < M) y[static_cast<long long>(token) * N + row] = from_float<T>(acc[i][jn][q] + shift);
      }
    }
}

}  // namespace

// grid = (cdiv(N, 64), cdiv(M, 64)), block = 128. x [M, K], values [N, Kc] and meta
// [N, meta_words] contiguous, values 4-byte aligned; bias [N] or null; y [M, N] contiguous.
#define NM24_ENTRY(NAME, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
      NAME(const unsigned short* x, const unsigned short* values, const unsigned* meta, const T* bias, T* y, \
           int M, int N, int K, int Kc, int meta_words) {                                                   \
    nm24_linear<T>(x, values, meta, bias, y, M, N, K, Kc, meta_words);                                       \
  }

NM24_ENTRY(nm24_linear_f16, __half)
NM24_ENTRY(nm24_linear_bf16, __nv_bfloat16)
